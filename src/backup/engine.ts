import { open, type FileHandle } from "node:fs/promises";
import { errorMessage, InvalidRequestError, quote, ThinvolError } from "../errors.js";
import { checkSnapshotName, checkVolumeName } from "../volumes/options.js";
import { blockCount, blockKey, blockRange, compressBlock, COMPRESSION, DEFAULT_BLOCK_SIZE_BYTES, digestOf, isZeroBlock } from "./blocks.js";
import { Lease, type LeaseOptions } from "./lease.js";
import { BACKUP_ID_PATTERN, manifestKey, MANIFEST_FORMAT, newBackupId, serializeManifest, type BlockEntry, type Manifest } from "./manifest.js";
import { DEFAULT_CONCURRENCY, forEachConcurrently } from "./parallel.js";
import { allBlocks } from "./plan.js";
import type { BackupStore } from "./store.js";

export interface BackupProgress {
  blocksDone: number;
  blocksTotal: number;
  bytesRead: number;
  bytesUploaded: number;
  bytesPerSecond: number;
}

export interface CreateBackupOptions extends LeaseOptions {
  store: BackupStore;
  volume: string;
  snapshotName: string;
  /** The snapshot's device, or a file: read only. */
  device: string;
  sizeBytes: number;
  /** From plan.ts: every block that may differ from `previous` (or, without it, every block that may hold data). */
  blocksToRead: readonly number[];
  /** The volume's last backup at this target: blocks not read are carried over from it. */
  previous?: Manifest;
  /** For a first backup only; an incremental one keeps its previous backup's. */
  blockSizeBytes?: number;
  /** The backup's id (newBackupId); a new one by default. */
  id?: string;
  /** The volume's filesystem, recorded for a restore. */
  fs?: "ext4" | "xfs";
  onProgress?: (progress: BackupProgress) => void;
  concurrency?: number;
}

export interface BackupSummary {
  manifest: Manifest;
  blocksRead: number;
  /** Blocks whose content differs from the previous backup's (all data blocks for a first backup). */
  blocksChanged: number;
  blocksZero: number;
  blocksUploaded: number;
  /** Blocks read that the target already held (from an interrupted run, or another volume). */
  blocksAlreadyStored: number;
  bytesRead: number;
  /** Compressed bytes sent to the target. */
  bytesUploaded: number;
  durationMs: number;
}

/**
 * Backs up a snapshot's device: reads the planned blocks, uploads those the target lacks,
 * and writes the record last, so a backup is listed only once every block it names is
 * stored. An interrupted backup leaves no record; running it again uploads only what the
 * first run did not store.
 */
export async function createBackup(o: CreateBackupOptions): Promise<BackupSummary> {
  const started = Date.now();
  const now = o.now ?? (() => new Date());
  const volume = checkVolumeName(o.volume);
  const snapshot = checkSnapshotName(o.snapshotName);
  const blockSize = blockSizeFor(o);
  if (!Number.isSafeInteger(o.sizeBytes) || o.sizeBytes <= 0 || o.sizeBytes % 512 !== 0) {
    throw new InvalidRequestError(`cannot back up volume ${quote(volume)}: size ${o.sizeBytes} is not a positive multiple of 512`);
  }
  const count = blockCount(o.sizeBytes, blockSize);
  const id = o.id ?? newBackupId(now());
  if (!BACKUP_ID_PATTERN.test(id)) throw new InvalidRequestError(`invalid backup id ${quote(id)}`);
  const what = `backup ${quote(id)} of volume ${quote(volume)}`;
  const lease = await Lease.acquire(o.store, "backup", what, o);
  let handle: FileHandle | undefined;
  try {
    // Only now, with the lease held, is a previous record still there proof that its blocks are.
    const previous = o.previous && (await o.store.has(manifestKey(o.previous.volume, o.previous.id))) ? o.previous : undefined;
    const digests = new Map<number, string>(previous?.blocks.filter(([i]) => i < count) ?? []);
    // A previous record removed meanwhile cannot be built on: the plan against it is of no use, so read everything.
    const toRead = previous === undefined && o.previous !== undefined ? new Set(allBlocks({ sizeBytes: o.sizeBytes, blockSizeBytes: blockSize })) : planned(o, count, what);
    // The previous last block was shorter if the volume has grown since: its content is not comparable.
    if (previous && previous.sizeBytes !== o.sizeBytes && previous.sizeBytes % blockSize !== 0) toRead.add(Math.floor(previous.sizeBytes / blockSize));
    const indices = [...toRead].filter((i) => i < count).sort((a, b) => a - b);

    handle = await open(o.device, "r");
    const s = { blocksRead: 0, blocksChanged: 0, blocksZero: 0, blocksUploaded: 0, blocksAlreadyStored: 0, bytesRead: 0, bytesUploaded: 0 };
    const uploads = new Map<string, Promise<number | undefined>>();
    const device = handle;
    await forEachConcurrently(indices, o.concurrency ?? DEFAULT_CONCURRENCY, async (index) => {
      const range = blockRange(index, o.sizeBytes, blockSize);
      const data = await readBlock(device, range, o.device).catch((err: unknown) => {
        throw new ThinvolError(`${what} failed reading block ${index} of ${o.device}: ${errorMessage(err)}`, { cause: err });
      });
      s.blocksRead++;
      s.bytesRead += range.length;
      const before = digests.get(index);
      if (isZeroBlock(data)) {
        s.blocksZero++;
        if (before !== undefined) s.blocksChanged++;
        digests.delete(index);
      } else {
        const digest = digestOf(data);
        if (digest !== before) s.blocksChanged++;
        digests.set(index, digest);
        // One upload per content, even when several blocks of this backup share it.
        const earlier = uploads.get(digest);
        const upload = earlier ?? uploadBlock(o.store, digest, data);
        if (earlier === undefined) uploads.set(digest, upload);
        const stored = await upload.catch((err: unknown) => {
          throw new ThinvolError(`${what} failed storing block ${index} at ${o.store.url}: ${errorMessage(err)}`, { cause: err });
        });
        if (stored === undefined || earlier !== undefined) s.blocksAlreadyStored++;
        else {
          s.blocksUploaded++;
          s.bytesUploaded += stored;
        }
      }
      await lease.refreshIfDue();
      const elapsed = Math.max(1, Date.now() - started) / 1000;
      o.onProgress?.({ blocksDone: s.blocksRead, blocksTotal: indices.length, bytesRead: s.bytesRead, bytesUploaded: s.bytesUploaded, bytesPerSecond: Math.round(s.bytesRead / elapsed) });
    });

    const blocks: BlockEntry[] = [...digests.entries()].sort((a, b) => a[0] - b[0]);
    const manifest: Manifest = {
      format: MANIFEST_FORMAT,
      id,
      volume,
      snapshot,
      createdAt: now().toISOString(),
      sizeBytes: o.sizeBytes,
      blockSizeBytes: blockSize,
      compression: COMPRESSION,
      ...(o.fs !== undefined ? { fs: o.fs } : {}),
      ...(previous ? { previous: previous.id } : {}),
      blocks,
    };
    await lease.confirm();
    await o.store.put(manifestKey(volume, id), Buffer.from(serializeManifest(manifest)));
    return { manifest, ...s, durationMs: Date.now() - started };
  } finally {
    await handle?.close();
    // A lease left behind (the target unreachable now) only goes stale; it must not hide the real outcome.
    await lease.release().catch(() => undefined);
  }
}

function blockSizeFor(o: CreateBackupOptions): number {
  if (o.previous === undefined) return o.blockSizeBytes ?? DEFAULT_BLOCK_SIZE_BYTES;
  if (o.previous.volume !== o.volume) {
    throw new InvalidRequestError(`cannot back up volume ${quote(o.volume)} incrementally to backup ${quote(o.previous.id)}: that is a backup of volume ${quote(o.previous.volume)}`);
  }
  if (o.blockSizeBytes !== undefined && o.blockSizeBytes !== o.previous.blockSizeBytes) {
    throw new InvalidRequestError(`cannot back up volume ${quote(o.volume)} with ${o.blockSizeBytes}-byte blocks incrementally to backup ${quote(o.previous.id)}, which has ${o.previous.blockSizeBytes}-byte blocks`);
  }
  return o.previous.blockSizeBytes;
}

/** The caller's plan, checked: an index past the end is a bug upstream, not something to skip. */
function planned(o: CreateBackupOptions, count: number, what: string): Set<number> {
  for (const i of o.blocksToRead) {
    if (!Number.isSafeInteger(i) || i < 0 || i >= count) throw new InvalidRequestError(`${what}: planned block ${i} is not within the volume's ${count} blocks`);
  }
  return new Set(o.blocksToRead);
}

/** Reads a whole block with positioned reads (a device may return less than asked). */
async function readBlock(handle: FileHandle, range: { offset: number; length: number }, device: string): Promise<Buffer> {
  const buffer = Buffer.alloc(range.length);
  let done = 0;
  while (done < range.length) {
    const { bytesRead } = await handle.read(buffer, done, range.length - done, range.offset + done);
    if (bytesRead === 0) throw new Error(`${device} ends at byte ${range.offset + done}, before the volume's end`);
    done += bytesRead;
  }
  return buffer;
}

/** Stores a block unless the target has it; returns the compressed bytes sent, or undefined when it was there. */
async function uploadBlock(store: BackupStore, digest: string, data: Buffer): Promise<number | undefined> {
  const key = blockKey(digest);
  if (await store.has(key)) return undefined;
  const compressed = await compressBlock(data);
  await store.put(key, compressed);
  return compressed.byteLength;
}

