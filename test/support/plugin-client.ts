import { spawn, type ChildProcess } from "node:child_process";
import { request } from "node:http";
import { once } from "node:events";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";

/** The server bundle the integration tests run (npm run build writes it). */
export const BUNDLE = join(import.meta.dirname, "..", "..", "dist", "thinvol.mjs");

/**
 * Settings for a test server whose socket, pool and mounts all lie under `dir`: the loop
 * pool, 2 GiB, 64 MiB volumes by default; `overrides` replace any of them.
 */
export function serverEnv(dir: string, overrides: Record<string, string> = {}): Record<string, string> {
  return {
    SOCKET_PATH: join(dir, "thinvol.sock"),
    STATE_DIR: join(dir, "state"),
    MOUNT_DIR: join(dir, "volumes"),
    POOL_DRIVER: "loop",
    POOL_SIZE: "2G",
    DEFAULT_SIZE: "64M",
    MIN_FREE_SPACE: "5",
    ...overrides,
  };
}

export interface Reply {
  status: number;
  body: Record<string, unknown>;
}

/** Calls the plugin the way the Docker daemon does: POST over the unix socket, no Content-Type. */
export function callPlugin(socketPath: string, method: string, body: unknown = {}): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const req = request(
      {
        socketPath,
        path: `/${method}`,
        method: "POST",
        // Docker's plugin client sends no Host header; neither do we, to catch a server that rejects that.
        setHost: false,
        headers: { Accept: "application/vnd.docker.plugins.v1.2+json" },
      },
      (res) => {
        let text = "";
        res.setEncoding("utf8");
        res.on("data", (chunk: string) => (text += chunk));
        res.on("end", () => {
          try {
            resolve({ status: res.statusCode ?? 0, body: JSON.parse(text) as Record<string, unknown> });
          } catch (err) {
            reject(new Error(`${method}: reply is not JSON: ${text}`, { cause: err }));
          }
        });
      },
    );
    req.on("error", reject);
    req.end(JSON.stringify(body));
  });
}

/** Calls a method and fails with the plugin's Err if it answered with one. */
export async function callOk(socketPath: string, method: string, body: unknown = {}): Promise<Record<string, unknown>> {
  const reply = await callPlugin(socketPath, method, body);
  if (reply.status !== 200 || (typeof reply.body["Err"] === "string" && reply.body["Err"] !== "")) {
    throw new Error(`${method} failed (${reply.status}): ${String(reply.body["Err"])}`);
  }
  return reply.body;
}

export interface ServerProcess {
  child: ChildProcess;
  output: () => string;
}

/**
 * Starts the bundled server and waits until it has recovered its pool and answers List;
 * with this Node (by default the one running the tests) and its flags.
 */
export async function startServer(
  bundle: string,
  env: Record<string, string>,
  runtime: { node?: string; flags?: readonly string[] } = {},
): Promise<ServerProcess> {
  const child = spawn(runtime.node ?? process.execPath, [...(runtime.flags ?? []), bundle], { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  child.stdout?.on("data", (d: Buffer) => (out += d.toString()));
  child.stderr?.on("data", (d: Buffer) => (out += d.toString()));
  const socket = env["SOCKET_PATH"] ?? "";
  const deadline = Date.now() + 60_000;
  try {
    while (Date.now() < deadline) {
      if (child.exitCode !== null) throw new Error(`the server exited with ${child.exitCode}:\n${out}`);
      if (/ ready /.test(out)) {
        await callOk(socket, "VolumeDriver.List");
        return { child, output: () => out };
      }
      if (/start-up failed/.test(out)) throw new Error(`the server could not start:\n${out}`);
      await sleep(50);
    }
    throw new Error(`the server did not become ready within 60 s:\n${out}`);
  } catch (err) {
    // A server left running would keep the test process alive forever.
    child.kill("SIGKILL");
    throw err;
  }
}

export async function stopServer(server: ServerProcess, signal: NodeJS.Signals = "SIGTERM"): Promise<number | null> {
  if (server.child.exitCode !== null || server.child.signalCode !== null) return server.child.exitCode;
  const exited = once(server.child, "exit");
  server.child.kill(signal);
  const [code] = (await exited) as [number | null];
  return code;
}
