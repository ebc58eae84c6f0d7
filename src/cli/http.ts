import { request, type IncomingMessage } from "node:http";

/**
 * HTTP over a unix socket, with node:http's `socketPath`: used for both the admin
 * API and the Docker engine. Failures to connect come back as SocketError carrying
 * the errno code, so each caller can say what the socket was and what to do.
 */

/** Replies are small (a volume is a few hundred bytes); this only stops a runaway peer. */
export const MAX_REPLY_BYTES = 64 * 1024 * 1024;

export class SocketError extends Error {
  override name = "SocketError";
  constructor(
    message: string,
    /** ENOENT, ECONNREFUSED, EACCES, ETIMEDOUT, ECONNRESET… */
    readonly code: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

export interface HttpRequest {
  method: "GET" | "POST" | "DELETE";
  path: string;
  accept: string;
  /** Sent as JSON when present. */
  body?: unknown;
  /** Give up when the socket is silent this long. */
  idleTimeoutMs: number;
}

/** Sends the request; resolves with the response once its headers are in. */
export function send(socketPath: string, req: HttpRequest): Promise<IncomingMessage> {
  return new Promise((resolve, reject) => {
    const payload = req.body === undefined ? undefined : JSON.stringify(req.body);
    const headers: Record<string, string> = { Accept: req.accept };
    if (payload !== undefined) {
      headers["Content-Type"] = "application/json";
      headers["Content-Length"] = String(Buffer.byteLength(payload));
    }
    const r = request({ socketPath, method: req.method, path: req.path, headers }, resolve);
    r.setTimeout(req.idleTimeoutMs, () => {
      r.destroy(new SocketError(`no reply within ${Math.round(req.idleTimeoutMs / 1000)} s`, "ETIMEDOUT"));
    });
    r.on("error", (err: NodeJS.ErrnoException) => {
      reject(err instanceof SocketError ? err : new SocketError(err.message, err.code ?? "EIO", { cause: err }));
    });
    r.end(payload);
  });
}

/** The whole body as text. */
export async function readText(res: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  let size = 0;
  try {
    for await (const chunk of res) {
      const buf = chunk as Buffer;
      size += buf.byteLength;
      if (size > MAX_REPLY_BYTES) {
        res.destroy();
        throw new SocketError(`the reply is larger than ${MAX_REPLY_BYTES} bytes`, "EMSGSIZE");
      }
      chunks.push(buf);
    }
  } catch (err) {
    throw asSocketError(err);
  }
  return Buffer.concat(chunks).toString("utf8");
}

/** Calls `onLine` with each non-empty line as it arrives (ndjson), and with a last unterminated one. */
export async function readLines(res: IncomingMessage, onLine: (line: string) => void): Promise<void> {
  let pending = "";
  res.setEncoding("utf8");
  try {
    for await (const chunk of res) {
      pending += chunk as string;
      if (pending.length > MAX_REPLY_BYTES) {
        res.destroy();
        throw new SocketError(`a progress line is longer than ${MAX_REPLY_BYTES} bytes`, "EMSGSIZE");
      }
      let newline: number;
      while ((newline = pending.indexOf("\n")) >= 0) {
        const line = pending.slice(0, newline).trim();
        pending = pending.slice(newline + 1);
        if (line !== "") onLine(line);
      }
    }
  } catch (err) {
    throw asSocketError(err);
  }
  if (pending.trim() !== "") onLine(pending.trim());
}

function asSocketError(err: unknown): unknown {
  if (err instanceof SocketError || !(err instanceof Error)) return err;
  const code = (err as NodeJS.ErrnoException).code;
  // A reset or an aborted body is the peer going away mid-reply; anything else is ours to rethrow.
  return code === undefined && err.message !== "aborted" ? err : new SocketError(err.message, code ?? "ECONNRESET", { cause: err });
}
