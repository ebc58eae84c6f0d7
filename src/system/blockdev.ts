import type { Runner } from "./runner.js";

/** A block device's size in bytes. */
export async function deviceSizeBytes(runner: Runner, device: string): Promise<number> {
  const { stdout } = await runner.run("blockdev", ["--getsize64", device]);
  const n = Number(stdout.trim());
  if (!Number.isSafeInteger(n)) throw new Error(`blockdev printed no size for ${device}: ${JSON.stringify(stdout)}`);
  return n;
}

/** Tells the device that every block is unused, so a thin pool can take the space back. */
export async function discardDevice(runner: Runner, device: string): Promise<void> {
  // Discarding a large thin device can take a while; Docker allows Remove 60 s.
  await runner.run("blkdiscard", [device], { timeoutMs: 50_000 });
}
