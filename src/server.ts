import { STATUS_CODES, createServer, type Server } from "node:http";
import type { Duplex } from "node:stream";
import { chmod, mkdir, rm } from "node:fs/promises";
import { dirname } from "node:path";
import { getRequestListener } from "@hono/node-server";
import type { Hono } from "hono";

/** Serves the app on a unix socket, replacing a stale socket file left by a crash. */
export async function listenOnSocket(app: Hono, socketPath: string, mode = 0o660): Promise<Server> {
  await mkdir(dirname(socketPath), { recursive: true });
  await rm(socketPath, { force: true });
  // Docker's plugin client sends an empty Host header over the unix socket; without a
  // default hostname @hono/node-server answers every daemon request 400 Bad Request.
  // Node also refuses HTTP/1.1 requests with no Host header at all unless told not to.
  const server = createServer({ requireHostHeader: false }, getRequestListener(app.fetch, { hostname: "localhost" }));
  server.on("clientError", answerUnreadableRequest);
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(socketPath, () => {
      server.off("error", reject);
      resolve();
    });
  });
  await chmod(socketPath, mode);
  return server;
}

/**
 * Node answers a request it cannot parse (an unknown method, a malformed header,
 * headers over 16 KiB) with a bare status line; answer in the protocol's `{Err}`
 * shape instead, as Node would, only while no reply has started on the connection.
 */
function answerUnreadableRequest(err: NodeJS.ErrnoException, socket: Duplex): void {
  const replying = (socket as { _httpMessage?: { headersSent?: boolean } })._httpMessage?.headersSent === true;
  if (err.code === "ECONNRESET" || !socket.writable || replying) {
    socket.destroy();
    return;
  }
  const status = err.code === "HPE_HEADER_OVERFLOW" ? 431 : err.code === "ERR_HTTP_REQUEST_TIMEOUT" ? 408 : 400;
  const body = JSON.stringify({ Err: `thinvol could not read the request: it is not valid HTTP (${err.code ?? "unknown error"})` });
  socket.end(
    `HTTP/1.1 ${status} ${STATUS_CODES[status] ?? ""}\r\nContent-Type: application/json\r\n` +
      `Content-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
  );
}

/** Stops accepting connections and resolves when in-flight requests have finished. */
export function closeServer(server: Server): Promise<void> {
  return new Promise((resolve) => {
    server.close(() => resolve());
    server.closeIdleConnections();
  });
}
