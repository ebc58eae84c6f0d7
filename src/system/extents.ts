import type { Runner } from "./runner.js";

/** A byte range of a file, or of the device under a filesystem. */
export interface ByteRange {
  offset: number;
  length: number;
}

/** An extent of a file: where its bytes lie on the filesystem's device. */
export interface Extent {
  fileOffset: number;
  deviceOffset: number;
  length: number;
}

/** fiemap reports in 512-byte units. */
const FIEMAP_UNIT = 512;

/**
 * Parses `xfs_io -c "fiemap START LEN"` output. Lines look like
 * `3: [2048..4095]: 96..2143` (file range, then device range, inclusive, in 512-byte
 * units); holes read `[..]: hole` and are left out.
 */
export function parseFiemap(text: string): Extent[] {
  const extents: Extent[] = [];
  for (const line of text.split("\n")) {
    const m = /^\s*\d+:\s*\[(\d+)\.\.(\d+)\]:\s*(\d+)\.\.(\d+)/.exec(line);
    if (!m) continue;
    const [fileStart, fileEnd, devStart] = [m[1], m[2], m[3]].map(Number) as [number, number, number];
    extents.push({
      fileOffset: fileStart * FIEMAP_UNIT,
      deviceOffset: devStart * FIEMAP_UNIT,
      length: (fileEnd - fileStart + 1) * FIEMAP_UNIT,
    });
  }
  return extents;
}

/** Where the bytes `range` of `file` lie on its filesystem's device (holes left out). */
export async function fileExtents(runner: Runner, file: string, range: ByteRange): Promise<Extent[]> {
  if (range.length <= 0) return [];
  const { stdout } = await runner.run("xfs_io", ["-r", "-c", `fiemap ${range.offset} ${range.length}`, file]);
  return parseFiemap(stdout);
}

/** Allocates real blocks for `range` of `file` without changing its size or contents. */
export async function allocateRange(runner: Runner, file: string, range: ByteRange): Promise<void> {
  await runner.run("fallocate", ["--keep-size", "--offset", String(range.offset), "--length", String(range.length), file]);
}

/** Commands per xfs_io process: keeps the argument list far below the kernel's limit. */
const RANGES_PER_COMMAND = 256;

/**
 * Allocates real blocks for every range of `file` (sizes unchanged), with one process per
 * few hundred ranges. xfs_io carries on past a failed range and then exits non-zero.
 */
export async function allocateRanges(runner: Runner, file: string, ranges: readonly ByteRange[]): Promise<void> {
  for (let i = 0; i < ranges.length; i += RANGES_PER_COMMAND) {
    const args = ranges.slice(i, i + RANGES_PER_COMMAND).flatMap((r) => ["-c", `falloc -k ${r.offset} ${r.length}`]);
    const { stderr } = await runner.run("xfs_io", [...args, file]);
    if (stderr.trim() !== "") throw new Error(`xfs_io could not allocate ranges of ${file}: ${stderr.trim()}`);
  }
}

/** The parts of [0, size) that no range covers, in order. */
export function gapsBetween(ranges: readonly ByteRange[], size: number): ByteRange[] {
  const gaps: ByteRange[] = [];
  let at = 0;
  for (const r of [...ranges].sort((a, b) => a.offset - b.offset)) {
    if (r.offset > at) gaps.push({ offset: at, length: Math.min(r.offset, size) - at });
    at = Math.max(at, r.offset + r.length);
    if (at >= size) break;
  }
  if (at < size) gaps.push({ offset: at, length: size - at });
  return gaps.filter((g) => g.length > 0);
}

/** Gives the blocks of `range` of `file` back to its filesystem; the range then reads as zeros. */
export async function punchRange(runner: Runner, file: string, range: ByteRange): Promise<void> {
  await runner.run("fallocate", ["--punch-hole", "--offset", String(range.offset), "--length", String(range.length), file]);
}

/** Makes `file` at least `offset + length` bytes long, with real blocks for that range. */
export async function allocateFileRange(runner: Runner, file: string, range: ByteRange): Promise<void> {
  await runner.run("fallocate", ["--offset", String(range.offset), "--length", String(range.length), file]);
}
