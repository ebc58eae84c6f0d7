import type { IncomingMessage } from "node:http";
import * as v from "valibot";
import { escapeUnprintable } from "../errors.js";
import { ApiError, CliError, UnavailableError } from "./errors.js";
import { SocketError, readLines, readText, send } from "./http.js";
import { ErrorReply, StreamEvent, type Progress } from "./replies.js";

/** Reads answer at once; a change can take a while (a filesystem grows, a pool is copied). */
export const READ_TIMEOUT_MS = 60_000;
export const CHANGE_TIMEOUT_MS = 15 * 60_000;

const NDJSON = "application/x-ndjson";

/** Where the admin socket is, and how it was found, for error messages. */
export interface AdminSocket {
  path: string;
  /** Set when the path came from Docker: the plugin's reference, e.g. `thinvol:latest`. */
  plugin?: string;
}

export interface CallOptions {
  body?: unknown;
  /** When given, progress is asked for (ndjson) and each event is passed here. */
  onProgress?: ((event: Progress) => void) | undefined;
}

/** The admin API client. The socket is found lazily, so a usage error never talks to anything. */
export class AdminClient {
  private socket: Promise<AdminSocket> | undefined;

  constructor(private readonly locate: () => Promise<AdminSocket>) {}

  /** Calls a JSON route and checks its reply against `schema`. */
  async call<S extends v.GenericSchema>(schema: S, method: "GET" | "POST" | "DELETE", path: string, options: CallOptions = {}): Promise<v.InferOutput<S>> {
    const accept = options.onProgress ? NDJSON : "application/json";
    const res = await this.send({ method, path, accept, body: options.body });
    const where = `${method} ${path}`;
    const reply =
      options.onProgress && (res.headers["content-type"] ?? "").includes(NDJSON)
        ? await this.readStream(res, where, options.onProgress)
        : parseJson(await this.read(res), res.statusCode ?? 0, where);
    const result = v.safeParse(schema, reply);
    if (!result.success) throw unexpected(where, describeIssues(result.issues));
    return result.output;
  }

  /** A plain-text route (the Prometheus metrics). */
  async text(path: string): Promise<string> {
    const res = await this.send({ method: "GET", path, accept: "text/plain" });
    const text = await this.read(res);
    if ((res.statusCode ?? 0) >= 400) parseJson(text, res.statusCode ?? 0, `GET ${path}`);
    return text;
  }

  private async send(req: { method: "GET" | "POST" | "DELETE"; path: string; accept: string; body?: unknown }): Promise<IncomingMessage> {
    this.socket ??= this.locate();
    const socket = await this.socket;
    const idleTimeoutMs = req.method === "GET" ? READ_TIMEOUT_MS : CHANGE_TIMEOUT_MS;
    try {
      return await send(socket.path, { ...req, idleTimeoutMs });
    } catch (err) {
      throw err instanceof SocketError ? connectError(socket, err) : err;
    }
  }

  private async read(res: IncomingMessage): Promise<string> {
    try {
      return await readText(res);
    } catch (err) {
      throw err instanceof SocketError ? connectError(await this.located(), err) : err;
    }
  }

  /** Progress events until exactly one result or error. */
  private async readStream(res: IncomingMessage, where: string, onProgress: (event: Progress) => void): Promise<unknown> {
    let outcome: { result: unknown } | undefined;
    try {
      await readLines(res, (line) => {
        const event = v.safeParse(StreamEvent, parseLine(line, where));
        if (!event.success) throw unexpected(where, `progress line ${escapeUnprintable(line.slice(0, 200))}`);
        const e = event.output;
        if (e.event === "progress") onProgress({ message: e.message, done: e.done, total: e.total });
        else if (e.event === "error") throw new ApiError(e.error, e.kind, res.statusCode ?? 0);
        else outcome ??= { result: e.result };
      });
    } catch (err) {
      throw err instanceof SocketError ? connectError(await this.located(), err) : err;
    }
    if (!outcome) {
      throw new CliError(
        `the admin API ended the progress of ${where} without a result; the change may or may not have been made (look with thinvol ls or thinvol snapshot ls)`,
        "error",
      );
    }
    return outcome.result;
  }

  private located(): Promise<AdminSocket> {
    return this.socket ?? this.locate();
  }
}

function parseLine(line: string, where: string): unknown {
  try {
    return JSON.parse(line);
  } catch {
    throw unexpected(where, `progress line ${escapeUnprintable(line.slice(0, 200))}`);
  }
}

/** A JSON reply; a status of 400 or more is the API's `{error, kind}`. */
function parseJson(text: string, status: number, where: string): unknown {
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    throw unexpected(where, `status ${status}, body ${JSON.stringify(escapeUnprintable(text.slice(0, 200)))}`);
  }
  if (status < 400) return body;
  const err = v.safeParse(ErrorReply, body);
  if (!err.success) throw unexpected(where, `status ${status} without an error message`);
  throw new ApiError(err.output.error, err.output.kind, status);
}

function unexpected(where: string, what: string): CliError {
  return new CliError(`unexpected reply from the admin API to ${where}: ${what}; is the plugin the version this command expects?`, "error");
}

function describeIssues(issues: readonly v.BaseIssue<unknown>[]): string {
  return issues
    .slice(0, 3)
    .map((i) => `${v.getDotPath(i) ?? "reply"}: ${i.message}`)
    .join("; ");
}

/** Says which socket, why it failed, and what to do about it. */
export function connectError(socket: AdminSocket, err: SocketError): UnavailableError {
  const at = socket.path;
  const plugin = socket.plugin;
  const options = { cause: err };
  switch (err.code) {
    case "ENOENT":
      return new UnavailableError(
        plugin
          ? `no admin socket at ${at}: plugin ${plugin} is enabled, but it is still starting or its version has no admin API (see docker plugin inspect ${plugin})`
          : `no admin socket at ${at}: is the plugin running, and is this the admin.sock in its STATE_DIR?`,
        options,
      );
    case "ECONNREFUSED":
      return new UnavailableError(
        `nothing is listening on ${at}: the plugin is not running${plugin ? ` (see docker plugin ls; enable it with docker plugin enable ${plugin})` : ""}`,
        options,
      );
    case "EACCES":
    case "EPERM":
      return new UnavailableError(`permission denied on ${at}: the admin socket is root's only; run thinvol as root (sudo)`, options);
    case "ENOTSOCK":
      return new UnavailableError(`${at} is not a socket: pass the admin.sock in the plugin's STATE_DIR`, options);
    case "ETIMEDOUT":
      return new UnavailableError(`the admin API at ${at} gave no reply: ${err.message}; a change may still be under way in the plugin`, options);
    case "ECONNRESET":
      return new UnavailableError(`the admin API at ${at} closed the connection before it replied; a change may or may not have been made`, options);
    default:
      return new UnavailableError(`cannot talk to the admin API at ${at}: ${err.message}`, options);
  }
}
