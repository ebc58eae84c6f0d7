import { errorMessage } from "../errors.js";
import type { Logger } from "../log.js";
import { readFile, readdir, realpath } from "node:fs/promises";
import { basename } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import * as v from "valibot";
import type { Runner } from "./runner.js";

/** Attaches `file` to a free loop device and returns the device path. */
export interface LoopOptions {
  directIo?: boolean;
  /**
   * Logical sector size. Unset, the kernel picks it, and for a direct-I/O device that
   * follows the backing file: an image on XFS turns from 512 to 4096 once it shares
   * extents with a reflink copy, and a filesystem made for 512 would no longer mount.
   */
  sectorSize?: 512 | 4096;
}

export async function attachLoop(runner: Runner, file: string, options: LoopOptions = {}): Promise<string> {
  const args = ["--find", "--show"];
  if (options.directIo) args.push("--direct-io=on");
  if (options.sectorSize !== undefined) args.push("--sector-size", String(options.sectorSize));
  args.push(file);
  const { stdout } = await runner.run("losetup", args);
  const dev = stdout.trim().split("\n").pop()?.trim() ?? "";
  if (!dev.startsWith("/dev/")) throw new Error(`losetup attached ${file} but printed no device: ${JSON.stringify(stdout)}`);
  return dev;
}

/** The loop devices currently backed by `file` (usually zero or one). */
export async function loopsOf(runner: Runner, file: string): Promise<string[]> {
  const { stdout } = await runner.run("losetup", ["--list", "--noheadings", "--output", "NAME", "--associated", file]);
  return stdout
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l.startsWith("/dev/"));
}

/** Detaches a loop device. */
export async function detachLoop(runner: Runner, device: string): Promise<void> {
  await runner.run("losetup", ["--detach", device]);
}

/** Makes a loop device see its backing file's new size. */
export async function refreshLoopSize(runner: Runner, device: string): Promise<void> {
  await runner.run("losetup", ["--set-capacity", device]);
}

/**
 * The loop device already backed by `file` (found by inode, so also one attached by an
 * earlier instance of the plugin), or a new one (see attachDirectLoop).
 */
export async function attachOrReuseLoop(runner: Runner, file: string, log: Logger, options: { sectorSize?: 512 | 4096 } = {}): Promise<string> {
  const existing = await loopsOf(runner, file);
  if (existing[0] !== undefined) return existing[0];
  return attachDirectLoop(runner, file, log, options);
}

/**
 * A new loop device with direct I/O, so blocks are not cached twice. A filesystem without
 * O_DIRECT (tmpfs, for one) refuses direct I/O: then the loop device is made without it.
 */
export async function attachDirectLoop(runner: Runner, file: string, log: Logger, options: { sectorSize?: 512 | 4096 } = {}): Promise<string> {
  try {
    return await attachLoop(runner, file, { ...options, directIo: true });
  } catch (err) {
    log.warn("loop device without direct I/O (the file's filesystem refused it); pages are cached twice", { file, error: errorMessage(err) });
    return attachLoop(runner, file, options);
  }
}

const SYS_BLOCK = "/sys/block";

/**
 * The loop devices bound to `file` by its path, read from sysfs: no process is started,
 * so this serves Mount and Unmount. A device attached by a plugin instance whose mount
 * namespace is gone may show another path; losetup's lookup by inode (loopsOf) finds it.
 */
export async function loopsByPath(file: string): Promise<string[]> {
  const path = await realpath(file);
  const names = (await readdir(SYS_BLOCK)).filter((n) => n.startsWith("loop"));
  const bound = await Promise.all(names.map(async (n) => ((await backingFile(n)) === path ? `/dev/${n}` : undefined)));
  return bound.filter((d): d is string => d !== undefined).sort();
}

export interface AttachedLoop {
  device: string;
  /** The backing file's inode and its filesystem's device (major:minor). */
  inode: number;
  fsDevice: string;
}

const LoopListSchema = v.object({
  loopdevices: v.array(
    v.object({
      name: v.string(),
      "back-ino": v.union([v.number(), v.pipe(v.string(), v.transform(Number))]),
      "back-maj:min": v.string(),
    }),
  ),
});

/** Every attached loop device with its backing file's identity: one process for all. */
export async function listLoops(runner: Runner): Promise<AttachedLoop[]> {
  const { stdout } = await runner.run("losetup", ["--list", "--json", "--output", "NAME,BACK-INO,BACK-MAJ:MIN"]);
  if (stdout.trim() === "") return [];
  const parsed = v.parse(LoopListSchema, JSON.parse(stdout));
  return parsed.loopdevices.map((d) => ({ device: d.name, inode: d["back-ino"], fsDevice: d["back-maj:min"].trim() }));
}

/** The file a loop device is bound to, from sysfs (no process started); undefined when unbound. */
export async function backingFile(device: string): Promise<string | undefined> {
  try {
    return (await readFile(`${SYS_BLOCK}/${basename(device)}/loop/backing_file`, "utf8")).trim();
  } catch {
    return undefined;
  }
}

/**
 * Detaches the loop devices of `file` (by default those found by path, else by inode) and
 * waits until the kernel has really let go of it (which happens a moment after the
 * detach, longer on a busy machine). Resolves to false if it still holds the file after
 * `timeoutMs`.
 */
export async function detachLoopsOf(runner: Runner, file: string, timeoutMs: number): Promise<boolean> {
  let devices = await loopsByPath(file);
  if (devices.length === 0) devices = await loopsOf(runner, file);
  const path = await realpath(file);
  for (const dev of devices) await detachLoop(runner, dev);
  const deadline = Date.now() + timeoutMs;
  for (let pause = 2; ; pause = Math.min(pause * 2, 100)) {
    const held = await Promise.all(devices.map(async (d) => (await backingFile(d)) === path));
    if (!held.includes(true)) return true;
    if (Date.now() > deadline) return false;
    await sleep(pause);
  }
}
