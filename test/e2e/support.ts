/**
 * What the end-to-end scenarios share: the docker CLI against the test engine, a
 * container from the offline busybox image, and what the host sees (mounts, pool
 * files). Everything goes through argument arrays; nothing through a shell string
 * on the host (the `sh -c` scripts run inside the test containers).
 */
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { open, readFile, readdir, stat } from "node:fs/promises";
import { request as httpRequest } from "node:http";
import { join, relative } from "node:path";
import { execa } from "execa";

function required(name: string): string {
  const value = process.env[name];
  if (value === undefined || value === "") {
    throw new Error(`${name} is not set: run the end-to-end tests through test/e2e/run.sh`);
  }
  return value;
}

export const env = {
  image: required("E2E_IMAGE"),
  plugin: required("E2E_PLUGIN"),
  poolDriver: required("E2E_POOL_DRIVER"),
  /** The state directory as the host sees it (the state mount's source + STATE_DIR's subdirectory). */
  stateDir: required("E2E_STATE_DIR"),
  /** test/e2e/engine.sh, to restart the engine. */
  engineScript: required("E2E_ENGINE_SCRIPT"),
};

export interface Result {
  stdout: string;
  stderr: string;
  exitCode: number;
}

/**
 * Runs the docker CLI; never throws for a non-zero exit. `dockerHost` names another engine
 * than the tier's (DOCKER_HOST).
 */
export async function docker(args: readonly string[], timeoutMs = 120_000, dockerHost?: string): Promise<Result> {
  const engine = dockerHost === undefined ? {} : { DOCKER_HOST: dockerHost };
  const r = await execa("docker", args, { reject: false, timeout: timeoutMs, stdin: "ignore", env: engine });
  if (r.timedOut) throw new Error(`docker ${args.join(" ")} timed out after ${timeoutMs} ms`);
  return { stdout: String(r.stdout), stderr: String(r.stderr), exitCode: r.exitCode ?? -1 };
}

/** Runs the docker CLI and returns its stdout; a failure throws with the CLI's message. */
export async function dockerOk(args: readonly string[], timeoutMs?: number, dockerHost?: string): Promise<string> {
  const r = await docker(args, timeoutMs, dockerHost);
  if (r.exitCode !== 0) {
    throw new Error(`docker ${args.join(" ")} exited with ${r.exitCode}: ${(r.stderr || r.stdout).trim()}`);
  }
  return r.stdout.trim();
}

/** A fresh name, so scenarios never depend on one another's leftovers. */
export function uniqueName(prefix: string): string {
  return `${prefix}-${randomBytes(3).toString("hex")}`;
}

export async function createVolume(name: string, opts: Record<string, string> = {}): Promise<void> {
  const args = ["volume", "create", "-d", env.plugin];
  for (const [key, value] of Object.entries(opts)) args.push("-o", `${key}=${value}`);
  args.push(name);
  await dockerOk(args);
}

/** `docker run --rm` with the volume at /d; returns the container's result. */
export async function runIn(volume: string, script: string, extra: readonly string[] = []): Promise<Result> {
  return docker(["run", "--rm", "--network", "none", "-v", `${volume}:/d`, ...extra, env.image, "sh", "-c", script]);
}

/** Same, but a failure of the script throws with its output. */
export async function runInOk(volume: string, script: string): Promise<string> {
  const r = await runIn(volume, script);
  if (r.exitCode !== 0) throw new Error(`container script failed (${r.exitCode}): ${script}\n${r.stderr}${r.stdout}`);
  return r.stdout.trim();
}

/** A detached container holding the volume at /d until it is removed. */
export async function startHolder(volume: string, name: string): Promise<void> {
  await dockerOk(["run", "-d", "--name", name, "--network", "none", "-v", `${volume}:/d`, env.image, "sleep", "600"]);
}

export async function removeContainers(...names: string[]): Promise<void> {
  if (names.length > 0) await docker(["rm", "-f", ...names]);
}

export async function removeVolumes(...names: string[]): Promise<void> {
  for (const name of names) await docker(["volume", "rm", "-f", name]);
}

export interface VolumeInspect {
  Name: string;
  Driver: string;
  Mountpoint: string;
  CreatedAt?: string;
  Status?: Record<string, unknown>;
}

export async function inspectVolume(name: string): Promise<VolumeInspect> {
  const out = await dockerOk(["volume", "inspect", name]);
  const parsed = JSON.parse(out) as VolumeInspect[];
  const first = parsed[0];
  if (first === undefined) throw new Error(`docker volume inspect ${name} returned nothing`);
  return first;
}

/** Names of the plugin's volumes in `docker volume ls` (Docker shows the driver as name:tag). */
export async function volumeNames(): Promise<string[]> {
  const out = await dockerOk(["volume", "ls", "--format", "{{.Driver}}\t{{.Name}}"]);
  const ours = new Set([env.plugin, `${env.plugin}:latest`]);
  return out
    .split("\n")
    .map((line) => line.split("\t"))
    .filter(([driver, name]) => driver !== undefined && ours.has(driver) && name !== undefined)
    .map(([, name]) => name as string);
}

/** Whether `path` is a mount point in the host's mount namespace. */
export async function isHostMountPoint(path: string): Promise<boolean> {
  const r = await execa("findmnt", ["-n", "--mountpoint", path], { reject: false });
  return r.exitCode === 0;
}

/**
 * Where a volume is mounted, as a path in the host's mount namespace. `docker volume
 * inspect` shows either the host path (`<data-root>/plugins/<id>/propagated-mount/...`)
 * or, on some engine versions, the path inside the plugin (under its propagatedMount);
 * both are mapped to the host path. Fails if the Mountpoint lies outside the
 * propagated mount, where containers would see an empty directory.
 */
export async function hostMountpoint(volume: string): Promise<string> {
  const mountpoint = (await inspectVolume(volume)).Mountpoint;
  const [id, inPlugin] = (await dockerOk(["plugin", "inspect", "--format", "{{.Id}} {{.Config.PropagatedMount}}", env.plugin])).split(" ");
  const dataRoot = await dockerOk(["info", "--format", "{{.DockerRootDir}}"]);
  if (id === undefined || inPlugin === undefined || inPlugin === "") throw new Error(`plugin ${env.plugin} has no propagated mount`);
  const onHost = join(dataRoot, "plugins", id, "propagated-mount");
  if (mountpoint === onHost || mountpoint.startsWith(`${onHost}/`)) return mountpoint;
  if (mountpoint.startsWith(`${inPlugin}/`)) return join(onHost, relative(inPlugin, mountpoint));
  throw new Error(`volume ${volume} has Mountpoint ${JSON.stringify(mountpoint)}, outside the plugin's propagated mount ${inPlugin}`);
}

/** Bytes the pool's files really occupy on the host disk (allocated blocks, not apparent size). */
export async function allocatedBytes(dir: string): Promise<number> {
  let total = 0;
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) {
      // The loop driver mounts its pool under the state dir inside the plugin only;
      // on the host that directory is empty, so walking it is harmless.
      total += await allocatedBytes(path);
    } else if (entry.isFile()) {
      total += (await stat(path)).blocks * 512;
    }
  }
  return total;
}

export async function restartEngine(): Promise<void> {
  const r = await execa("bash", [env.engineScript, "restart"], { reject: false, timeout: 180_000, stdin: "ignore" });
  if (r.exitCode !== 0) throw new Error(`engine restart failed (${r.exitCode}): ${String(r.stderr)}`);
}

export const MiB = 1024 * 1024;

/**
 * The registry side, set by test/e2e/run.sh when it installed the plugin from a registry
 * (E2E_INSTALL=registry); undefined when it used `docker plugin create`.
 */
export const registry = (() => {
  const repository = process.env["E2E_REPOSITORY"];
  if (repository === undefined || repository === "") return undefined;
  return {
    /** 127.0.0.1:PORT/thinvol */
    repository,
    /** This version (package.json's), installed by run.sh. */
    version: required("E2E_VERSION"),
    /** The next version, a pre-release, pushed for the host's architecture only. */
    nextVersion: required("E2E_NEXT_VERSION"),
    /** The file where run.sh listed every REPOSITORY:TAG build/plugin-push.sh pushed. */
    pushedTagsFile: required("E2E_PUSHED_TAGS"),
    /** The state mount's source given to the install. */
    stateSource: required("E2E_STATE_SOURCE"),
    /** An offline PostgreSQL 15 image (test/e2e/engine.sh engine_import_postgres). */
    pgImage: required("E2E_PG_IMAGE"),
    /** The engine's log, where the plugin's output goes. */
    engineLog: required("E2E_LOG"),
  };
})();

/** Why a registry scenario is skipped, for `test(..., { skip })`. */
export const noRegistry = registry === undefined ? "the plugin was installed with docker plugin create (E2E_INSTALL=create)" : false;

interface PluginMount {
  Name: string;
  Source: string | null;
}

export interface PluginInspect {
  Id: string;
  Name: string;
  PluginReference: string;
  Enabled: boolean;
  Settings: { Env: string[]; Mounts: PluginMount[] };
  Config: { Mounts: PluginMount[] };
}

export async function inspectPlugin(name: string = env.plugin): Promise<PluginInspect> {
  const parsed = JSON.parse(await dockerOk(["plugin", "inspect", name])) as PluginInspect[];
  const first = parsed[0];
  if (first === undefined) throw new Error(`docker plugin inspect ${name} returned nothing`);
  return first;
}

/**
 * The host directory Docker really mounts as the plugin's state: the config's mount, which
 * `docker plugin set` changes and `docker plugin upgrade` puts back to the new version's
 * default (Settings.Mounts keeps showing the old value).
 */
export function stateSourceOf(plugin: PluginInspect): string | null | undefined {
  return plugin.Config.Mounts.find((m) => m.Name === "state")?.Source;
}

/** The plugin's rootfs on the host, as Docker unpacked it from the registry. */
export async function pluginRootfs(plugin: PluginInspect): Promise<string> {
  const dataRoot = await dockerOk(["info", "--format", "{{.DockerRootDir}}"]);
  return join(dataRoot, "plugins", plugin.Id, "rootfs");
}

/** VERSION, ARCH and NODE from a plugin rootfs's /etc/thinvol-release (build/plugin.sh). */
export async function releaseOf(rootfs: string): Promise<Record<string, string>> {
  const text = await readFile(join(rootfs, "etc", "thinvol-release"), "utf8");
  return Object.fromEntries(text.split("\n").filter((l) => l.includes("=")).map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)]));
}

/** The architecture an ELF file was built for, from its header's e_machine field. */
export async function elfArch(path: string): Promise<string> {
  const handle = await open(path, "r");
  try {
    const header = Buffer.alloc(20);
    await handle.read(header, 0, 20, 0);
    if (header.toString("latin1", 1, 4) !== "ELF") throw new Error(`${path} is not an ELF file`);
    const machine = header.readUInt16LE(18);
    return ({ 0x3e: "amd64", 0xb7: "arm64" } as Record<number, string>)[machine] ?? `e_machine ${machine}`;
  } finally {
    await handle.close();
  }
}

/**
 * The code block that follows `marker` (an HTML comment) in the README: examples the
 * README shows are run as shown.
 */
export async function readmeBlock(marker: string): Promise<string> {
  const text = await readFile(join(import.meta.dirname, "..", "..", "README.md"), "utf8");
  const at = text.indexOf(marker);
  if (at < 0) throw new Error(`README.md has no ${marker}`);
  const block = /```[a-z]*\n([\s\S]*?)```/.exec(text.slice(at));
  if (block?.[1] === undefined) throw new Error(`no code block follows ${marker} in README.md`);
  return block[1];
}

/**
 * Upgrades (or downgrades) the plugin to `ref` by running the README's upgrade steps as
 * they are printed, with `thinvol` read as this run's plugin and `OWNER/thinvol:0.2.0` as
 * `ref`. Containers using its volumes are stopped before and started after, by the caller.
 */
export async function upgradePlugin(ref: string): Promise<string> {
  const steps = (await readmeBlock("<!-- upgrade steps: test/e2e/upgrade.test.ts runs them -->"))
    .replaceAll("OWNER/thinvol:0.2.0", "\0REF\0")
    .replace(/\bthinvol\b/g, env.plugin)
    .replaceAll("\0REF\0", ref);
  const r = await execa("bash", ["-euo", "pipefail", "-c", steps], { reject: false, timeout: 300_000, stdin: "ignore" });
  if (r.exitCode !== 0) throw new Error(`the README's upgrade steps failed (${r.exitCode}):\n${steps}\n${String(r.stderr)}`);
  return String(r.stdout).trim();
}

/** A request to the plugin's admin API (docs/admin-api.md), on admin.sock in STATE_DIR. */
export async function adminRequest(method: string, path: string, body?: unknown): Promise<{ status: number; json: unknown }> {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const req = httpRequest(
      {
        socketPath: join(env.stateDir, "admin.sock"),
        method,
        path,
        headers: payload === undefined ? {} : { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(payload) },
        timeout: 60_000,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () => {
          const text = Buffer.concat(chunks).toString("utf8");
          try {
            resolve({ status: res.statusCode ?? 0, json: text === "" ? undefined : (JSON.parse(text) as unknown) });
          } catch (err) {
            reject(new Error(`admin API ${method} ${path}: reply is not JSON: ${text.slice(0, 200)}`, { cause: err }));
          }
        });
      },
    );
    req.on("timeout", () => req.destroy(new Error(`admin API ${method} ${path} timed out`)));
    req.on("error", reject);
    req.end(payload);
  });
}

/**
 * Whether this build has the admin API with snapshots: `npm run build` writes the
 * `thinvol` command beside the server once they exist (dist/thinvol-cli.mjs).
 */
export const hasAdminCli = existsSync(join(import.meta.dirname, "..", "..", "dist", "thinvol-cli.mjs"));

/**
 * PostgreSQL in a container of the offline image, its cluster on a thinvol volume at /d/pg;
 * on the tier's engine, or on the one at `dockerHost`.
 */
export class Postgres {
  constructor(
    readonly container: string,
    readonly volume: string,
    readonly dockerHost?: string,
  ) {}

  /** Runs SQL as the postgres user through the container's socket; returns psql's bare output. */
  sql(statement: string): Promise<string> {
    return dockerOk(["exec", this.container, "su", "postgres", "-s", "/bin/sh", "-c", `psql -h /tmp -At -c "${statement}"`], undefined, this.dockerHost);
  }

  async ready(): Promise<void> {
    for (let i = 0; i < 300; i++) {
      const r = await docker(["exec", this.container, "su", "postgres", "-s", "/bin/sh", "-c", "pg_isready -q -h /tmp"], undefined, this.dockerHost);
      if (r.exitCode === 0) return;
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
    throw new Error(`PostgreSQL in ${this.container} did not get ready: ${(await docker(["logs", "--tail", "20", this.container], undefined, this.dockerHost)).stderr}`);
  }

  /** Starts the container; initdb on the first start only, so a restart finds its cluster. */
  async start(image: string): Promise<void> {
    const script =
      "mkdir -p /d/pg && chown postgres /d/pg && exec su postgres -s /bin/sh -c " +
      '"[ -f /d/pg/PG_VERSION ] || initdb -A trust -D /d/pg >/dev/null; exec postgres -D /d/pg -k /tmp -c listen_addresses="';
    await dockerOk(["run", "-d", "--name", this.container, "--network", "none", "--shm-size", "128m", "-v", `${this.volume}:/d`, image, "sh", "-c", script], undefined, this.dockerHost);
    await this.ready();
  }
}
