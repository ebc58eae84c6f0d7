/**
 * What the end-to-end scenarios share: the docker CLI against the test engine, a
 * container from the offline busybox image, and what the host sees (mounts, pool
 * files). Everything goes through argument arrays; nothing through a shell string
 * on the host (the `sh -c` scripts run inside the test containers).
 */
import { randomBytes } from "node:crypto";
import { readdir, stat } from "node:fs/promises";
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

/** Runs the docker CLI; never throws for a non-zero exit. */
export async function docker(args: readonly string[], timeoutMs = 120_000): Promise<Result> {
  const r = await execa("docker", args, { reject: false, timeout: timeoutMs, stdin: "ignore" });
  if (r.timedOut) throw new Error(`docker ${args.join(" ")} timed out after ${timeoutMs} ms`);
  return { stdout: String(r.stdout), stderr: String(r.stderr), exitCode: r.exitCode ?? -1 };
}

/** Runs the docker CLI and returns its stdout; a failure throws with the CLI's message. */
export async function dockerOk(args: readonly string[], timeoutMs?: number): Promise<string> {
  const r = await docker(args, timeoutMs);
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
