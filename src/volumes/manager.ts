import { chmod, chown, mkdir, rm, rmdir, statfs } from "node:fs/promises";
import { join } from "node:path";
import { ConflictError, NoSpaceError, NotFoundError, ThinvolError, errorMessage } from "../errors.js";
import type { Logger } from "../log.js";
import type { Pool, PoolUsage } from "../pool/types.js";
import { formatSize } from "../size.js";
import { baseMountOptions, formatFilesystem, thawFilesystem, type FsType } from "../system/filesystem.js";
import { mountDevice, readMounts, unmount, type MountEntry } from "../system/mount.js";
import type { Runner } from "../system/runner.js";
import { KeyedLock } from "../locks.js";
import { checkSize, checkVolumeName, parseCreateOptions } from "./options.js";
import type { RecordStore, VolumeRecord } from "./records.js";
import type { VolumeInfo, VolumeService, VolumeSummary } from "./types.js";

export interface VolumeManagerOptions {
  pool: Pool;
  records: RecordStore;
  runner: Runner;
  log: Logger;
  mountDir: string;
  defaultSizeBytes: number;
  defaultFs: FsType;
  /** Creates are refused while the pool has less than this share free, in percent. */
  minFreePercent: number;
  /** Reads the mount table; tests substitute their own. */
  readMounts?: () => Promise<MountEntry[]>;
}

function totalReferences(record: VolumeRecord): number {
  let total = 0;
  for (const count of record.mounts.values()) total += count;
  return total;
}

/** A volume's loop device (loop pool) goes with its mount, in the same command. */
const DETACH = { detachLoop: true } as const;

/** Node's chown leaves an owner or group of -1 as it is. */
const UNCHANGED_ID = -1;

function percentFree(total: number, used: number): number {
  return total > 0 ? ((total - used) / total) * 100 : 0;
}

/**
 * The volume lifecycle: records, options, mount references and the order of
 * steps that keeps a crash from losing or leaking anything. Every step that
 * changes the system is preceded by a saved intent (state "creating" or
 * "removing") that recover() finishes or undoes.
 */
export class VolumeManager implements VolumeService {
  private readonly locks = new KeyedLock();
  private readonly readMounts: () => Promise<MountEntry[]>;

  constructor(private readonly o: VolumeManagerOptions) {
    this.readMounts = o.readMounts ?? (() => readMounts());
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

  async create(rawName: string, rawOptions: Readonly<Record<string, string>> | null): Promise<void> {
    const name = checkVolumeName(rawName);
    const options = parseCreateOptions(name, rawOptions);
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
      let fs: FsType;
      let sizeBytes: number;
      if (options.from !== undefined) {
        origin = await this.o.records.get(options.from);
        if (!origin || origin.state !== "ready") {
          throw new NotFoundError(`cannot create volume "${name}" as a clone of "${options.from}": volume "${options.from}" does not exist`);
        }
        if (options.fs !== undefined && options.fs !== origin.fs) {
          throw new ConflictError(`cannot create volume "${name}": a clone has its origin's filesystem (${origin.fs}), not ${options.fs}`);
        }
        if (options.sizeBytes !== undefined && options.sizeBytes !== origin.sizeBytes) {
          throw new ConflictError(
            `cannot create volume "${name}": a clone has its origin's size (${formatSize(origin.sizeBytes)}); leave out the size option`,
          );
        }
        fs = origin.fs;
        sizeBytes = origin.sizeBytes;
      } else {
        fs = options.fs ?? this.o.defaultFs;
        sizeBytes = checkSize(name, options.sizeBytes ?? this.o.defaultSizeBytes, fs);
      }
      await this.checkFreeSpace(name);
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
      if (origin) record.origin = origin.name;
      if (options.uid !== undefined) record.uid = options.uid;
      if (options.gid !== undefined) record.gid = options.gid;
      if (options.mode !== undefined) record.mode = options.mode;
      await this.o.records.save(record);

      try {
        if (origin) {
          const originMounted = totalReferences(origin) > 0 && (await this.isMounted(origin.name));
          await this.o.pool.clone(name, origin.name, originMounted ? { originMountpoint: this.mountpointOf(origin.name) } : {});
        } else {
          await this.o.pool.create(name, sizeBytes);
        }
        await this.prepareFilesystem(record, !origin);
        record.state = "ready";
        await this.o.records.save(record);
      } catch (err) {
        await this.undoCreate(name);
        if (err instanceof ThinvolError) throw err;
        throw new ThinvolError(`cannot create volume "${name}": ${errorMessage(err)}`, { cause: err });
      }
    });
  }

  private async checkFreeSpace(name: string): Promise<void> {
    const min = this.o.minFreePercent;
    if (min <= 0) return;
    const u = await this.o.pool.usage();
    const dataFree = percentFree(u.dataTotalBytes, u.dataUsedBytes);
    if (dataFree < min) {
      throw new NoSpaceError(
        `cannot create volume "${name}": the ${u.driver} pool has ${dataFree.toFixed(1)}% free ` +
          `(${formatSize(u.dataTotalBytes - u.dataUsedBytes)} of ${formatSize(u.dataTotalBytes)}), under MIN_FREE_SPACE=${min}%; ` +
          `remove volumes or raise POOL_SIZE`,
      );
    }
    if (u.metaTotalBytes !== undefined && u.metaUsedBytes !== undefined) {
      const metaFree = percentFree(u.metaTotalBytes, u.metaUsedBytes);
      if (metaFree < min) {
        throw new NoSpaceError(
          `cannot create volume "${name}": the pool's metadata has ${metaFree.toFixed(1)}% free, under MIN_FREE_SPACE=${min}%; remove volumes`,
        );
      }
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
    if (mounted) {
      try {
        const s = await statfs(this.mountpointOf(name));
        const used = (s.blocks - s.bfree) * s.bsize;
        status["used"] = formatSize(used);
        status["usedBytes"] = used;
        status["available"] = formatSize(s.bavail * s.bsize);
      } catch (err) {
        this.o.log.warn("cannot read filesystem usage", { volume: name, error: errorMessage(err) });
      }
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
