import { createServer, type Server } from "node:http";
import { chmod, mkdir, rm } from "node:fs/promises";
import { dirname } from "node:path";
import { getRequestListener } from "@hono/node-server";
import type { Hono } from "hono";

/** Serves the app on a unix socket, replacing a stale socket file left by a crash. */
export async function listenOnSocket(app: Hono, socketPath: string): Promise<Server> {
  await mkdir(dirname(socketPath), { recursive: true });
  await rm(socketPath, { force: true });
  // Docker's plugin client sends an empty Host header over the unix socket; without a
  // default hostname @hono/node-server answers every daemon request 400 Bad Request.
  // Node also refuses HTTP/1.1 requests with no Host header at all unless told not to.
  const server = createServer({ requireHostHeader: false }, getRequestListener(app.fetch, { hostname: "localhost" }));
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(socketPath, () => {
      server.off("error", reject);
      resolve();
    });
  });
  await chmod(socketPath, 0o660);
  return server;
}

/** Stops accepting connections and resolves when in-flight requests have finished. */
export function closeServer(server: Server): Promise<void> {
  return new Promise((resolve) => {
    server.close(() => resolve());
    server.closeIdleConnections();
  });
}
