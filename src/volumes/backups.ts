import { DEFAULT_BLOCK_SIZE_BYTES } from "../backup/blocks.js";
import { createBackup, type BackupProgress, type BackupSummary } from "../backup/engine.js";
import { collectGarbage, removeBackup, type GarbageReport } from "../backup/gc.js";
import type { LeaseHolder, LeaseOptions } from "../backup/lease.js";
import { findManifest, listBackups, newBackupId, readManifest, type Manifest } from "../backup/manifest.js";
import { blocksTouching } from "../backup/plan.js";
import { verifyBackup, type VerifyReport } from "../backup/restore.js";
import type { BackupStore } from "../backup/store.js";
import { ConflictError, NotFoundError, errorMessage, inContext, quote } from "../errors.js";
import { readJsonFile, writeFileAtomic } from "../system/atomic-file.js";
import type { Logger } from "../log.js";
import type { Pool } from "../pool/types.js";
import { formatSize } from "../size.js";
import { blockProgress, type VolumeManager } from "./manager.js";
import { checkVolumeName } from "./options.js";
import type { BackupAdmin, Progress, VolumeDetail } from "./types.js";

export interface BackupServiceOptions {
  manager: VolumeManager;
  pool: Pool;
  log: Logger;
  openTarget: (url: string) => Promise<BackupStore>;
  /** Marks this process's leases at targets, so that its next start knows them for abandoned. */
  holder?: LeaseHolder;
  /** Where the targets backups were made to are listed, for `backup rm|verify ID` without a target. */
  targetsFile?: string;
}

/** A backup as `thinvol backup ls` shows it. */
export interface BackupDetail {
  id: string;
  volume: string;
  createdAt: string;
  sizeBytes: number;
  filesystem?: string;
  /** Blocks holding data, and the bytes they stand for. */
  blocks: number;
  dataBytes: number;
  previous?: string;
}

export interface BackupResult extends BackupDetail {
  target: string;
  /** Blocks read from the snapshot, blocks whose content changed since the previous backup, blocks sent. */
  blocksRead: number;
  blocksChanged: number;
  blocksUploaded: number;
  bytesRead: number;
  bytesUploaded: number;
  /** true when a snapshot of the previous backup told which blocks changed; false when every block with data was read. */
  incremental: boolean;
  durationMs: number;
}

export interface BackupRemoval extends GarbageReport {
  id: string;
  volume: string;
}

function detailOf(m: Manifest): BackupDetail {
  const d: BackupDetail = { id: m.id, volume: m.volume, createdAt: m.createdAt, sizeBytes: m.sizeBytes, blocks: m.blocks.length, dataBytes: m.blocks.length * m.blockSizeBytes };
  if (m.fs !== undefined) d.filesystem = m.fs;
  if (m.previous !== undefined) d.previous = m.previous;
  return d;
}

/**
 * Backups of volumes to a target, and what the admin API offers on them. A backup snapshots
 * the volume (a mounted filesystem is frozen only for that instant), reads the snapshot while
 * the volume stays in use, and keeps the snapshot: the next backup to the same target asks
 * the pool what changed since it and reads only that.
 */
export class BackupService implements BackupAdmin {
  constructor(private readonly o: BackupServiceOptions) {}

  /** A new volume holding a backup: `docker volume create -o backup=URL#ID` by another road. */
  async restore(url: string, id: string, rawVolume: string, progress: Progress = () => undefined): Promise<VolumeDetail> {
    const volume = checkVolumeName(rawVolume);
    // Docker's create of an existing name does nothing and succeeds; a restore must not look done.
    if (await this.o.manager.exists(volume)) throw new ConflictError(`cannot restore backup "${id}" into volume "${volume}": volume "${volume}" exists: restore into a new name`);
    await this.o.manager.create(volume, { backup: `${url}#${id}` }, progress);
    return this.o.manager.volume(volume);
  }

  async createBackup(rawVolume: string, url: string, progress: Progress = () => undefined): Promise<BackupResult> {
    const volume = checkVolumeName(rawVolume);
    const what = `cannot back up volume ${quote(volume)} to ${url}`;
    const store = await this.o.openTarget(url).catch((err: unknown) => {
      throw inContext(err, what);
    });
    await this.o.manager.volume(volume);
    const previous = await this.latest(store, volume).catch((err: unknown) => {
      throw inContext(err, `${what}: its last backup there cannot be read`);
    });
    const id = newBackupId(new Date());
    await this.rememberTarget(store.url).catch((err: unknown) => {
      this.o.log.warn("cannot record the backup target", { target: store.url, error: errorMessage(err) });
    });
    const start = await this.o.manager.startBackup(volume, store.url, id, progress);
    const snap = start.snapshot.name;
    let done = false;
    try {
      const since = previous && start.earlier.find((x) => x.name === previous.snapshot && x.backup?.id === previous.id)?.name;
      const ranges = await this.o.pool.changedRanges(volume, snap, since);
      const geometry = { sizeBytes: start.snapshot.sizeBytes, blockSizeBytes: previous?.blockSizeBytes ?? DEFAULT_BLOCK_SIZE_BYTES };
      const planned = new Set(blocksTouching(ranges, geometry));
      // Without the previous snapshot, a block that held data then may be empty now: read it to know.
      if (previous && since === undefined) for (const [i] of previous.blocks) if (i * geometry.blockSizeBytes < geometry.sizeBytes) planned.add(i);
      progress(
        `backing up volume "${volume}" to ${store.url}: ${planned.size} blocks to read` +
          (previous ? (since ? `, changed since backup ${previous.id}` : ` (the snapshot of backup ${previous.id} is gone: every block with data is read)`) : " (first backup there)"),
      );
      const reader = await this.o.pool.openSnapshot(volume, snap);
      let summary: BackupSummary;
      try {
        summary = await createBackup({
          store,
          volume,
          snapshotName: snap,
          device: reader.path,
          sizeBytes: start.snapshot.sizeBytes,
          blocksToRead: [...planned],
          ...(previous ? { previous } : {}),
          id,
          fs: start.fs,
          onProgress: blockProgress(progress, (p: BackupProgress) => `read ${p.blocksDone}/${p.blocksTotal} blocks (${formatSize(p.bytesRead)}), sent ${formatSize(p.bytesUploaded)}, ${formatSize(p.bytesPerSecond)}/s`),
          ...this.leaseOptions(),
        });
      } finally {
        await reader.release();
      }
      done = true;
      const result: BackupResult = {
        ...detailOf(summary.manifest),
        target: store.url,
        blocksRead: summary.blocksRead,
        blocksChanged: summary.blocksChanged,
        blocksUploaded: summary.blocksUploaded,
        bytesRead: summary.bytesRead,
        bytesUploaded: summary.bytesUploaded,
        incremental: since !== undefined,
        durationMs: summary.durationMs,
      };
      this.o.log.info("backup created", {
        volume,
        backup: id,
        target: store.url,
        incremental: result.incremental,
        read: summary.blocksRead,
        changed: summary.blocksChanged,
        uploaded: summary.blocksUploaded,
        bytes: summary.bytesUploaded,
        ms: summary.durationMs,
      });
      return result;
    } catch (err) {
      throw inContext(err, what);
    } finally {
      await this.o.manager.finishBackup(volume, store.url, snap, done).catch((err: unknown) => {
        this.o.log.warn("cannot tidy the snapshots of a backup; the next backup or the volume's removal will", { volume, snapshot: snap, error: errorMessage(err) });
      });
    }
  }

  private leaseOptions(): LeaseOptions {
    return this.o.holder ? { holder: this.o.holder } : {};
  }

  /** The newest backup of the volume at the target, if any. */
  private async latest(store: BackupStore, volume: string): Promise<Manifest | undefined> {
    const last = (await listBackups(store, volume)).at(-1);
    return last && readManifest(store, last.volume, last.id);
  }

  async backups(url: string, rawVolume?: string): Promise<BackupDetail[]> {
    const volume = rawVolume === undefined ? undefined : checkVolumeName(rawVolume);
    const store = await this.o.openTarget(url);
    const out: BackupDetail[] = [];
    for (const b of await listBackups(store, volume)) out.push(detailOf(await readManifest(store, b.volume, b.id)));
    return out;
  }

  /**
   * The store and record of backup `id`: at `url`, or, without one, at whichever target
   * this plugin has backed up to holds it.
   */
  private async locate(url: string | undefined, id: string): Promise<{ store: BackupStore; m: Manifest }> {
    if (url !== undefined) {
      const store = await this.o.openTarget(url);
      return { store, m: await findManifest(store, id) };
    }
    const known = await this.knownTargets();
    for (const target of known) {
      const store = await this.o.openTarget(target).catch(() => undefined);
      const m = store && (await findManifest(store, id).catch(() => undefined));
      if (store && m) return { store, m };
    }
    throw new NotFoundError(
      `backup ${quote(id)} is at none of the targets this plugin has backed up to${known.length > 0 ? ` (${known.join(", ")})` : ""}; give its target (--to URL)`,
    );
  }

  /** The targets backups were made to, oldest first (kept in STATE_DIR). */
  private async knownTargets(): Promise<string[]> {
    if (this.o.targetsFile === undefined) return [];
    const raw = await readJsonFile(this.o.targetsFile).catch(() => undefined);
    return Array.isArray(raw) ? raw.filter((t): t is string => typeof t === "string") : [];
  }

  private async rememberTarget(url: string): Promise<void> {
    if (this.o.targetsFile === undefined) return;
    const known = await this.knownTargets();
    if (known.includes(url)) return;
    await writeFileAtomic(this.o.targetsFile, `${JSON.stringify([...known, url])}\n`);
  }

  /** Forgets a backup, then deletes the blocks no other backup at the target names. */
  async removeBackup(url: string | undefined, id: string): Promise<BackupRemoval> {
    const { store, m } = await this.locate(url, id);
    await removeBackup(store, m.volume, m.id);
    const report = await collectGarbage(store, this.leaseOptions());
    this.o.log.info("backup removed", { backup: m.id, volume: m.volume, target: store.url, blocksDeleted: report.blocksDeleted });
    return { id: m.id, volume: m.volume, ...report };
  }

  async verifyBackup(url: string | undefined, id: string): Promise<VerifyReport & { id: string; volume: string }> {
    const { store, m } = await this.locate(url, id);
    return { id: m.id, volume: m.volume, ...(await verifyBackup({ store, manifest: m })) };
  }
}
