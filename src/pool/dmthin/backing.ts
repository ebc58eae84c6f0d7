import { open, stat } from "node:fs/promises";
import { allocateFileRange } from "../../system/extents.js";
import type { Runner } from "../../system/runner.js";

const MiB = 1024 * 1024;

/** The kernel ignores metadata beyond about 15.9 GiB (255 × 2^14 blocks of 4 KiB). */
export const MAX_METADATA_BYTES = 255 * 2 ** 14 * 4096;

/** dm-thin metadata needs about 48 bytes per data block; at least 2 MiB, whole MiB. */
export function metadataSizeFor(dataBytes: number, blockSizeSectors: number): number {
  const want = Math.ceil((48 * dataBytes) / (blockSizeSectors * 512));
  return Math.min(MAX_METADATA_BYTES, Math.max(2 * MiB, Math.ceil(want / MiB) * MiB));
}

/** The file's size, or undefined when it does not exist. */
export async function fileSize(path: string): Promise<number | undefined> {
  try {
    return (await stat(path)).size;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw err;
  }
}

/** Creates `path` sparse, or grows it to `size`; never shrinks it. Returns its size. */
export async function growSparseFile(path: string, size: number): Promise<number> {
  const handle = await open(path, "a", 0o600);
  try {
    const current = (await handle.stat()).size;
    if (current >= size) return current;
    await handle.truncate(size);
    await handle.sync();
    return size;
  } finally {
    await handle.close();
  }
}

/**
 * Allocates `path` on the host from its start to `size` (creating it, 0600, and growing it;
 * never shrinking), so writes to it can never fail for want of host space. An allocated
 * range is left as it is; holes in it are filled.
 */
export async function allocateFile(runner: Runner, path: string, size: number): Promise<void> {
  await growSparseFile(path, 0);
  await allocateFileRange(runner, path, { offset: 0, length: size });
}

/**
 * True when the first 4 KiB are zero: the kernel will format the metadata when
 * the pool is created, and thin_check would call it damaged.
 */
export async function metadataIsBlank(path: string): Promise<boolean> {
  const handle = await open(path, "r");
  try {
    const buf = Buffer.alloc(4096);
    const { bytesRead } = await handle.read(buf, 0, buf.length, 0);
    return buf.subarray(0, bytesRead).every((b) => b === 0);
  } finally {
    await handle.close();
  }
}

/** A loop device's `major:minor`, as dm tables print it. */
export async function loopDeviceNumber(runner: Runner, device: string): Promise<string> {
  const { stdout } = await runner.run("losetup", ["--list", "--noheadings", "--output", "MAJ:MIN", device]);
  const n = stdout.trim().replace(/\s+/g, "");
  if (!/^\d+:\d+$/.test(n)) throw new Error(`losetup printed no device number for ${device}: ${JSON.stringify(stdout)}`);
  return n;
}
