import { errorMessage } from "../errors.js";
import type { Logger } from "../log.js";
import type { Runner } from "./runner.js";

/** Attaches `file` to a free loop device and returns the device path. */
export async function attachLoop(runner: Runner, file: string, options: { directIo?: boolean } = {}): Promise<string> {
  const args = ["--find", "--show"];
  if (options.directIo) args.push("--direct-io=on");
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
export async function attachOrReuseLoop(runner: Runner, file: string, log: Logger): Promise<string> {
  const existing = await loopsOf(runner, file);
  if (existing[0] !== undefined) return existing[0];
  try {
    return await attachLoop(runner, file, { directIo: true });
  } catch (err) {
    log.warn("loop device without direct I/O (the file's filesystem refused it); pages are cached twice", { file, error: errorMessage(err) });
    return attachLoop(runner, file);
  }
}
