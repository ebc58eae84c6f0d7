import type { ByteRange, Extent } from "../system/extents.js";
import type { Runner } from "../system/runner.js";
import { blockCount } from "./blocks.js";

/**
 * Which backup blocks to read. A plan may name more blocks than changed (a whole 2 MiB
 * block is read for one changed pool block), never fewer: the engine carries every block
 * not in the plan over from the previous backup unchanged.
 */
export interface Geometry {
  sizeBytes: number;
  blockSizeBytes: number;
}

/** The sorted, distinct backup blocks that any byte of `ranges` falls in (ranges past the end are cut). */
export function blocksTouching(ranges: readonly ByteRange[], g: Geometry): number[] {
  const count = blockCount(g.sizeBytes, g.blockSizeBytes);
  const blocks = new Set<number>();
  for (const r of ranges) {
    if (r.length <= 0 || r.offset >= g.sizeBytes) continue;
    const first = Math.floor(Math.max(0, r.offset) / g.blockSizeBytes);
    const last = Math.min(count - 1, Math.floor((r.offset + r.length - 1) / g.blockSizeBytes));
    for (let i = first; i <= last; i++) blocks.add(i);
  }
  return [...blocks].sort((a, b) => a - b);
}

/** Every block: for a first backup when nothing says which blocks hold data (zero blocks are skipped as they are read). */
export function allBlocks(g: Geometry): number[] {
  return Array.from({ length: blockCount(g.sizeBytes, g.blockSizeBytes) }, (_, i) => i);
}

/** A first backup on the loop pool: the blocks the volume's image file has allocated (from its fiemap). */
export function allocatedBlocks(extents: readonly Extent[], g: Geometry): number[] {
  return blocksTouching(
    extents.map((e) => ({ offset: e.fileOffset, length: e.length })),
    g,
  );
}

/**
 * An incremental backup on the loop pool. Snapshots there are reflink copies, so a byte
 * that still lies at the same place on the pool's device in both snapshot images was not
 * written in between; every other allocated byte of the new snapshot may have changed. A
 * range allocated before and a hole now reads as zeros, so it counts as changed too (it is
 * read, and dropped from the new record).
 */
export function changedRangesFromExtents(previous: readonly Extent[], current: readonly Extent[]): ByteRange[] {
  const fileRange = (e: Extent): ByteRange => ({ offset: e.fileOffset, length: e.length });
  // Previous extents by their shift (device offset - file offset): only those can map a byte of `e` to the same place.
  const byShift = new Map<number, ByteRange[]>();
  for (const p of previous) {
    const shift = p.deviceOffset - p.fileOffset;
    byShift.set(shift, [...(byShift.get(shift) ?? []), fileRange(p)]);
  }
  const changed: ByteRange[] = [];
  for (const e of current) changed.push(...uncovered(fileRange(e), byShift.get(e.deviceOffset - e.fileOffset) ?? []));
  const now = mergeRanges(current.map(fileRange));
  for (const p of previous) changed.push(...uncovered(fileRange(p), now));
  return mergeRanges(changed);
}

export function changedBlocksFromExtents(previous: readonly Extent[], current: readonly Extent[], g: Geometry): number[] {
  return blocksTouching(changedRangesFromExtents(previous, current), g);
}

/** Sorted, non-overlapping, adjacent ranges joined; empty ones dropped. */
export function mergeRanges(ranges: readonly ByteRange[]): ByteRange[] {
  const sorted = ranges.filter((r) => r.length > 0).sort((a, b) => a.offset - b.offset);
  const out: ByteRange[] = [];
  for (const r of sorted) {
    const last = out.at(-1);
    if (last && r.offset <= last.offset + last.length) last.length = Math.max(last.length, r.offset + r.length - last.offset);
    else out.push({ offset: r.offset, length: r.length });
  }
  return out;
}

/** The parts of `range` that none of `covers` overlaps. */
function uncovered(range: ByteRange, covers: readonly ByteRange[]): ByteRange[] {
  const end = range.offset + range.length;
  const parts: ByteRange[] = [];
  let at = range.offset;
  // `covers` is sorted when it comes from mergeRanges; a binary search would serve huge maps, a filter serves today's.
  const overlapping = covers.filter((c) => c.offset < end && c.offset + c.length > range.offset).sort((a, b) => a.offset - b.offset);
  for (const c of overlapping) {
    if (c.offset > at) parts.push({ offset: at, length: c.offset - at });
    at = Math.max(at, c.offset + c.length);
  }
  if (at < end) parts.push({ offset: at, length: end - at });
  return parts;
}

export type ThinDeltaKind = "same" | "different" | "left_only" | "right_only";

/** A run of the thin devices' blocks, in units of the pool's data blocks. */
export interface ThinDeltaRange {
  kind: ThinDeltaKind;
  begin: number;
  length: number;
}

export interface ThinDelta {
  /** The pool's data block size, in 512-byte sectors. */
  dataBlockSizeSectors: number;
  ranges: ThinDeltaRange[];
}

const KINDS: ReadonlySet<string> = new Set<ThinDeltaKind>(["same", "different", "left_only", "right_only"]);
const SECTOR_BYTES = 512;

function attributes(text: string): Map<string, string> {
  return new Map([...text.matchAll(/([a-z_]+)="([^"]*)"/g)].map((m) => [m[1] ?? "", m[2] ?? ""]));
}

function naturalAttribute(attrs: Map<string, string>, name: string, element: string): number {
  const text = attrs.get(name);
  const n = Number(text);
  if (text === undefined || !/^\d+$/.test(text) || !Number.isSafeInteger(n)) {
    throw new Error(`thin_delta output has <${element}> with ${name}=${JSON.stringify(text ?? null)}, not a number`);
  }
  return n;
}

/**
 * Parses `thin_delta` XML (thin-provisioning-tools, C++ 0.x and Rust 1.x print the same):
 *
 *     <superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="1600">
 *       <diff left="1" right="2">
 *         <same begin="0" length="16"/>
 *         <different begin="16" length="2"/>
 *         <right_only begin="18" length="4"/>
 *       </diff>
 *     </superblock>
 *
 * `begin` and `length` count the thin devices' blocks (virtual, not where they lie in the
 * pool). With --verbose the runs are `<range .../>` elements inside a `<different>` (etc.).
 */
export function parseThinDelta(xml: string): ThinDelta {
  let dataBlockSizeSectors: number | undefined;
  const ranges: ThinDeltaRange[] = [];
  let open: ThinDeltaKind | undefined;
  for (const m of xml.matchAll(/<(\/?)([a-z_]+)([^>]*?)(\/?)>/g)) {
    const [, closing, element = "", rest = "", selfClosing] = m;
    if (closing) {
      if (element === open) open = undefined;
      continue;
    }
    const attrs = attributes(rest);
    if (element === "superblock") dataBlockSizeSectors = naturalAttribute(attrs, "data_block_size", element);
    else if (KINDS.has(element) && !selfClosing) open = element as ThinDeltaKind;
    else if (KINDS.has(element) || (element === "range" && open !== undefined)) {
      const kind = (element === "range" ? open : element) as ThinDeltaKind;
      ranges.push({ kind, begin: naturalAttribute(attrs, "begin", element), length: naturalAttribute(attrs, "length", element) });
    }
  }
  if (dataBlockSizeSectors === undefined || dataBlockSizeSectors === 0) {
    throw new Error("thin_delta output has no <superblock data_block_size=...>: is it thin_delta's XML?");
  }
  return { dataBlockSizeSectors, ranges };
}

/**
 * The byte ranges that changed between the previous backup's snapshot (left) and this
 * one's (right): different and right_only runs changed; left_only runs are now unmapped
 * and read as zeros, so they count too (they are read, and dropped from the new record).
 */
export function changedRangesFromThinDelta(delta: ThinDelta): ByteRange[] {
  const poolBlockBytes = delta.dataBlockSizeSectors * SECTOR_BYTES;
  return mergeRanges(delta.ranges.filter((r) => r.kind !== "same").map((r) => ({ offset: r.begin * poolBlockBytes, length: r.length * poolBlockBytes })));
}

/**
 * The byte ranges a thin device maps, from thin_delta of the device against itself (where
 * every mapped run is "same"): a first backup reads only these, the rest reads as zeros.
 */
export function mappedRangesFromThinDelta(delta: ThinDelta): ByteRange[] {
  const poolBlockBytes = delta.dataBlockSizeSectors * SECTOR_BYTES;
  return mergeRanges(delta.ranges.filter((r) => r.kind !== "left_only").map((r) => ({ offset: r.begin * poolBlockBytes, length: r.length * poolBlockBytes })));
}

/** Sorted ranges cut at `sizeBytes` (a pool block may reach past a device's end): nothing at or past it. */
export function cutRanges(ranges: readonly ByteRange[], sizeBytes: number): ByteRange[] {
  return ranges.filter((r) => r.offset < sizeBytes).map((r) => ({ offset: r.offset, length: Math.min(r.length, sizeBytes - r.offset) }));
}

export function changedBlocksFromThinDelta(delta: ThinDelta, g: Geometry): number[] {
  return blocksTouching(changedRangesFromThinDelta(delta), g);
}

/** A thin_delta can walk every mapping of a large pool: longer than a plain command. */
const THIN_DELTA_TIMEOUT_MS = 300_000;

/**
 * Runs thin_delta between two thin devices of a live pool, by their numeric ids. The caller
 * reserves a metadata snapshot first (`dmsetup message POOL 0 reserve_metadata_snap`) and
 * releases it after: thin_delta reads that frozen copy, not the live metadata.
 */
export async function readThinDelta(runner: Runner, metadataDevice: string, leftId: number, rightId: number): Promise<ThinDelta> {
  const args = ["--metadata-snap", "--snap1", String(leftId), "--snap2", String(rightId), metadataDevice];
  const { stdout } = await runner.run("thin_delta", args, { timeoutMs: THIN_DELTA_TIMEOUT_MS });
  return parseThinDelta(stdout);
}
