import { chmod, chown, mkdir, rm, rmdir, statfs } from "node:fs/promises";
import { join } from "node:path";
import { findManifest } from "../backup/manifest.js";
import type { Manifest } from "../backup/manifest.js";
import { restoreBackup } from "../backup/restore.js";
import type { BackupStore } from "../backup/store.js";
import { ConflictError, InvalidRequestError, NotFoundError, ThinvolError, errorMessage, inContext } from "../errors.js";
import type { Logger } from "../log.js";
import type { Pool, PoolUsage } from "../pool/types.js";
import { formatSize } from "../size.js";
import { baseMountOptions, formatFilesystem, growExt4Offline, growFilesystem, thawFilesystem, type FsType } from "../system/filesystem.js";
import { CAP_SYS_RESOURCE, hasCapability } from "../system/capabilities.js";
import { mountDevice, readMounts, unmount, type MountEntry } from "../system/mount.js";
import type { Runner } from "../system/runner.js";
import { KeyedLock } from "../locks.js";
import { checkSize, checkSnapshotName, checkVolumeName, parseCreateOptions } from "./options.js";
import type { RecordStore, SnapshotRecord, VolumeRecord } from "./records.js";
import type {
  AdminService,
  PoolDetail,
  Progress,
  ResizeResult,
  SnapshotDetail,
  VolumeDetail,
  VolumeInfo,
  VolumeService,
  VolumeSummary,
} from "./types.js";

export interface VolumeManagerOptions {
  pool: Pool;
  records: RecordStore;
  runner: Runner;
  log: Logger;
  mountDir: string;
  defaultSizeBytes: number;
  defaultFs: FsType;
  /** MIN_FREE_SPACE, for the figures the admin API shows; the pool enforces it. */
  minFreePercent: number;
  /** Reads the mount table; tests substitute their own. */
  readMounts?: () => Promise<MountEntry[]>;
  /** Whether a mounted ext4 filesystem can grow (CAP_SYS_RESOURCE); tests substitute their own. */
  canGrowExt4Online?: () => Promise<boolean>;
  /** Opens a backup target (`-o backup=URL#ID`); without it, restores are refused. */
  openBackupTarget?: (url: string) => Promise<BackupStore>;
}

/** Snapshots a backup takes are named so; users cannot take such names. */
export const BACKUP_SNAPSHOT_PREFIX = "backup-";

function totalReferences(record: VolumeRecord): number {
  let total = 0;
  for (const count of record.mounts.values()) total += count;
  return total;
}

/** A volume's loop device (loop pool) goes with its mount, in the same command. */
const DETACH = { detachLoop: true } as const;

/** Node's chown leaves an owner or group of -1 as it is. */
const UNCHANGED_ID = -1;

const noProgress: Progress = () => undefined;

/** A long copy reports its progress at most this often. */
const PROGRESS_INTERVAL_MS = 1000;

/** A copy's progress for a person: about once a second, and always the last step. */
export function blockProgress<P extends { blocksDone: number; blocksTotal: number }>(progress: Progress, describe: (p: P) => string): (p: P) => void {
  let last = 0;
  return (p) => {
    if (Date.now() - last < PROGRESS_INTERVAL_MS && p.blocksDone < p.blocksTotal) return;
    last = Date.now();
    progress(describe(p));
  };
}

export interface BackupStart {
  snapshot: SnapshotDetail;
  fs: FsType;
  /** Snapshots earlier backups of the volume to the same target left, oldest first. */
  earlier: SnapshotRecord[];
}

const quoteNames = (names: readonly string[]) => names.map((n) => `"${n}"`).join(", ");

/**
 * The volume lifecycle: records, options, mount references and the order of
 * steps that keeps a crash from losing or leaking anything. Every step that
 * changes the system is preceded by a saved intent (state "creating" or
 * "removing") that recover() finishes or undoes.
 */
export class VolumeManager implements VolumeService, AdminService {
  private readonly locks = new KeyedLock();
  /** Backups running, by volume: such a volume is not removed meanwhile. */
  private readonly backupsRunning = new Map<string, number>();
  private readonly readMounts: () => Promise<MountEntry[]>;

  private readonly canGrowExt4Online: () => Promise<boolean>;

  constructor(private readonly o: VolumeManagerOptions) {
    this.readMounts = o.readMounts ?? (() => readMounts());
    this.canGrowExt4Online = o.canGrowExt4Online ?? (() => hasCapability(CAP_SYS_RESOURCE));
  }

  /** Whether a volume of that name exists (being created or removed counts). */
  async exists(name: string): Promise<boolean> {
    return (await this.o.records.get(checkVolumeName(name))) !== undefined;
  }

  mountpointOf(name: string): string {
    return join(this.o.mountDir, name);
  }

  private async isMounted(name: string): Promise<boolean> {
    const target = this.mountpointOf(name);
    return (await this.readMounts()).some((m) => m.mountPoint === target);
  }

  private async load(name: string): Promise<VolumeRecord> {
    const record = await this.o.records.get(name);
    if (!record || record.state === "removing") throw new NotFoundError(`volume "${name}" does not exist`);
    if (record.state === "creating") throw new ConflictError(`volume "${name}" is still being created`);
    return record;
  }

  // ---- create ----------------------------------------------------------------

  async create(rawName: string, rawOptions: Readonly<Record<string, string>> | null, progress: Progress = noProgress): Promise<void> {
    const name = checkVolumeName(rawName);
    const options = parseCreateOptions(name, rawOptions);
    // The backup's record is read before anything changes: a wrong id or target changes nothing.
    const restoreFrom = options.backup && (await this.findBackup(name, options.backup.url, options.backup.id));
    const lockKeys = options.from ? [name, options.from] : [name];
    await this.locks.with(lockKeys, async () => {
      const existing = await this.o.records.get(name);
      if (existing?.state === "ready") return; // Docker expects Create to be idempotent.
      // Leftovers of an earlier attempt that could not be cleaned up at the time.
      if (existing?.state === "creating") {
        try {
          await this.destroy(name);
        } catch (err) {
          throw new ThinvolError(`cannot create volume "${name}": the leftovers of an earlier attempt cannot be removed: ${errorMessage(err)}`, { cause: err });
        }
      }
      if (existing?.state === "removing") await this.finishRemove(existing);

      let origin: VolumeRecord | undefined;
      let snapshot: SnapshotRecord | undefined;
      let fs: FsType;
      let sizeBytes: number;
      if (options.from !== undefined) {
        const source = options.fromSnapshot === undefined ? `"${options.from}"` : `"${options.from}@${options.fromSnapshot}"`;
        origin = await this.o.records.get(options.from);
        if (!origin || origin.state !== "ready") {
          throw new NotFoundError(`cannot create volume "${name}" as a clone of ${source}: volume "${options.from}" does not exist`);
        }
        if (options.fromSnapshot !== undefined) {
          snapshot = origin.snapshots?.find((s) => s.name === options.fromSnapshot && s.state === "ready");
          if (!snapshot) {
            throw new NotFoundError(
              `cannot create volume "${name}" as a clone of ${source}: volume "${options.from}" has no snapshot "${options.fromSnapshot}" (thinvol snapshot ls ${options.from})`,
            );
          }
        }
        const originSize = snapshot?.sizeBytes ?? origin.sizeBytes;
        if (options.fs !== undefined && options.fs !== origin.fs) {
          throw new ConflictError(`cannot create volume "${name}": a clone has its origin's filesystem (${origin.fs}), not ${options.fs}`);
        }
        if (options.sizeBytes !== undefined && options.sizeBytes !== originSize) {
          throw new ConflictError(
            `cannot create volume "${name}": a clone has its origin's size (${formatSize(originSize)}); leave out the size option, and grow it afterwards with thinvol resize`,
          );
        }
        fs = origin.fs;
        sizeBytes = originSize;
      } else if (restoreFrom) {
        fs = restoreFrom.manifest.fs as FsType;
        sizeBytes = restoreFrom.manifest.sizeBytes;
      } else {
        fs = options.fs ?? this.o.defaultFs;
        sizeBytes = checkSize(name, options.sizeBytes ?? this.o.defaultSizeBytes, fs);
      }
      // The intent saved below lets a failed or interrupted create be undone by removing the
      // name from the pool. That is safe only if the name was free when the intent was saved.
      if ((await this.o.pool.list()).includes(name)) {
        throw new ConflictError(
          `cannot create volume "${name}": the ${this.o.pool.driver} pool already holds data under that name with no record ` +
            `of a volume (a record lost or removed by hand); that data is kept, not overwritten: use another name, or move the data away`,
        );
      }

      const record: VolumeRecord = {
        name,
        state: "creating",
        createdAt: new Date().toISOString(),
        sizeBytes,
        fs,
        mountOptions: options.mountOptions,
        mounts: new Map(),
      };
      if (origin) record.origin = snapshot ? `${origin.name}@${snapshot.name}` : origin.name;
      if (restoreFrom) record.origin = `${restoreFrom.store.url}#${restoreFrom.manifest.id}`;
      if (options.uid !== undefined) record.uid = options.uid;
      if (options.gid !== undefined) record.gid = options.gid;
      if (options.mode !== undefined) record.mode = options.mode;
      await this.o.records.save(record);

      try {
        if (origin && snapshot) {
          // A snapshot is never written: nothing to freeze.
          await this.o.pool.clone(name, origin.name, { snapshot: snapshot.name });
        } else if (origin) {
          await this.o.pool.clone(name, origin.name, await this.quiesceOptions(origin));
        } else {
          await this.o.pool.create(name, sizeBytes);
        }
        if (restoreFrom) await this.restoreInto(name, restoreFrom, progress);
        await this.prepareFilesystem(record, !origin && !restoreFrom);
        record.state = "ready";
        await this.o.records.save(record);
      } catch (err) {
        await this.undoCreate(name);
        if (err instanceof ThinvolError) throw err;
        throw new ThinvolError(`cannot create volume "${name}": ${errorMessage(err)}`, { cause: err });
      }
    });
  }

  /** A mounted origin is frozen for the instant of a copy (a clone or a snapshot). */
  private async quiesceOptions(origin: VolumeRecord): Promise<{ originMountpoint?: string }> {
    const mounted = totalReferences(origin) > 0 && (await this.isMounted(origin.name));
    return mounted ? { originMountpoint: this.mountpointOf(origin.name) } : {};
  }

  /** The backup a `backup=URL#ID` option names, read and checked: it must say which filesystem it holds. */
  private async findBackup(name: string, url: string, id: string): Promise<{ store: BackupStore; manifest: Manifest }> {
    const what = `cannot create volume "${name}" from backup "${id}" at ${url}`;
    if (!this.o.openBackupTarget) throw new InvalidRequestError(`${what}: this server has no backup targets`);
    try {
      const store = await this.o.openBackupTarget(url);
      const manifest = await findManifest(store, id);
      if (manifest.fs === undefined) throw new InvalidRequestError(`the backup does not record its filesystem`);
      return { store, manifest };
    } catch (err) {
      throw inContext(err, what);
    }
  }

  /** Writes a backup into the new volume's empty device: only the blocks it names, so the volume stays thin. */
  private async restoreInto(name: string, from: { store: BackupStore; manifest: Manifest }, progress: Progress): Promise<void> {
    const device = await this.o.pool.activate(name);
    const m = from.manifest;
    progress(`restoring backup "${m.id}" of volume "${m.volume}" (${formatSize(m.sizeBytes)}, ${m.blocks.length} blocks) into volume "${name}"`);
    try {
      const summary = await restoreBackup({
        store: from.store,
        manifest: m,
        device,
        onProgress: blockProgress(progress, (p) => `restored ${p.blocksDone}/${p.blocksTotal} blocks (${formatSize(p.bytesWritten)})`),
      });
      this.o.log.info("volume restored from a backup", { volume: name, backup: m.id, from: from.store.url, blocks: summary.blocksWritten, bytes: summary.bytesWritten, ms: summary.durationMs });
    } finally {
      await this.o.pool.deactivate(name);
    }
  }

  /** Makes the filesystem (for a new volume) and sets up its root directory. */
  private async prepareFilesystem(record: VolumeRecord, fresh: boolean): Promise<void> {
    const needsRootSetup = fresh || record.uid !== undefined || record.gid !== undefined || record.mode !== undefined;
    const device = await this.o.pool.activate(record.name);
    try {
      if (fresh) await formatFilesystem(this.o.runner, device, record.fs, record.name, record.sizeBytes);
      if (!needsRootSetup) return;
      const target = this.mountpointOf(record.name);
      await mkdir(target, { recursive: true });
      await mountDevice(this.o.runner, device, target, record.fs, baseMountOptions(record.fs));
      try {
        // An empty volume lets Docker copy the image's files in and lets databases initialise.
        if (fresh) await rm(join(target, "lost+found"), { recursive: true, force: true });
        if (record.uid !== undefined || record.gid !== undefined) {
          // An owner given alone keeps the root's group (a clone's is its origin's), and a group alone the owner.
          await chown(target, record.uid ?? UNCHANGED_ID, record.gid ?? UNCHANGED_ID);
        }
        if (record.mode !== undefined) await chmod(target, record.mode);
      } finally {
        await unmount(this.o.runner, target, DETACH);
      }
    } finally {
      await this.o.pool.deactivate(record.name);
    }
  }

  /**
   * Best-effort rollback of a create that failed or was interrupted. Everything under the
   * name in the pool is this create's own: create() saves its intent only after checking
   * that the pool does not hold the name.
   */
  private async undoCreate(name: string): Promise<void> {
    try {
      await this.destroy(name);
    } catch (err) {
      this.o.log.error("could not undo a failed create; it will be retried at the next start", { volume: name, error: errorMessage(err) });
    }
  }

  // ---- remove ----------------------------------------------------------------

  async remove(rawName: string): Promise<void> {
    const name = checkVolumeName(rawName);
    // A clone being made from this volume holds its lock too, so it is finished before this runs.
    await this.locks.with(name, async () => {
      const record = await this.o.records.get(name);
      if (!record) return; // Already gone: Remove is idempotent.
      if (record.state === "creating") throw new ConflictError(`volume "${name}" is still being created`);
      if (record.state === "removing") {
        await this.finishRemove(record);
        return;
      }
      if ((this.backupsRunning.get(name) ?? 0) > 0) {
        throw new ConflictError(`cannot remove volume "${name}": a backup of it is running; try again when it is done`);
      }
      const snapshots = (record.snapshots ?? []).filter((x) => x.backup === undefined).map((x) => x.name);
      if (snapshots.length > 0) {
        throw new ConflictError(
          `cannot remove volume "${name}": it has ${snapshots.length === 1 ? "a snapshot" : "snapshots"} ${quoteNames(snapshots)}; ` +
            `remove ${snapshots.length === 1 ? "it" : "them"} first with ${snapshots.map((x) => `thinvol snapshot rm ${name} ${x}`).join(" and ")}`,
        );
      }
      // The snapshots backups took only tell the next backup what changed: they go with the volume.
      for (const x of record.snapshots ?? []) await this.dropSnapshot(record, x.name);
      // Docker calls Remove only when no container uses the volume, so a mount left behind is
      // forced away. It goes before the intent is saved: if it fails (busy), nothing has changed.
      if (await this.isMounted(name)) {
        try {
          await unmount(this.o.runner, this.mountpointOf(name), DETACH);
        } catch (err) {
          throw new ThinvolError(`cannot remove volume "${name}": ${errorMessage(err)}`, { cause: err });
        }
      }
      // References now explain no mount; a crash from here on must not leave them behind.
      record.mounts = new Map();
      record.state = "removing";
      await this.o.records.save(record);
      await this.finishRemove(record);
    });
  }

  /**
   * Finishes a remove whose intent is saved. If the pool refuses (a busy device), the pool
   * still holds the volume and it is put back as it was, so it is not hidden from Docker
   * and the next start does not delete it.
   */
  private async finishRemove(record: VolumeRecord): Promise<void> {
    try {
      await this.destroy(record.name);
    } catch (err) {
      const failure = new ThinvolError(`cannot remove volume "${record.name}": ${errorMessage(err)}`, { cause: err });
      // The pool's remove is all or nothing, so the pool says which of the two happened.
      let held: boolean;
      try {
        held = (await this.o.pool.list()).includes(record.name);
      } catch {
        throw failure; // The intent stays, for the next start.
      }
      if (!held) {
        // The pool removed it; only a later step failed. The remove is done but for its record.
        this.o.log.warn("the pool removed the volume but a later step failed", { volume: record.name, error: errorMessage(err) });
        await this.o.records.delete(record.name);
        await rmdir(this.mountpointOf(record.name)).catch(() => undefined);
        return;
      }
      await this.restore(record).catch((restoreErr: unknown) => {
        this.o.log.error("cannot put back the record of a volume whose remove failed", { volume: record.name, error: errorMessage(restoreErr) });
      });
      throw failure;
    }
  }

  /** Puts back a volume whose remove failed, with the references that its mount state explains. */
  private async restore(record: VolumeRecord): Promise<void> {
    record.state = "ready";
    if (!(await this.isMounted(record.name))) record.mounts = new Map();
    await this.o.records.save(record);
  }

  /**
   * Unmounts the volume if it is mounted, then has the pool remove it, record last: a
   * crash on the way leaves the record, and its intent, for the next start. The device is
   * left active for the pool, which discards its blocks before removing it.
   */
  private async destroy(name: string): Promise<void> {
    if (await this.isMounted(name)) await unmount(this.o.runner, this.mountpointOf(name), DETACH);
    await this.o.pool.remove(name);
    await this.o.records.delete(name);
    await rmdir(this.mountpointOf(name)).catch(() => undefined);
  }

  /** Unmounts (if mounted) and deactivates a volume. */
  private async teardown(name: string): Promise<void> {
    if (await this.isMounted(name)) await unmount(this.o.runner, this.mountpointOf(name), DETACH);
    await this.o.pool.deactivate(name);
  }

  // ---- mount -----------------------------------------------------------------

  async mount(rawName: string, id: string): Promise<string> {
    const name = checkVolumeName(rawName);
    return this.locks.with(name, async () => {
      const record = await this.load(name);
      const target = this.mountpointOf(name);
      if (!(await this.isMounted(name))) {
        const device = await this.o.pool.activate(name);
        try {
          await mkdir(target, { recursive: true });
          await mountDevice(this.o.runner, device, target, record.fs, [...baseMountOptions(record.fs), ...record.mountOptions]);
        } catch (err) {
          await this.o.pool.deactivate(name).catch(() => undefined);
          throw new ThinvolError(`cannot mount volume "${name}": ${errorMessage(err)}`, { cause: err });
        }
      }
      record.mounts.set(id, (record.mounts.get(id) ?? 0) + 1);
      await this.o.records.save(record);
      return target;
    });
  }

  async unmount(rawName: string, id: string): Promise<void> {
    const name = checkVolumeName(rawName);
    await this.locks.with(name, async () => {
      const record = await this.load(name);
      const count = record.mounts.get(id);
      if (count === undefined) {
        this.o.log.warn("unmount for a mount ID that holds no reference", { volume: name, id });
      } else {
        if (count <= 1) record.mounts.delete(id);
        else record.mounts.set(id, count - 1);
        // Saved before the teardown: Docker forgets this reference even when the teardown fails,
        // and a reference kept for it would keep the volume mounted for ever. The teardown is
        // retried by the next Unmount that drops the last reference, or by the next start.
        await this.o.records.save(record);
      }
      if (totalReferences(record) === 0) {
        try {
          await this.teardown(name);
        } catch (err) {
          throw new ThinvolError(`cannot unmount volume "${name}": ${errorMessage(err)}`, { cause: err });
        }
      }
    });
  }

  // ---- queries ---------------------------------------------------------------

  async path(rawName: string): Promise<string | undefined> {
    const name = checkVolumeName(rawName);
    await this.load(name);
    return (await this.isMounted(name)) ? this.mountpointOf(name) : undefined;
  }

  async get(rawName: string): Promise<VolumeInfo> {
    const name = checkVolumeName(rawName);
    const record = await this.load(name);
    const mounted = await this.isMounted(name);
    const status: Record<string, string | number> = {
      size: formatSize(record.sizeBytes),
      sizeBytes: record.sizeBytes,
      filesystem: record.fs,
      mounts: totalReferences(record),
      poolDriver: this.o.pool.driver,
    };
    if (record.origin !== undefined) status["origin"] = record.origin;
    if (record.mountOptions.length > 0) status["mountOptions"] = record.mountOptions.join(",");
    const snapshots = readySnapshots(record);
    if (snapshots.length > 0) status["snapshots"] = snapshots.map((x) => x.name).join(",");
    const fsUse = mounted ? await this.filesystemUse(name) : undefined;
    if (fsUse) {
      status["used"] = formatSize(fsUse.usedBytes);
      status["usedBytes"] = fsUse.usedBytes;
      status["available"] = formatSize(fsUse.availableBytes);
    }
    try {
      const allocated = await this.o.pool.allocatedBytes(name);
      status["allocated"] = formatSize(allocated);
      status["allocatedBytes"] = allocated;
      const usage = await this.o.pool.usage();
      status["pool"] = describePool(usage);
      status["poolUsedBytes"] = usage.dataUsedBytes;
      status["poolSizeBytes"] = usage.dataTotalBytes;
      if (usage.hostReservedBytes !== undefined) status["hostReservedBytes"] = usage.hostReservedBytes;
      if (usage.hostFreeBytes !== undefined) status["hostFreeBytes"] = usage.hostFreeBytes;
    } catch (err) {
      status["poolError"] = errorMessage(err);
    }
    const info: VolumeInfo = { name, createdAt: record.createdAt, status };
    if (mounted) info.mountpoint = this.mountpointOf(name);
    return info;
  }

  /** What a mounted volume's filesystem holds and has free; undefined (logged) when it cannot be read. */
  private async filesystemUse(name: string): Promise<{ usedBytes: number; availableBytes: number } | undefined> {
    try {
      const s = await statfs(this.mountpointOf(name));
      return { usedBytes: (s.blocks - s.bfree) * s.bsize, availableBytes: s.bavail * s.bsize };
    } catch (err) {
      this.o.log.warn("cannot read filesystem usage", { volume: name, error: errorMessage(err) });
      return undefined;
    }
  }

  async list(): Promise<VolumeSummary[]> {
    const mounted = new Set((await this.readMounts()).map((m) => m.mountPoint));
    const out: VolumeSummary[] = [];
    for (const name of await this.o.records.names()) {
      const record = await this.o.records.get(name).catch(() => undefined);
      if (record?.state !== "ready") continue;
      const summary: VolumeSummary = { name, createdAt: record.createdAt };
      if (mounted.has(this.mountpointOf(name))) summary.mountpoint = this.mountpointOf(name);
      out.push(summary);
    }
    return out;
  }

  // ---- resize ------------------------------------------------------------------

  /**
   * Grows a volume and its filesystem, online if a container uses it. The intent (resizeTo)
   * is saved first; the pool's resize and the filesystem's growth each do nothing when done
   * already, so start-up can run both again after a crash and the two end up agreeing.
   */
  async resize(rawName: string, sizeBytes: number, progress: Progress = noProgress): Promise<ResizeResult> {
    const name = checkVolumeName(rawName);
    return this.locks.with(name, async () => {
      const record = await this.load(name);
      const to = checkSize(name, sizeBytes, record.fs, "resize");
      const previous = record.sizeBytes;
      if (to < previous) {
        throw new ConflictError(
          `cannot resize volume "${name}" to ${formatSize(to)}: it is ${formatSize(previous)}, and a volume never shrinks ` +
            `(its filesystem cannot shrink while in use); make a smaller volume and copy the data`,
        );
      }
      if (to === previous) return { name, previousSizeBytes: previous, sizeBytes: previous };
      if (record.fs === "ext4" && !(await this.canGrowExt4Online()) && (await this.isMounted(name))) {
        throw new ConflictError(
          `cannot resize volume "${name}" while it is mounted: growing a mounted ext4 filesystem needs the CAP_SYS_RESOURCE capability, ` +
            `which this host does not give the plugin; stop the containers that use it and resize again (it then grows offline), or use xfs, which grows mounted`,
        );
      }
      record.resizeTo = to;
      await this.o.records.save(record);
      await this.finishResize(record, progress);
      return { name, previousSizeBytes: previous, sizeBytes: to };
    });
  }

  private async finishResize(record: VolumeRecord, progress: Progress): Promise<void> {
    const { name } = record;
    const to = record.resizeTo;
    if (to === undefined) return;
    try {
      progress(`growing the device of volume "${name}" to ${formatSize(to)}`);
      await this.o.pool.resize(name, to);
      progress(`growing the ${record.fs} filesystem of volume "${name}"`);
      await this.growFilesystem(record);
    } catch (err) {
      // The intent stays: the next start finishes the resize (both steps only grow).
      throw explained(err, name, `cannot resize volume "${name}" to ${formatSize(to)}`);
    }
    this.o.log.info("volume resized", { volume: name, from: formatSize(record.sizeBytes), to: formatSize(to) });
    record.sizeBytes = to;
    delete record.resizeTo;
    await this.o.records.save(record);
  }

  /**
   * Grows the filesystem to its device: where it is mounted, or mounted for the purpose (the
   * kernel's growth is journalled, so a crash cannot tear it). Only an ext4 volume on a host
   * that withholds CAP_SYS_RESOURCE grows unmounted, checked first, with resize2fs.
   */
  private async growFilesystem(record: VolumeRecord): Promise<void> {
    const target = this.mountpointOf(record.name);
    if (await this.isMounted(record.name)) {
      await growFilesystem(this.o.runner, await this.o.pool.activate(record.name), target, record.fs);
      return;
    }
    const device = await this.o.pool.activate(record.name);
    if (record.fs === "ext4" && !(await this.canGrowExt4Online())) {
      try {
        await growExt4Offline(this.o.runner, device);
      } finally {
        await this.o.pool.deactivate(record.name);
      }
      return;
    }
    try {
      await mkdir(target, { recursive: true });
      await mountDevice(this.o.runner, device, target, record.fs, baseMountOptions(record.fs));
      try {
        await growFilesystem(this.o.runner, device, target, record.fs);
      } finally {
        await unmount(this.o.runner, target, DETACH);
      }
    } finally {
      await this.o.pool.deactivate(record.name);
    }
  }

  // ---- snapshots ---------------------------------------------------------------

  async createSnapshot(rawVolume: string, rawSnapshot: string, progress: Progress = noProgress): Promise<SnapshotDetail> {
    const name = checkVolumeName(rawVolume);
    const snap = checkSnapshotName(rawSnapshot);
    if (snap.startsWith(BACKUP_SNAPSHOT_PREFIX)) {
      throw new InvalidRequestError(`cannot snapshot volume "${name}" as "${snap}": names starting with "${BACKUP_SNAPSHOT_PREFIX}" are kept for the snapshots backups take`);
    }
    return this.takeSnapshot(name, snap, progress);
  }

  private takeSnapshot(name: string, snap: string, progress: Progress, backup?: { target: string; id: string }): Promise<SnapshotDetail> {
    return this.locks.with(name, async () => {
      const record = await this.load(name);
      const existing = record.snapshots?.find((x) => x.name === snap);
      if (existing?.state === "ready") throw new ConflictError(`volume "${name}" already has a snapshot "${snap}"`);
      // The leftovers of an attempt that failed and could not be cleaned up at the time.
      if (existing) await this.dropSnapshot(record, snap);
      const entry: SnapshotRecord = { name: snap, state: "creating", createdAt: new Date().toISOString(), sizeBytes: record.sizeBytes };
      if (backup) entry.backup = backup;
      record.snapshots = [...(record.snapshots ?? []), entry];
      await this.o.records.save(record);
      const quiesce = await this.quiesceOptions(record);
      progress(`taking snapshot "${snap}" of volume "${name}"${quiesce.originMountpoint ? " (its filesystem is frozen for the instant)" : ""}`);
      try {
        await this.o.pool.snapshot(name, snap, quiesce);
      } catch (err) {
        await this.dropSnapshot(record, snap).catch((undoErr: unknown) => {
          this.o.log.error("could not undo a failed snapshot; it will be retried at the next start", { volume: name, snapshot: snap, error: errorMessage(undoErr) });
        });
        throw explained(err, name, `cannot snapshot volume "${name}" as "${snap}"`);
      }
      entry.state = "ready";
      await this.o.records.save(record);
      this.o.log.info("snapshot created", { volume: name, snapshot: snap, frozen: quiesce.originMountpoint !== undefined });
      return this.snapshotDetail(name, entry);
    });
  }

  async removeSnapshot(rawVolume: string, rawSnapshot: string, progress: Progress = noProgress): Promise<void> {
    const name = checkVolumeName(rawVolume);
    const snap = checkSnapshotName(rawSnapshot);
    // A clone being made from the snapshot holds the volume's lock too.
    await this.locks.with(name, async () => {
      const record = await this.load(name);
      const entry = record.snapshots?.find((x) => x.name === snap);
      if (!entry) throw new NotFoundError(`volume "${name}" has no snapshot "${snap}"`);
      entry.state = "removing";
      await this.o.records.save(record);
      progress(`removing snapshot "${snap}" of volume "${name}"`);
      try {
        await this.dropSnapshot(record, snap);
      } catch (err) {
        throw new ThinvolError(`cannot remove snapshot "${snap}" of volume "${name}": ${errorMessage(err)}`, { cause: err });
      }
      this.o.log.info("snapshot removed", { volume: name, snapshot: snap });
    });
  }

  /** Removes a snapshot from the pool, then from the record: a crash between leaves the intent. */
  private async dropSnapshot(record: VolumeRecord, snap: string): Promise<void> {
    await this.o.pool.removeSnapshot(record.name, snap);
    record.snapshots = (record.snapshots ?? []).filter((x) => x.name !== snap);
    if (record.snapshots.length === 0) delete record.snapshots;
    await this.o.records.save(record);
  }

  /**
   * The start of a backup of `volume` to `target`: a snapshot for it (a mounted filesystem
   * frozen for the instant), and the volume kept from removal until finishBackup. Returns
   * the snapshot, the volume's filesystem and the snapshots earlier backups to that target
   * left (the newest tells what changed since).
   */
  async startBackup(rawVolume: string, target: string, id: string, progress: Progress = noProgress): Promise<BackupStart> {
    const name = checkVolumeName(rawVolume);
    const snap = `${BACKUP_SNAPSHOT_PREFIX}${id}`;
    checkSnapshotName(snap);
    this.backupsRunning.set(name, (this.backupsRunning.get(name) ?? 0) + 1);
    try {
      const snapshot = await this.takeSnapshot(name, snap, progress, { target, id });
      const record = await this.load(name);
      const earlier = readySnapshots(record).filter((x) => x.backup?.target === target && x.name !== snap);
      return { snapshot, fs: record.fs, earlier };
    } catch (err) {
      this.endBackup(name);
      throw err;
    }
  }

  /**
   * The end of a backup startBackup began. Done: the snapshots earlier backups to the same
   * target left go, the new one stays for the next backup. Failed: the new one goes.
   */
  async finishBackup(volume: string, target: string, snap: string, done: boolean): Promise<void> {
    try {
      await this.locks.with(volume, async () => {
        const record = await this.o.records.get(volume);
        if (!record || record.state !== "ready") return;
        const drop = (record.snapshots ?? []).filter((x) => (done ? x.backup?.target === target && x.name !== snap : x.name === snap));
        for (const x of drop) await this.dropSnapshot(record, x.name);
      });
    } finally {
      this.endBackup(volume);
    }
  }

  private endBackup(name: string): void {
    const n = (this.backupsRunning.get(name) ?? 1) - 1;
    if (n > 0) this.backupsRunning.set(name, n);
    else this.backupsRunning.delete(name);
  }

  /**
   * Puts a volume back to a snapshot in place, refused while it is mounted. The intent
   * (rollbackTo) is saved first, and start-up finishes a rollback a crash interrupted.
   */
  async rollback(rawVolume: string, rawSnapshot: string, progress: Progress = noProgress): Promise<VolumeDetail> {
    const name = checkVolumeName(rawVolume);
    const snap = checkSnapshotName(rawSnapshot);
    return this.locks.with(name, async () => {
      const record = await this.load(name);
      if (!readySnapshots(record).some((x) => x.name === snap)) throw new NotFoundError(`volume "${name}" has no snapshot "${snap}"`);
      const refs = totalReferences(record);
      if (refs > 0 || (await this.isMounted(name))) {
        throw new ConflictError(
          `cannot roll back volume "${name}" to snapshot "${snap}": it is mounted${refs > 0 ? ` (${refs} container mount${refs === 1 ? "" : "s"})` : ""}; ` +
            `stop the containers that use it first (docker ps --filter volume=${name})`,
        );
      }
      record.rollbackTo = snap;
      await this.o.records.save(record);
      progress(`rolling back volume "${name}" to snapshot "${snap}"`);
      await this.finishRollback(record);
      return this.detail(record, new Set());
    });
  }

  private async finishRollback(record: VolumeRecord): Promise<void> {
    const { name } = record;
    const snap = record.rollbackTo;
    if (snap === undefined) return;
    const entry = readySnapshots(record).find((x) => x.name === snap);
    try {
      if (!entry) throw new NotFoundError(`its snapshot "${snap}" is gone`);
      await this.o.pool.deactivate(name);
      await this.o.pool.rollback(name, snap);
    } catch (err) {
      throw new ThinvolError(`cannot roll back volume "${name}" to snapshot "${snap}": ${errorMessage(err)}`, { cause: err });
    }
    this.o.log.info("volume rolled back", { volume: name, snapshot: snap });
    record.sizeBytes = entry.sizeBytes;
    delete record.rollbackTo;
    await this.o.records.save(record);
  }

  // ---- the admin API's views --------------------------------------------------------

  async volumes(): Promise<VolumeDetail[]> {
    const mounted = new Set((await this.readMounts()).map((m) => m.mountPoint));
    const out: VolumeDetail[] = [];
    for (const name of await this.o.records.names()) {
      const record = await this.o.records.get(name).catch(() => undefined);
      if (record?.state === "ready") out.push(await this.detail(record, mounted));
    }
    return out;
  }

  async volume(rawName: string): Promise<VolumeDetail> {
    const record = await this.load(checkVolumeName(rawName));
    return this.detail(record, new Set((await this.readMounts()).map((m) => m.mountPoint)));
  }

  private async detail(record: VolumeRecord, mounted: ReadonlySet<string>): Promise<VolumeDetail> {
    const mountpoint = this.mountpointOf(record.name);
    const d: VolumeDetail = {
      name: record.name,
      createdAt: record.createdAt,
      sizeBytes: record.sizeBytes,
      filesystem: record.fs,
      mounted: mounted.has(mountpoint),
      mounts: totalReferences(record),
      snapshots: readySnapshots(record).map((x) => x.name),
    };
    if (d.mounted) {
      d.mountpoint = mountpoint;
      Object.assign(d, await this.filesystemUse(record.name));
    }
    try {
      d.allocatedBytes = await this.o.pool.allocatedBytes(record.name);
    } catch (err) {
      this.o.log.warn("cannot read a volume's allocation", { volume: record.name, error: errorMessage(err) });
    }
    if (record.origin !== undefined) d.origin = record.origin;
    return d;
  }

  async pool(): Promise<PoolDetail> {
    const u = await this.o.pool.usage();
    let volumes = 0;
    let snapshots = 0;
    for (const name of await this.o.records.names()) {
      const record = await this.o.records.get(name).catch(() => undefined);
      if (record?.state !== "ready") continue;
      volumes++;
      snapshots += readySnapshots(record).length;
    }
    return { ...u, minFreePercent: this.o.minFreePercent, volumes, snapshots };
  }

  async growPool(sizeBytes: number, progress: Progress = noProgress): Promise<PoolDetail> {
    progress(`growing the ${this.o.pool.driver} pool to ${formatSize(sizeBytes)}`);
    await this.o.pool.grow(sizeBytes);
    this.o.log.info("pool grown", { driver: this.o.pool.driver, size: formatSize(sizeBytes) });
    return this.pool();
  }

  async snapshots(rawVolume?: string): Promise<SnapshotDetail[]> {
    const names = rawVolume === undefined ? await this.o.records.names() : [(await this.load(checkVolumeName(rawVolume))).name];
    const out: SnapshotDetail[] = [];
    for (const name of names) {
      const record = await this.o.records.get(name).catch(() => undefined);
      if (record?.state !== "ready") continue;
      for (const entry of readySnapshots(record)) out.push(await this.snapshotDetail(name, entry));
    }
    return out;
  }

  private async snapshotDetail(volume: string, entry: SnapshotRecord): Promise<SnapshotDetail> {
    const d: SnapshotDetail = { volume, name: entry.name, createdAt: entry.createdAt, sizeBytes: entry.sizeBytes };
    try {
      d.allocatedBytes = await this.o.pool.snapshotAllocatedBytes(volume, entry.name);
    } catch (err) {
      this.o.log.warn("cannot read a snapshot's allocation", { volume, snapshot: entry.name, error: errorMessage(err) });
    }
    return d;
  }

  // ---- start-up ----------------------------------------------------------------

  /**
   * Brings the records and the kernel into agreement after a start, a crash or a
   * daemon restart: interrupted creates are undone, interrupted removes finished,
   * references whose mount is gone dropped, and nothing is left attached that no
   * container uses.
   */
  async recover(): Promise<void> {
    await mkdir(this.o.mountDir, { recursive: true });
    const inPool = new Set(await this.o.pool.list());
    const names = await this.o.records.names();
    // One look at the kernel for all volumes: start-up starts no process for an idle volume.
    const view: KernelView = {
      inPool,
      mounted: new Set((await this.readMounts()).map((m) => m.mountPoint)),
      attached: await this.o.pool.attached(),
    };
    for (const name of names) {
      // One volume that cannot be recovered must not keep the others from being served.
      await this.recoverOne(name, view).catch((err: unknown) => {
        this.o.log.error("cannot recover volume; it is left as it is", { volume: name, error: errorMessage(err) });
      });
    }
    const known = new Set(names);
    for (const orphan of inPool) {
      if (!known.has(orphan)) {
        this.o.log.warn("the pool holds a volume with no record; it is kept, not deleted", { volume: orphan });
      }
    }
    await this.reportSnapshotsWithoutRecord();
  }

  private async reportSnapshotsWithoutRecord(): Promise<void> {
    for (const [volume, snaps] of await this.o.pool.snapshots()) {
      const record = await this.o.records.get(volume).catch(() => undefined);
      const known = new Set((record?.snapshots ?? []).map((x) => x.name));
      for (const snap of snaps) {
        if (!known.has(snap)) this.o.log.warn("the pool holds a snapshot with no record; it is kept, not deleted", { volume, snapshot: snap });
      }
    }
  }

  /** Finishes what a crash interrupted on a ready volume: snapshots half made or removed, a rollback, a resize. */
  private async settleIntents(record: VolumeRecord): Promise<void> {
    for (const entry of [...(record.snapshots ?? [])]) {
      if (entry.state === "ready") continue;
      this.o.log.warn(entry.state === "creating" ? "undoing a snapshot that was interrupted" : "finishing a snapshot remove that was interrupted", {
        volume: record.name,
        snapshot: entry.name,
      });
      await this.dropSnapshot(record, entry.name);
    }
    if (record.rollbackTo !== undefined) {
      this.o.log.warn("finishing a rollback that was interrupted", { volume: record.name, snapshot: record.rollbackTo });
      await this.finishRollback(record);
    }
    if (record.resizeTo !== undefined) {
      this.o.log.warn("finishing a resize that was interrupted", { volume: record.name, to: formatSize(record.resizeTo) });
      await this.finishResize(record, noProgress);
    }
  }

  private async recoverOne(name: string, view: KernelView): Promise<void> {
    await this.locks.with(name, async () => {
      const record = await this.o.records.get(name);
      if (!record) return;
      if (record.state === "creating") {
        this.o.log.warn("undoing a create that was interrupted", { volume: name });
        await this.undoCreate(name);
        return;
      }
      if (record.state === "removing") {
        this.o.log.warn("finishing a remove that was interrupted", { volume: name });
        try {
          await this.finishRemove(record);
          return;
        } catch (err) {
          this.o.log.error("cannot finish the remove; the volume is kept", { volume: name, error: errorMessage(err) });
        }
        // finishRemove has put the volume back if the pool still holds it; serve it as it is.
        if ((await this.o.records.get(name))?.state !== "ready") return;
      }
      if (!view.inPool.has(name)) {
        this.o.log.error("volume has a record but no data in the pool", { volume: name, driver: this.o.pool.driver });
        return;
      }
      const refs = totalReferences(record);
      const mounted = view.mounted.has(this.mountpointOf(name));
      if (mounted) await this.thawIfFrozen(name);
      if (refs > 0 && !mounted) {
        this.o.log.warn("dropping mount references whose mount is gone", { volume: name, references: refs });
        record.mounts = new Map();
        await this.o.records.save(record);
        if (view.attached.has(name)) await this.o.pool.deactivate(name);
      } else if (refs === 0 && mounted) {
        this.o.log.warn("unmounting a volume that no container references", { volume: name });
        await this.teardown(name);
      } else if (refs === 0 && view.attached.has(name)) {
        this.o.log.info("detaching a volume that no container uses", { volume: name });
        await this.o.pool.deactivate(name);
      }
      await this.settleIntents(record);
    });
  }

  /** A clone interrupted by a crash can leave its origin frozen, and every write to it blocked. */
  private async thawIfFrozen(name: string): Promise<void> {
    try {
      await thawFilesystem(this.o.runner, this.mountpointOf(name));
      this.o.log.warn("thawed a filesystem left frozen by an interrupted clone", { volume: name });
    } catch {
      // Not frozen: the usual case.
    }
  }
}

/** An error that already names the volume (the pool's own, with its kind) as it is; any other prefixed with `what`. */
function explained(err: unknown, volume: string, what: string): ThinvolError {
  if (err instanceof ThinvolError && err.message.includes(`"${volume}"`)) return err;
  return new ThinvolError(`${what}: ${errorMessage(err)}`, { cause: err });
}

function readySnapshots(record: VolumeRecord): SnapshotRecord[] {
  return (record.snapshots ?? []).filter((x) => x.state === "ready");
}

/** What the kernel held when start-up began. */
interface KernelView {
  inPool: ReadonlySet<string>;
  mounted: ReadonlySet<string>;
  attached: ReadonlySet<string>;
}

export function describePool(u: PoolUsage): string {
  const pct = u.dataTotalBytes > 0 ? (u.dataUsedBytes / u.dataTotalBytes) * 100 : 0;
  let s = `${formatSize(u.dataUsedBytes)} of ${formatSize(u.dataTotalBytes)} used (${pct.toFixed(1)}%)`;
  if (u.metaTotalBytes !== undefined && u.metaUsedBytes !== undefined && u.metaTotalBytes > 0) {
    s += `, metadata ${((u.metaUsedBytes / u.metaTotalBytes) * 100).toFixed(1)}%`;
  }
  if (u.hostReservedBytes !== undefined) s += `; ${formatSize(u.hostReservedBytes)} of host disk reserved`;
  if (u.hostFreeBytes !== undefined) s += `${u.hostReservedBytes !== undefined ? "," : ";"} ${formatSize(u.hostFreeBytes)} free on the host`;
  return s;
}
