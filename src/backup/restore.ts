import { open, stat, type FileHandle } from "node:fs/promises";
import { errorMessage, InvalidRequestError, quote } from "../errors.js";
import { blockKey, blockRange, decompressBlock, digestOf } from "./blocks.js";
import { BackupDamagedError, MissingBlockError } from "./errors.js";
import type { Manifest } from "./manifest.js";
import { DEFAULT_CONCURRENCY, forEachConcurrently } from "./parallel.js";
import type { BackupStore } from "./store.js";

export interface RestoreProgress {
  blocksDone: number;
  blocksTotal: number;
  bytesWritten: number;
}

export interface RestoreOptions {
  store: BackupStore;
  manifest: Manifest;
  /**
   * Where to write: a new thin volume's device, or a file path (created, or truncated and
   * made sparse). Blocks the backup does not name are not written, so the target must read
   * zeros there, as a new thin volume and a new sparse file do; it then stays thin.
   */
  device: string;
  onProgress?: (progress: RestoreProgress) => void;
  concurrency?: number;
}

export interface RestoreSummary {
  blocksWritten: number;
  bytesWritten: number;
  durationMs: number;
}

function describe(m: Manifest): string {
  return `backup ${quote(m.id)} of volume ${quote(m.volume)}`;
}

/** A stored block, decompressed and checked against its digest and its place's length. */
async function fetchBlock(store: BackupStore, m: Manifest, index: number, digest: string): Promise<Buffer> {
  const key = blockKey(digest);
  const { length } = blockRange(index, m.sizeBytes, m.blockSizeBytes);
  const stored = await store.get(key);
  if (stored === undefined) throw new MissingBlockError(`${describe(m)}: block ${index} (${key}) is missing at ${store.url}`);
  let data: Buffer;
  try {
    data = await decompressBlock(stored, m.blockSizeBytes);
  } catch (err) {
    throw new BackupDamagedError(`${describe(m)}: block ${index} (${key}) at ${store.url} does not decompress: ${errorMessage(err)}`, { cause: err });
  }
  if (data.byteLength !== length || digestOf(data) !== digest) {
    throw new BackupDamagedError(`${describe(m)}: block ${index} (${key}) at ${store.url} is corrupt: its content does not match its digest`);
  }
  return data;
}

/** Opens the restore target: a block device as it is, a file (new or not) emptied to the backup's size. */
async function openTarget(path: string, m: Manifest): Promise<FileHandle> {
  const st = await stat(path).catch((err: NodeJS.ErrnoException) => {
    if (err.code === "ENOENT") return undefined;
    throw err;
  });
  if (st?.isBlockDevice()) return open(path, "r+");
  if (st !== undefined && !st.isFile()) throw new InvalidRequestError(`cannot restore ${describe(m)} to ${quote(path)}: not a file or block device`);
  const handle = await open(path, "w", 0o600);
  await handle.truncate(m.sizeBytes);
  return handle;
}

/** Writes a backup back: every block it names at its offset, each checked before it is written. */
export async function restoreBackup(o: RestoreOptions): Promise<RestoreSummary> {
  const started = Date.now();
  const m = o.manifest;
  const handle = await openTarget(o.device, m);
  let bytesWritten = 0;
  let blocksDone = 0;
  try {
    await forEachConcurrently(m.blocks, o.concurrency ?? DEFAULT_CONCURRENCY, async ([index, digest]) => {
      const data = await fetchBlock(o.store, m, index, digest);
      const { offset } = blockRange(index, m.sizeBytes, m.blockSizeBytes);
      await handle.write(data, 0, data.byteLength, offset);
      bytesWritten += data.byteLength;
      blocksDone++;
      o.onProgress?.({ blocksDone, blocksTotal: m.blocks.length, bytesWritten });
    });
    await handle.sync();
  } finally {
    await handle.close();
  }
  return { blocksWritten: blocksDone, bytesWritten, durationMs: Date.now() - started };
}

export interface VerifyReport {
  ok: boolean;
  blocksChecked: number;
  /** Block indices whose object is absent. */
  missing: number[];
  /** Block indices whose object does not decompress or does not match its digest. */
  damaged: number[];
}

/** Reads every block a backup names (each distinct content once) and reports which are missing or damaged. */
export async function verifyBackup(o: { store: BackupStore; manifest: Manifest; concurrency?: number }): Promise<VerifyReport> {
  const m = o.manifest;
  const byDigest = new Map<string, number[]>();
  for (const [index, digest] of m.blocks) byDigest.set(digest, [...(byDigest.get(digest) ?? []), index]);
  const missing: number[] = [];
  const damaged: number[] = [];
  await forEachConcurrently([...byDigest.entries()], o.concurrency ?? DEFAULT_CONCURRENCY, async ([digest, indices]) => {
    try {
      const data = await fetchBlock(o.store, m, indices[0] as number, digest);
      // The same content at the volume's short last block and at a full one cannot both be right.
      for (const i of indices) if (blockRange(i, m.sizeBytes, m.blockSizeBytes).length !== data.byteLength) damaged.push(i);
    } catch (err) {
      if (!(err instanceof BackupDamagedError)) throw err;
      (err instanceof MissingBlockError ? missing : damaged).push(...indices);
    }
  });
  missing.sort((a, b) => a - b);
  damaged.sort((a, b) => a - b);
  return { ok: missing.length === 0 && damaged.length === 0, blocksChecked: m.blocks.length, missing, damaged };
}
