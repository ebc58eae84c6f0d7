import { createHash } from "node:crypto";
import { promisify } from "node:util";
import { gunzip, gzip } from "node:zlib";

const MiB = 1024 * 1024;

/**
 * 2 MiB backup blocks. A power of two from 64 KiB up, so every dm-thin pool block size this
 * project allows up to 2 MiB fits a whole number of times and a pool block never straddles two
 * backup blocks. Large enough that a TiB is half a million objects, not the 16 million of
 * 64 KiB blocks (an S3 request costs the same whatever its size, and latency adds up), and
 * that a fully written TiB's record stays near 40 MB; small enough that a 4 KiB write costs
 * one 2 MiB upload, not more. Convoy chose the same.
 */
export const DEFAULT_BLOCK_SIZE_BYTES = 2 * MiB;
export const MIN_BLOCK_SIZE_BYTES = 64 * 1024;
export const MAX_BLOCK_SIZE_BYTES = 64 * MiB;

/**
 * gzip at level 1. Node 20 has no zstd. Level 1 runs at well over 100 MB/s a core, on
 * libuv's thread pool, so the plugin's event loop keeps serving Docker meanwhile; higher
 * levels cost several times the CPU for a few percent. Brotli at a low quality compresses
 * a little better at a similar speed, but gzip is what any rescue system can read: a block
 * is `gunzip < blocks/ab/cd/<digest>`, without thinvol.
 */
export const COMPRESSION = "gzip";
const GZIP_LEVEL = 1;

const gzipAsync = promisify(gzip);
const gunzipAsync = promisify(gunzip);

/** Lowercase hex SHA-256 of the block's uncompressed bytes: its name at the target. */
export function digestOf(data: Uint8Array): string {
  return createHash("sha256").update(data).digest("hex");
}

export const DIGEST_PATTERN = /^[0-9a-f]{64}$/;

export function compressBlock(data: Uint8Array): Promise<Buffer> {
  return gzipAsync(data, { level: GZIP_LEVEL });
}

/**
 * Decompresses a stored block, refusing to produce more than `maxBytes`: a hostile or
 * damaged object cannot make the restore allocate gigabytes.
 */
export function decompressBlock(data: Uint8Array, maxBytes: number): Promise<Buffer> {
  return gunzipAsync(data, { maxOutputLength: maxBytes });
}

/** Zeros to compare against (memcmp is far faster than a loop in JavaScript), grown on demand. */
let zeros = new Uint8Array(0);

/** True when every byte is zero: such a block is left out of a backup and never written back. */
export function isZeroBlock(data: Uint8Array): boolean {
  if (zeros.byteLength < data.byteLength) zeros = new Uint8Array(data.byteLength);
  return Buffer.from(data.buffer, data.byteOffset, data.byteLength).equals(zeros.subarray(0, data.byteLength));
}

/** Backup blocks in a volume of `sizeBytes`; the last one may be short. */
export function blockCount(sizeBytes: number, blockSizeBytes: number): number {
  return Math.ceil(sizeBytes / blockSizeBytes);
}

/** The byte range of block `index`: the last block ends at the volume's end. */
export function blockRange(index: number, sizeBytes: number, blockSizeBytes: number): { offset: number; length: number } {
  const offset = index * blockSizeBytes;
  return { offset, length: Math.min(blockSizeBytes, sizeBytes - offset) };
}

/** Where a block lives at the target: two levels of 256 directories keep each directory small. */
export function blockKey(digest: string): string {
  return `blocks/${digest.slice(0, 2)}/${digest.slice(2, 4)}/${digest}`;
}

/** The digest a block key names, or undefined for any other key. */
export function digestOfKey(key: string): string | undefined {
  const m = /^blocks\/([0-9a-f]{2})\/([0-9a-f]{2})\/([0-9a-f]{64})$/.exec(key);
  return m && m[3]?.startsWith(`${m[1]}${m[2]}`) ? m[3] : undefined;
}
