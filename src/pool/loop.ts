import { chmod, mkdir, open, readdir, realpath, rename, rm, stat, statfs, truncate } from "node:fs/promises";
import { dirname, join } from "node:path";
import * as v from "valibot";
import { ConflictError, NoSpaceError, NotFoundError, ThinvolError, errorMessage } from "../errors.js";
import type { Logger } from "../log.js";
import { formatSize } from "../size.js";
import { fsyncPath, readJsonFile, writeFileAtomic } from "../system/atomic-file.js";
import { freezeFilesystem, thawFilesystem } from "../system/filesystem.js";
import { attachDirectLoop, attachOrReuseLoop, backingFile, detachLoop, detachLoopsOf, listLoops, loopsByPath, loopsOf, refreshLoopSize } from "../system/losetup.js";
import { mountDevice, readMounts, unmount } from "../system/mount.js";
import type { Runner } from "../system/runner.js";
import { HostReserve } from "./loop-reserve.js";
import { sectorSizeForImage } from "./loop-image.js";
import { changedRangesFromExtents, mergeRanges } from "../backup/plan.js";
import { fileExtents } from "../system/extents.js";
import type { CloneOptions, Pool, PoolUsage, SnapshotReader, VolumeRange } from "./types.js";

export interface LoopPoolOptions {
  runner: Runner;
  /** A directory the driver owns: the pool file, its state and its mount point. */
  dir: string;
  dataSizeBytes: number;
  log: Logger;
  /** Creates, clones and snapshots are refused while the pool has less than this share free, in percent. */
  minFreePercent?: number;
}

/**
 * `formatted: false` is written before the pool file is formatted and turned true after, so
 * a crash in between is told apart from a pool whose state file was lost. Older state files
 * have no such field: they were written after formatting.
 */
const StateSchema = v.object({ version: v.literal(1), sizeBytes: v.number(), formatted: v.optional(v.boolean(), true) });
type PoolState = v.InferOutput<typeof StateSchema>;

const IMAGE_SUFFIX = ".img";
/** A snapshot is `<volume>@<snapshot>.img` in its own directory; `@` is in no volume name. */
const SNAPSHOT_SEPARATOR = "@";
/** A rollback copies the snapshot beside the image under this suffix, then renames it over. */
const ROLLBACK_SUFFIX = ".img.rollback";
/** Well inside Docker's one-minute limit for Unmount and Remove. */
const DETACH_WAIT_MS = 20_000;
const XFS_MAGIC = "XFSB";

/**
 * For kernels without dm-thin: one sparse file formatted XFS with reflink,
 * mounted privately; each volume is a sparse image in it on its own loop
 * device. A clone is a reflink copy, so it shares every block until written.
 * The pool writes only into host space it has reserved (see HostReserve).
 */
export class LoopPool implements Pool {
  readonly driver = "loop" as const;
  private readonly poolFile: string;
  private readonly stateFile: string;
  private readonly mnt: string;
  private readonly volumesDir: string;
  private readonly snapshotsDir: string;
  private readonly reserve: HostReserve;
  /** Pool-wide changes (a free-space check and what it allows, growth) one at a time. */
  private queue: Promise<unknown> = Promise.resolve();
  /** The loop device this process last gave each volume, so its teardown needs no search. */
  private readonly devices = new Map<string, string>();

  constructor(private readonly o: LoopPoolOptions) {
    this.poolFile = join(o.dir, "pool.img");
    this.stateFile = join(o.dir, "pool.json");
    this.mnt = join(o.dir, "mnt");
    this.volumesDir = join(this.mnt, "volumes");
    this.snapshotsDir = join(this.mnt, "snapshots");
    this.reserve = new HostReserve(
      { runner: o.runner, log: o.log, poolFile: this.poolFile, mnt: this.mnt, balloon: join(this.mnt, "reserve.balloon") },
      o.dataSizeBytes,
    );
  }

  private image(name: string): string {
    return join(this.volumesDir, name + IMAGE_SUFFIX);
  }

  private snapshotImage(volume: string, snapshot: string): string {
    return join(this.snapshotsDir, volume + SNAPSHOT_SEPARATOR + snapshot + IMAGE_SUFFIX);
  }

  /** Runs pool-wide work after whatever pool-wide work came before it. */
  private serially<T>(work: () => Promise<T>): Promise<T> {
    const run = this.queue.then(work, work);
    this.queue = run.catch(() => undefined);
    return run;
  }

  private saveState(state: PoolState): Promise<void> {
    return writeFileAtomic(this.stateFile, JSON.stringify(state) + "\n");
  }

  async open(): Promise<void> {
    const { log } = this.o;
    await mkdir(this.mnt, { recursive: true, mode: 0o700 });
    const raw = await readJsonFile(this.stateFile);
    let state = raw === undefined ? undefined : v.parse(StateSchema, raw);
    if (state === undefined) {
      await this.refuseUnknownPoolFile();
      state = { version: 1, sizeBytes: this.o.dataSizeBytes, formatted: false };
      await this.saveState(state);
    }
    if (!state.formatted) state = await this.format(state);
    const dev = await this.poolDevice();
    await this.mountPool(dev);
    await mkdir(this.volumesDir, { recursive: true, mode: 0o700 });
    await mkdir(this.snapshotsDir, { recursive: true, mode: 0o700 });
    await this.dropUnfinishedRollbacks();
    await this.reserve.setUp();
    if (this.o.dataSizeBytes > state.sizeBytes) await this.growTo(dev, state, this.o.dataSizeBytes);
    else if (this.o.dataSizeBytes < state.sizeBytes) {
      log.warn("POOL_SIZE is smaller than the pool; a pool never shrinks", { pool: formatSize(state.sizeBytes), setting: formatSize(this.o.dataSizeBytes) });
    }
    this.reserve.startWatching();
    const f = await this.reserve.figures();
    log.info("loop pool ready", {
      file: this.poolFile,
      device: dev,
      hostReserved: formatSize(f.hostReservedBytes),
      hostFree: formatSize(f.hostFreeBytes),
      poolFree: formatSize(f.poolFreeBytes),
    });
  }

  /** A pool file without a state file may hold volumes: it is never formatted over. */
  private async refuseUnknownPoolFile(): Promise<void> {
    let head: Buffer;
    try {
      const handle = await open(this.poolFile, "r");
      try {
        head = Buffer.alloc(4);
        await handle.read(head, 0, 4, 0);
      } finally {
        await handle.close();
      }
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return;
      throw err;
    }
    if (head.toString("latin1") !== XFS_MAGIC) return;
    const { size } = await stat(this.poolFile);
    throw new ThinvolError(
      `the loop pool file ${this.poolFile} holds a filesystem, but its state file ${this.stateFile} is missing: ` +
        `refusing to format over a pool that may hold volumes. Restore the state file (for this pool file: ` +
        `${JSON.stringify({ version: 1, sizeBytes: size })}), or move ${this.o.dir} aside to start an empty pool`,
    );
  }

  /** Formats the pool file; the state says formatted only once the filesystem is whole. */
  private async format(state: PoolState): Promise<PoolState> {
    this.o.log.info("creating the loop pool", { file: this.poolFile, size: formatSize(state.sizeBytes) });
    await this.ensureSparseFile(this.poolFile, state.sizeBytes);
    const dev = await this.poolDevice();
    await this.o.runner.run("mkfs.xfs", ["-q", "-f", "-K", "-m", "reflink=1", "-L", "thinvol-pool", dev], { timeoutMs: 120_000 });
    const formatted = { ...state, formatted: true };
    await this.saveState(formatted);
    return formatted;
  }

  /**
   * Mounted without discard: only the host space reserve gives host blocks back, so free
   * pool space stays backed on the host.
   */
  private async mountPool(dev: string): Promise<void> {
    const mounted = (await readMounts()).find((m) => m.mountPoint === this.mnt);
    if (!mounted) {
      await mountDevice(this.o.runner, dev, this.mnt, "xfs", ["noatime"]);
      return;
    }
    if (mounted.superOptions?.includes("discard")) {
      // XFS cannot drop discard on a remount; the pool is mounted afresh after its next teardown.
      this.o.log.warn("the pool is still mounted with discard by an earlier thinvol: freed space goes back to the host at once until the pool is next mounted", {
        file: this.poolFile,
      });
    }
  }

  private async growTo(dev: string, state: PoolState, to: number): Promise<void> {
    this.o.log.info("growing the loop pool", { from: formatSize(state.sizeBytes), to: formatSize(to) });
    const before = (await statfs(this.mnt)).blocks;
    await this.ensureSparseFile(this.poolFile, to);
    await refreshLoopSize(this.o.runner, dev);
    await this.o.runner.run("xfs_growfs", [this.mnt]);
    await this.saveState({ ...state, sizeBytes: to });
    const s = await statfs(this.mnt);
    this.reserve.setPoolSize(to);
    await this.reserve.absorbGrowth((s.blocks - before) * s.bsize);
  }

  private async ensureSparseFile(path: string, sizeBytes: number): Promise<void> {
    const handle = await open(path, "a");
    try {
      const { size } = await handle.stat();
      if (size < sizeBytes) await handle.truncate(sizeBytes);
      await handle.sync();
    } finally {
      await handle.close();
    }
  }

  /** The pool file's loop device, reusing one that is still attached after a restart. */
  private poolDevice(): Promise<string> {
    return attachOrReuseLoop(this.o.runner, this.poolFile, this.o.log);
  }

  private async isPoolMounted(): Promise<boolean> {
    return (await readMounts()).some((m) => m.mountPoint === this.mnt);
  }

  async close(): Promise<void> {
    this.reserve.stopWatching();
    // An idle pool is taken down, so a disabled or removed plugin leaves no device on the
    // host; the next open() sets it up again. Attached volumes keep it up.
    const mounted = await this.isPoolMounted();
    if (mounted && (await this.attached()).size > 0) {
      this.o.log.info("loop pool left up: volumes are attached", { file: this.poolFile });
      return;
    }
    if (mounted) await unmount(this.o.runner, this.mnt);
    for (const dev of await loopsOf(this.o.runner, this.poolFile)) await detachLoop(this.o.runner, dev);
    this.o.log.info("loop pool taken down: no volume is attached", { file: this.poolFile });
  }

  async list(): Promise<string[]> {
    const files = await readdir(this.volumesDir);
    return files.filter((f) => f.endsWith(IMAGE_SUFFIX)).map((f) => f.slice(0, -IMAGE_SUFFIX.length)).sort();
  }

  /**
   * The pool's one free-space rule for something new (a volume, a clone, a snapshot): the
   * host must be able to back it, and the pool must keep MIN_FREE_SPACE free. The caller
   * holds the pool's queue, so what the check allowed is made before the next check runs.
   */
  private async checkRoom(what: string): Promise<void> {
    const refusal = await this.reserve.refusal();
    if (refusal !== undefined) throw new NoSpaceError(`cannot ${what}: ${refusal}`);
    const min = this.o.minFreePercent ?? 0;
    if (min <= 0) return;
    const u = await this.usage();
    const free = u.dataTotalBytes - u.dataUsedBytes;
    const pct = u.dataTotalBytes > 0 ? (free / u.dataTotalBytes) * 100 : 0;
    if (pct < min) {
      throw new NoSpaceError(
        `cannot ${what}: the loop pool has ${pct.toFixed(1)}% free (${formatSize(free)} of ${formatSize(u.dataTotalBytes)}), ` +
          `under MIN_FREE_SPACE=${min}%; remove volumes or snapshots, or grow the pool (thinvol pool grow)`,
      );
    }
  }

  create(name: string, sizeBytes: number): Promise<void> {
    return this.serially(async () => {
      await this.checkRoom(`create volume "${name}"`);
      await this.makeImage(name, sizeBytes);
    });
  }

  /** A new image, durable with its name; fails if the name exists, so nothing is overwritten. */
  private async makeImage(name: string, sizeBytes: number, path = this.image(name)): Promise<void> {
    let handle;
    try {
      handle = await open(path, "wx", 0o600);
    } catch (err) {
      throw new ThinvolError(`cannot create the image of volume "${name}": ${errorMessage(err)}`, { cause: err });
    }
    try {
      await handle.truncate(sizeBytes);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await fsyncPath(dirname(path));
  }

  clone(name: string, origin: string, options: CloneOptions = {}): Promise<void> {
    const from = options.snapshot === undefined ? `volume "${origin}"` : `snapshot "${options.snapshot}" of volume "${origin}"`;
    return this.serially(async () => {
      await this.checkRoom(`create volume "${name}"`);
      const source = options.snapshot === undefined ? this.image(origin) : this.snapshotImage(origin, options.snapshot);
      // Claim the name first, so an existing volume is never overwritten.
      await this.makeImage(name, 0);
      await this.copyImage(source, this.image(name), options.originMountpoint, `cannot clone ${from} to "${name}"`);
    });
  }

  /**
   * Reflinks `source` over the claimed, empty `target`, with the filesystem at `frozen`
   * frozen for the instant of the copy; on failure the target is removed.
   */
  private async copyImage(source: string, target: string, frozen: string | undefined, failure: string): Promise<void> {
    try {
      if (frozen !== undefined) await freezeFilesystem(this.o.runner, frozen);
      try {
        await this.o.runner.run("cp", ["--reflink=always", source, target]);
      } finally {
        if (frozen !== undefined) await thawFilesystem(this.o.runner, frozen);
      }
      // The copy's extents and size must be on disk before a record can say it exists.
      await fsyncPath(target);
    } catch (err) {
      await rm(target, { force: true });
      throw new ThinvolError(`${failure}: ${errorMessage(err)}`, { cause: err });
    }
  }

  async sizeOf(name: string): Promise<number> {
    return (await stat(this.image(name))).size;
  }

  /** Mount's path: one process (losetup), or none when the device is already there. */
  async activate(name: string): Promise<string> {
    const image = this.image(name);
    const device =
      (await loopsByPath(image))[0] ?? (await attachDirectLoop(this.o.runner, image, this.o.log, { sectorSize: await sectorSizeForImage(image) }));
    this.devices.set(name, device);
    return device;
  }

  async attached(): Promise<Set<string>> {
    const poolFs = (await readMounts()).find((m) => m.mountPoint === this.mnt)?.device;
    const inodes = new Set((await listLoops(this.o.runner)).filter((l) => l.fsDevice === poolFs).map((l) => l.inode));
    if (inodes.size === 0) return new Set();
    const names = await this.list();
    const held = await Promise.all(names.map(async (n) => inodes.has((await stat(this.image(n))).ino)));
    return new Set(names.filter((_, i) => held[i]));
  }

  async deactivate(name: string): Promise<void> {
    const image = this.image(name);
    const known = this.devices.get(name);
    this.devices.delete(name);
    let path: string;
    try {
      path = await realpath(image);
    } catch {
      return;
    }
    // Usually the unmount has already detached the device it was given (umount
    // --detach-loop): then there is nothing to search for.
    const gone = known !== undefined && (await backingFile(known)) !== path;
    // Until the kernel lets go of the image, the image's space cannot be freed.
    if (!gone && !(await detachLoopsOf(this.o.runner, image, DETACH_WAIT_MS))) {
      throw new ConflictError(`the loop device of volume "${name}" is still busy ${DETACH_WAIT_MS / 1000} s after it was detached; try again`);
    }
    // What the volume wrote is now all in the pool: settle the reserve, so the host figures are exact.
    await this.reserve.rebalance(0);
  }

  async remove(name: string): Promise<void> {
    // Deactivating settles the reserve, so what the image frees is exactly what goes back to the host.
    await this.deactivate(name);
    await this.deleteImage(this.image(name));
  }

  /**
   * Deletes an image (a volume's or a snapshot's) and gives its space back to the host before
   * it returns: XFS frees an unlinked file's blocks in the background, but a truncate's at once.
   * An absent image is fine.
   */
  private async deleteImage(path: string): Promise<void> {
    await truncate(path, 0).catch((err: unknown) => {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
    });
    await rm(path, { force: true });
    await fsyncPath(dirname(path));
    await this.reserve.rebalance(0);
  }

  async usage(): Promise<PoolUsage> {
    const [s, f] = await Promise.all([statfs(this.mnt), this.reserve.figures()]);
    return {
      driver: "loop",
      dataTotalBytes: s.blocks * s.bsize,
      dataUsedBytes: Math.max(0, (s.blocks - s.bfree) * s.bsize - f.balloonBytes),
      hostReservedBytes: f.hostReservedBytes,
      hostFreeBytes: f.hostFreeBytes,
    };
  }

  async allocatedBytes(name: string): Promise<number> {
    return (await stat(this.image(name))).blocks * 512;
  }

  // ---- resize, snapshots, rollback, growth ---------------------------------------

  /**
   * Grows the sparse image; an attached loop device is told its new size at once. Refused,
   * like a create, while the pool is short of space: the filesystem's growth writes metadata,
   * and a write the pool cannot hold would fail inside the volume.
   */
  resize(name: string, sizeBytes: number): Promise<void> {
    return this.serially(() => this.resizeImage(name, sizeBytes));
  }

  private async resizeImage(name: string, sizeBytes: number): Promise<void> {
    const image = this.image(name);
    const handle = await open(image, "r+").catch((err: unknown) => {
      throw (err as NodeJS.ErrnoException).code === "ENOENT" ? new NotFoundError(`volume "${name}" has no image in the loop pool`) : err;
    });
    try {
      const { size } = await handle.stat();
      if (sizeBytes < size) {
        throw new ConflictError(`cannot shrink volume "${name}" from ${formatSize(size)} to ${formatSize(sizeBytes)}: a volume only grows`);
      }
      if (sizeBytes === size) return;
      await this.checkRoom(`resize volume "${name}"`);
      await handle.truncate(sizeBytes);
      await handle.sync();
    } finally {
      await handle.close();
    }
    for (const device of await loopsByPath(image)) await refreshLoopSize(this.o.runner, device);
    this.o.log.info("loop resize", { volume: name, size: formatSize(sizeBytes) });
  }

  snapshot(volume: string, snapshot: string, options: CloneOptions = {}): Promise<void> {
    const what = `snapshot volume "${volume}" as "${snapshot}"`;
    return this.serially(async () => {
      await this.checkRoom(what);
      const target = this.snapshotImage(volume, snapshot);
      await this.makeImage(volume, 0, target);
      await this.copyImage(this.image(volume), target, options.originMountpoint, `cannot ${what}`);
      // Read-only: nothing in thinvol writes to a snapshot, and nothing else should.
      await chmod(target, 0o400);
    });
  }

  async snapshots(): Promise<Map<string, string[]>> {
    const out = new Map<string, string[]>();
    for (const file of (await readdir(this.snapshotsDir)).sort()) {
      if (!file.endsWith(IMAGE_SUFFIX)) continue;
      const key = file.slice(0, -IMAGE_SUFFIX.length);
      const at = key.indexOf(SNAPSHOT_SEPARATOR);
      if (at <= 0) continue;
      const volume = key.slice(0, at);
      out.set(volume, [...(out.get(volume) ?? []), key.slice(at + 1)]);
    }
    return out;
  }

  private async statSnapshot(volume: string, snapshot: string) {
    try {
      return await stat(this.snapshotImage(volume, snapshot));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") throw new NotFoundError(`volume "${volume}" has no snapshot "${snapshot}" in the loop pool`);
      throw err;
    }
  }

  async snapshotSizeOf(volume: string, snapshot: string): Promise<number> {
    return (await this.statSnapshot(volume, snapshot)).size;
  }

  async snapshotAllocatedBytes(volume: string, snapshot: string): Promise<number> {
    return (await this.statSnapshot(volume, snapshot)).blocks * 512;
  }

  async removeSnapshot(volume: string, snapshot: string): Promise<void> {
    await this.deleteImage(this.snapshotImage(volume, snapshot));
  }

  /** A snapshot's image is a read-only file of the pool's filesystem: read it where it is. */
  async openSnapshot(volume: string, snapshot: string): Promise<SnapshotReader> {
    await this.statSnapshot(volume, snapshot);
    return { path: this.snapshotImage(volume, snapshot), release: async () => undefined };
  }

  /**
   * From the snapshot images' extents in the pool's filesystem: snapshots are reflink copies,
   * so data not written in between lies at the same place on the pool's device in both.
   */
  async changedRanges(volume: string, snapshot: string, since?: string): Promise<VolumeRange[]> {
    const extentsOf = async (snap: string) => {
      const size = await this.snapshotSizeOf(volume, snap);
      return fileExtents(this.o.runner, this.snapshotImage(volume, snap), { offset: 0, length: size });
    };
    const current = await extentsOf(snapshot);
    if (since === undefined) return mergeRanges(current.map((e) => ({ offset: e.fileOffset, length: e.length })));
    return changedRangesFromExtents(await extentsOf(since), current);
  }

  /**
   * Copies the snapshot beside the volume's image and renames it over the image, so a crash
   * leaves the old image or the snapshot's copy; a copy left half-made is removed at open().
   */
  async rollback(volume: string, snapshot: string): Promise<void> {
    const image = this.image(volume);
    if ((await loopsByPath(image)).length > 0) {
      throw new ConflictError(`cannot roll back volume "${volume}": its loop device is attached; unmount it first`);
    }
    const source = this.snapshotImage(volume, snapshot);
    await this.statSnapshot(volume, snapshot);
    const staged = join(this.volumesDir, volume + ROLLBACK_SUFFIX);
    await rm(staged, { force: true });
    await this.makeImage(volume, 0, staged);
    await this.copyImage(source, staged, undefined, `cannot roll back volume "${volume}" to snapshot "${snapshot}"`);
    await chmod(staged, 0o600);
    await rename(staged, image);
    await fsyncPath(this.volumesDir);
    await this.reserve.rebalance(0);
    this.o.log.info("loop rollback", { volume, snapshot });
  }

  private async dropUnfinishedRollbacks(): Promise<void> {
    for (const file of await readdir(this.volumesDir)) {
      if (!file.endsWith(ROLLBACK_SUFFIX)) continue;
      this.o.log.warn("removing the copy of an interrupted rollback; the volume keeps its data", { file });
      await rm(join(this.volumesDir, file), { force: true });
    }
  }

  /** Grows the pool file and its filesystem while volumes are in use; the new size is kept in the state file. */
  grow(sizeBytes: number): Promise<void> {
    return this.serially(async () => {
      const raw = await readJsonFile(this.stateFile);
      const state = v.parse(StateSchema, raw);
      if (sizeBytes < state.sizeBytes) {
        throw new ConflictError(`cannot shrink the loop pool from ${formatSize(state.sizeBytes)} to ${formatSize(sizeBytes)}: a pool only grows`);
      }
      if (sizeBytes === state.sizeBytes) return;
      const refusal = await this.reserve.refusal();
      if (refusal !== undefined) throw new NoSpaceError(`cannot grow the loop pool to ${formatSize(sizeBytes)}: ${refusal}`);
      await this.growTo(await this.poolDevice(), state, sizeBytes);
    });
  }
}
