import { errorMessage } from "../errors.js";
import type { Logger } from "../log.js";
import { readFile, realpath } from "node:fs/promises";
import { basename } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
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
 * The loop device already backed by `file`, or a new one with direct I/O, so
 * blocks are not cached twice. A filesystem without O_DIRECT (tmpfs, for one)
 * refuses direct I/O: then the loop device is made without it.
 */
export async function attachOrReuseLoop(runner: Runner, file: string, log: Logger, options: { sectorSize?: 512 | 4096 } = {}): Promise<string> {
  const existing = await loopsOf(runner, file);
  if (existing[0] !== undefined) return existing[0];
  try {
    return await attachLoop(runner, file, { ...options, directIo: true });
  } catch (err) {
    log.warn("loop device without direct I/O (the file's filesystem refused it); pages are cached twice", { file, error: errorMessage(err) });
    return attachLoop(runner, file, options);
  }
}

/** The file a loop device is bound to, from sysfs (no process started); undefined when unbound. */
async function backingFile(device: string): Promise<string | undefined> {
  try {
    return (await readFile(`/sys/block/${basename(device)}/loop/backing_file`, "utf8")).trim();
  } catch {
    return undefined;
  }
}

/**
 * Detaches every loop device of `file` and waits until the kernel has really let go of
 * it (which happens a moment after the detach, longer on a busy machine). Resolves to
 * false if it still holds the file after `timeoutMs`.
 */
export async function detachLoopsOf(runner: Runner, file: string, timeoutMs: number): Promise<boolean> {
  const devices = await loopsOf(runner, file);
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
