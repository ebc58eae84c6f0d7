import { execFile } from "node:child_process";
import { mkdir, mkdtemp, readFile, rm } from "node:fs/promises";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { afterEach, beforeEach } from "node:test";
import { run, type Io } from "../../src/cli/run.js";

/** What a fake server saw of one request. */
export interface Seen {
  method: string;
  path: string;
  accept: string | undefined;
  contentType: string | undefined;
  body: unknown;
}

/**
 * A reply: JSON with a status; plain text; or an ndjson stream, one line per item
 * (strings are sent as they are, so a test can send a broken line).
 */
export type Reply =
  | { status?: number; json: unknown }
  | { status?: number; text: string }
  | { ndjson: readonly (object | string)[] };

/**
 * A real HTTP server on a unix socket, answering canned replies per `METHOD /path`
 * and recording every request: the admin API or the Docker engine, as a test needs.
 */
export class FakeServer {
  readonly requests: Seen[] = [];
  private readonly routes = new Map<string, Reply | ((seen: Seen) => Reply)>();

  private constructor(
    readonly socketPath: string,
    private readonly server: Server,
  ) {}

  static async start(socketPath: string): Promise<FakeServer> {
    await mkdir(dirname(socketPath), { recursive: true });
    let fake: FakeServer | undefined;
    const server = createServer((req, res) => void fake?.handle(req, res));
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(socketPath, resolve);
    });
    fake = new FakeServer(socketPath, server);
    return fake;
  }

  on(method: string, path: string, reply: Reply | ((seen: Seen) => Reply)): this {
    this.routes.set(`${method} ${path}`, reply);
    return this;
  }

  close(): Promise<void> {
    this.server.closeAllConnections();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const chunks: Buffer[] = [];
    for await (const chunk of req) chunks.push(chunk as Buffer);
    const text = Buffer.concat(chunks).toString("utf8");
    const seen: Seen = {
      method: req.method ?? "",
      path: req.url ?? "",
      accept: req.headers.accept,
      contentType: req.headers["content-type"],
      body: text === "" ? undefined : (JSON.parse(text) as unknown),
    };
    this.requests.push(seen);
    const route = this.routes.get(`${seen.method} ${seen.path}`);
    const reply = typeof route === "function" ? route(seen) : (route ?? { status: 404, json: { error: `no route ${seen.method} ${seen.path}`, kind: "not-found" } });
    if ("ndjson" in reply) {
      res.writeHead(200, { "Content-Type": "application/x-ndjson" });
      for (const item of reply.ndjson) {
        const line = typeof item === "string" ? item : JSON.stringify(item);
        // Each line in two writes, a turn apart, so the client must join pieces of a line.
        const half = Math.floor(line.length / 2);
        res.write(line.slice(0, half));
        await new Promise((r) => setImmediate(r));
        res.write(`${line.slice(half)}\n`);
      }
      res.end();
    } else if ("json" in reply) {
      res.writeHead(reply.status ?? 200, { "Content-Type": "application/json" });
      res.end(JSON.stringify(reply.json));
    } else {
      res.writeHead(reply.status ?? 200, { "Content-Type": "text/plain; version=0.0.4" });
      res.end(reply.text);
    }
  }
}

export interface Result {
  code: number;
  stdout: string;
  stderr: string;
}

export interface RunOptions {
  env?: Record<string, string | undefined>;
  /** Pretend stderr is a terminal (progress lines are drawn). */
  tty?: boolean;
  columns?: number;
}

/** Runs the command in this process, as `thinvol ...argv` would, and collects what it printed. */
export async function runCli(argv: readonly string[], options: RunOptions = {}): Promise<Result> {
  let stdout = "";
  let stderr = "";
  let clock = 0;
  const io: Io = {
    stdout: (t) => void (stdout += t),
    stderr: (t) => void (stderr += t),
    stderrIsTTY: options.tty ?? false,
    ...(options.columns === undefined ? {} : { stderrColumns: options.columns }),
    // No Docker on a test machine: DOCKER_HOST always points into the test's own directory.
    env: { DOCKER_HOST: "unix:///nonexistent/docker.sock", ...options.env },
    // Each reading of the clock is a second later, so elapsed time shows without waiting.
    now: () => (clock += 1000),
  };
  const code = await run(argv, io);
  return { code, stdout, stderr };
}

const ROOT = join(import.meta.dirname, "..", "..");
const MAIN = join(ROOT, "src", "cli", "main.ts");

/** Runs the command as a child process (node, tsx), as a user would from a shell. */
export function runCliProcess(argv: readonly string[], env: Record<string, string> = {}): Promise<Result> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      ["--import", "tsx", MAIN, ...argv],
      { cwd: ROOT, env: { PATH: process.env["PATH"] ?? "", DOCKER_HOST: "unix:///nonexistent/docker.sock", ...env } },
      (err, stdout, stderr) => {
        const code = err ? (typeof err.code === "number" ? err.code : -1) : 0;
        resolve({ code, stdout, stderr });
      },
    );
  });
}

export async function tempDir(): Promise<{ path: string; remove(): Promise<void> }> {
  const path = await mkdtemp(join(tmpdir(), "thinvol-cli-"));
  return { path, remove: () => rm(path, { recursive: true, force: true }) };
}

interface ConfigEnv {
  name: string;
  description?: string;
  settable?: string[];
  value?: string | null;
}
interface ConfigMount {
  name: string;
  description?: string;
  settable?: string[];
  source?: string | null;
  destination: string;
  type: string;
  options?: string[];
}

/**
 * The Engine API's `GET /plugins/{name}/json` for the plugin as plugin/config.json
 * defines it, installed and with `state.source` set to `stateSource` (as
 * `docker plugin set thinvol state.source=...` would), and `env` set on top.
 */
export async function pluginInspect(options: { name?: string; enabled?: boolean; stateSource: string; env?: Record<string, string> }): Promise<Record<string, unknown>> {
  const config = JSON.parse(await readFile(join(ROOT, "plugin", "config.json"), "utf8")) as { env: ConfigEnv[]; mounts: ConfigMount[] };
  const mounts = config.mounts.map((m) => ({
    Name: m.name,
    Description: m.description ?? "",
    Settable: m.settable ?? null,
    Source: m.name === "state" ? options.stateSource : (m.source ?? null),
    Destination: m.destination,
    Type: m.type,
    Options: m.options ?? [],
  }));
  const settingsEnv = config.env.filter((e) => e.value !== undefined && e.value !== null).map((e) => `${e.name}=${e.value}`);
  for (const [key, value] of Object.entries(options.env ?? {})) {
    const i = settingsEnv.findIndex((e) => e.startsWith(`${key}=`));
    if (i >= 0) settingsEnv[i] = `${key}=${value}`;
    else settingsEnv.push(`${key}=${value}`);
  }
  return {
    Id: "5724e2c8652da337ab2eedd19fc6fc0ec908e4bd907c7421bf6a8dfc70c4c078",
    Name: options.name ?? "thinvol:latest",
    Enabled: options.enabled ?? true,
    Settings: { Mounts: mounts, Env: settingsEnv, Args: [], Devices: [] },
    PluginReference: "docker.io/library/thinvol:latest",
    Config: {
      Description: "thinvol",
      Interface: { Types: ["docker.volumedriver/1.0"], Socket: "thinvol.sock" },
      Env: config.env.map((e) => ({ Name: e.name, Description: e.description ?? "", Settable: e.settable ?? null, Value: e.value ?? "" })),
      Mounts: mounts.map((m) => ({ ...m })),
    },
  };
}

/**
 * A fake admin API for each test of the calling file (beforeEach/afterEach), with the
 * `--socket` arguments that point the command at it (those tests are about the API, not
 * about finding it), and the test's own temporary directory.
 */
export function useFakeAdmin(): { readonly admin: FakeServer; readonly sock: string[]; readonly dir: string } {
  let dir: Awaited<ReturnType<typeof tempDir>>;
  const state = {} as { admin: FakeServer; sock: string[]; dir: string };
  beforeEach(async () => {
    dir = await tempDir();
    state.dir = dir.path;
    state.admin = await FakeServer.start(join(dir.path, "admin.sock"));
    state.sock = ["--socket", state.admin.socketPath];
  });
  afterEach(async () => {
    await state.admin.close();
    await dir.remove();
  });
  return state;
}
