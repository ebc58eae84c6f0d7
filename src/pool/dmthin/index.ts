import { CommandError, ConflictError, InvalidRequestError, NoSpaceError, NotFoundError, ThinvolError, errorMessage } from "../../errors.js";
import { formatSize } from "../../size.js";
import { dmFailureReason, listDevices, sendMessage, thinStatus } from "../../system/dmsetup.js";
import type { CloneOptions, Pool, PoolUsage, SnapshotReader, VolumeRange } from "../types.js";
import { growPool } from "./capacity.js";
import { changedRangesOf } from "./changes.js";
import { DmThinContext, type DmThinOptions, type Locked } from "./context.js";
import { activateDevice, deactivateDevice, ownDevice, snapshotSuspended, tearDownForRemove } from "./devices.js";
import { GrowthTimer, growLocked } from "./growth.js";
import { allocateId, commitJournalled, deleteThinId, dropJournal, journal, setTransactionId, settlePending } from "./journal.js";
import { closePool, openPool } from "./open.js";
import { activateReader, clearReadersOf, deactivateReader } from "./readers.js";
import { resizeVolume } from "./resize.js";
import { cloneSnapshot, deleteSnapshot, rollbackVolume, snapshotsByVolume, takeSnapshot } from "./snapshots.js";
import { checkSpace, usage } from "./space.js";
import { snapshotKey, type Pending } from "./state.js";

export type { DmThinOptions } from "./context.js";
export { dmThinAvailable } from "./probe.js";

/**
 * The dm-thin pool: a data file (or a whole block device, POOL_DEVICE) and a metadata
 * file, each file on a loop device, joined into a thin-pool device; each volume is a thin
 * device in it.
 *
 * Its parts: the journal that makes every change crash-safe (journal.ts), the volumes'
 * devices (devices.ts), snapshots and rollback (snapshots.ts), snapshot readers for backups
 * (readers.ts) and their changed blocks (changes.ts), resize (resize.ts), bring-up
 * and close (open.ts), host-space growth (growth.ts), the pool's maximum (capacity.ts), a
 * data device's checks (device.ts) and the free-space rule (space.ts). All share one
 * context (context.ts); whatever changes the pool runs under its lock.
 */
export class DmThinPool implements Pool {
  readonly driver = "dm-thin" as const;

  private readonly ctx: DmThinContext;
  private readonly growth: GrowthTimer;

  constructor(opts: DmThinOptions) {
    this.ctx = new DmThinContext(opts);
    this.growth = new GrowthTimer(this.ctx, () => this.growIfNeeded());
  }

  open(): Promise<void> {
    return this.ctx.withLock(async (ctx) => {
      await openPool(ctx);
      this.growth.start();
    });
  }

  async close(): Promise<void> {
    this.growth.stop();
    await this.ctx.withLock(async (ctx) => {
      this.growth.stop();
      await closePool(ctx);
    });
  }

  /** Grows the pool now if it is short of headroom (the timer does this every few seconds). */
  growIfNeeded(): Promise<void> {
    return this.ctx.withLock(async (ctx) => {
      if (ctx.state) await growLocked(ctx);
    });
  }

  /**
   * The opening of every operation on a volume: takes the pool lock, settles an interrupted
   * operation first (taking a device away does not need that: `settle: false`), and turns a
   * failure into an error for the user. `started` is when the lock was taken.
   */
  private underLock<T>(what: string, volume: string, work: (ctx: Locked, started: number) => Promise<T>, opts: { settle: boolean } = { settle: true }): Promise<T> {
    return this.ctx.withLock(async (ctx) => {
      const started = Date.now();
      try {
        if (opts.settle) await settlePending(ctx);
        return await work(ctx, started);
      } catch (err) {
        throw this.failure(what, volume, err);
      }
    });
  }

  /** An error for the user: names the volume, the pool and the cause, and keeps the error's kind. */
  private failure(what: string, volume: string, err: unknown): ThinvolError {
    if (err instanceof ThinvolError && !(err instanceof CommandError) && err.message.includes(`"${volume}"`)) return err;
    const msg = `cannot ${what} thin volume "${volume}" in pool ${this.ctx.poolName}: ${errorMessage(err)}`;
    if (err instanceof NoSpaceError || /No space left on device/i.test(dmFailureReason(err))) return new NoSpaceError(msg, { cause: err });
    if (err instanceof ConflictError) return new ConflictError(msg, { cause: err });
    if (err instanceof NotFoundError) return new NotFoundError(msg, { cause: err });
    return new ThinvolError(msg, { cause: err });
  }

  async list(): Promise<string[]> {
    return [...this.ctx.openState.volumes.keys()].sort();
  }

  async attached(): Promise<Set<string>> {
    const devices = await listDevices(this.ctx.runner);
    return new Set([...this.ctx.openState.volumes.keys()].filter((name) => devices.has(this.ctx.deviceName(name))));
  }

  async sizeOf(name: string): Promise<number> {
    return this.ctx.volume(name).sizeBytes;
  }

  create(name: string, sizeBytes: number): Promise<void> {
    return this.underLock("create", name, async (ctx, started) => {
      ctx.checkNewName(name);
      if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 512 || sizeBytes % 512 !== 0) {
        throw new InvalidRequestError(`cannot create thin volume "${name}": size ${sizeBytes} is not a positive multiple of 512 bytes`);
      }
      await checkSpace(ctx, name, "create");
      const id = allocateId(ctx, name);
      const T = ctx.openState.transactionId;
      const p: Pending = { op: "create", name, id, sizeBytes, fromTransaction: T };
      await journal(ctx, p);
      await commitJournalled(ctx, p, async () => {
        await sendMessage(ctx.runner, ctx.poolName, `create_thin ${id}`);
        await setTransactionId(ctx, T, T + 1);
      });
      ctx.log.info("dm-thin create", { volume: name, id, size: formatSize(sizeBytes), ms: Date.now() - started });
    });
  }

  clone(name: string, origin: string, options: CloneOptions = {}): Promise<void> {
    const { snapshot } = options;
    if (snapshot !== undefined) {
      const what = `clone snapshot "${snapshot}" of "${origin}" as`;
      return this.underLock(what, name, async (ctx, started) => {
        const id = await cloneSnapshot(ctx, name, origin, snapshot, what);
        ctx.log.info("dm-thin clone", { volume: name, origin, snapshot, id, ms: Date.now() - started });
      });
    }
    // The origin device is suspended for the snapshot, which freezes a filesystem
    // mounted on it, so the mountpoint is not needed.
    const what = `clone "${origin}" as`;
    return this.underLock(what, name, async (ctx, started) => {
      const from = ctx.volume(origin);
      ctx.checkNewName(name);
      await checkSpace(ctx, name, what);
      // Checked before anything is written: a foreign device is never suspended.
      const originActive = (await ownDevice(ctx, origin, from)) !== undefined;
      const id = allocateId(ctx, name);
      const T = ctx.openState.transactionId;
      const p: Pending = { op: "clone", name, id, sizeBytes: from.sizeBytes, origin, originId: from.id, fromTransaction: T };
      await journal(ctx, p);
      await commitJournalled(ctx, p, async () => {
        const snapshot = () => sendMessage(ctx.runner, ctx.poolName, `create_snap ${id} ${from.id}`);
        if (originActive) await snapshotSuspended(ctx, ctx.deviceName(origin), snapshot);
        else await snapshot();
        await setTransactionId(ctx, T, T + 1);
      });
      // The origin was suspended exactly when it was active: a failed suspend ends above.
      ctx.log.info("dm-thin clone", { volume: name, origin, id, originWasActive: originActive, ms: Date.now() - started });
    });
  }

  activate(name: string): Promise<string> {
    return this.underLock("activate", name, (ctx) => activateDevice(ctx, name, ctx.volume(name)));
  }

  deactivate(name: string): Promise<void> {
    return this.underLock("deactivate", name, (ctx) => deactivateDevice(ctx, name), { settle: false });
  }

  remove(name: string): Promise<void> {
    return this.underLock("remove", name, async (ctx, started) => {
      const vol = ctx.openState.volumes.get(name);
      if (!vol) return;
      const snapshots = snapshotsByVolume(ctx.openState).get(name);
      if (snapshots) {
        throw new ConflictError(`thin volume "${name}" has ${snapshots.length === 1 ? "a snapshot" : `${snapshots.length} snapshots`} (${snapshots.map((n) => `"${n}"`).join(", ")}); remove ${snapshots.length === 1 ? "it" : "them"} first`);
      }
      const T = ctx.openState.transactionId;
      const p: Pending = { op: "remove", name, id: vol.id, fromTransaction: T };
      await journal(ctx, p);
      try {
        await tearDownForRemove(ctx, name);
      } catch (err) {
        // Nothing is deleted yet: keep the volume.
        await dropJournal(ctx);
        throw err;
      }
      await commitJournalled(ctx, p, async () => {
        await deleteThinId(ctx, vol.id);
        await setTransactionId(ctx, T, T + 1);
      });
      ctx.log.info("dm-thin remove", { volume: name, id: vol.id, ms: Date.now() - started });
    });
  }

  usage(): Promise<PoolUsage> {
    return usage(this.ctx);
  }

  async allocatedBytes(name: string): Promise<number> {
    const vol = this.ctx.volume(name);
    const devName = this.ctx.deviceName(name);
    try {
      if (await ownDevice(this.ctx, name, vol)) vol.allocatedBytes = (await thinStatus(this.ctx.runner, devName)).mappedSectors * 512;
    } catch (err) {
      throw this.failure("read the allocation of", name, err);
    }
    return vol.allocatedBytes ?? 0;
  }

  resize(name: string, sizeBytes: number): Promise<void> {
    return this.underLock("resize", name, async (ctx, started) => {
      const { fromBytes, deviceGrown } = await resizeVolume(ctx, name, sizeBytes);
      if (fromBytes === sizeBytes) return;
      ctx.log.info("dm-thin resize", { volume: name, from: formatSize(fromBytes), to: formatSize(sizeBytes), deviceGrown, ms: Date.now() - started });
    });
  }

  snapshot(volume: string, snapshot: string, _options?: CloneOptions): Promise<void> {
    // As for a clone, the device is suspended, which freezes a mounted filesystem.
    const what = `take snapshot "${snapshot}" of`;
    return this.underLock(what, volume, async (ctx, started) => {
      const { id, originWasActive } = await takeSnapshot(ctx, volume, snapshot, what);
      ctx.log.info("dm-thin snapshot", { volume, snapshot, id, originWasActive, ms: Date.now() - started });
    });
  }

  async snapshots(): Promise<Map<string, string[]>> {
    return snapshotsByVolume(this.ctx.openState);
  }

  async snapshotSizeOf(volume: string, snapshot: string): Promise<number> {
    return this.ctx.snapshot(volume, snapshot).sizeBytes;
  }

  async snapshotAllocatedBytes(volume: string, snapshot: string): Promise<number> {
    return this.ctx.snapshot(volume, snapshot).allocatedBytes ?? 0;
  }

  removeSnapshot(volume: string, snapshot: string): Promise<void> {
    const what = `remove snapshot "${snapshot}" of`;
    return this.underLock(what, volume, async (ctx, started) => {
      const snap = ctx.openState.snapshots.get(snapshotKey(volume, snapshot));
      if (snap) await clearReadersOf(ctx, volume, snapshot, snap);
      const id = await deleteSnapshot(ctx, volume, snapshot);
      if (id !== undefined) ctx.log.info("dm-thin snapshot removed", { volume, snapshot, id, ms: Date.now() - started });
    });
  }

  rollback(volume: string, snapshot: string): Promise<void> {
    const what = `restore snapshot "${snapshot}" to`;
    return this.underLock(what, volume, async (ctx, started) => {
      const { id, oldId } = await rollbackVolume(ctx, volume, snapshot);
      ctx.log.info("dm-thin rollback", { volume, snapshot, id, oldId, ms: Date.now() - started });
    });
  }

  grow(sizeBytes: number): Promise<void> {
    return this.ctx.withLock(async (ctx) => {
      const started = Date.now();
      try {
        await settlePending(ctx);
        const before = await growPool(ctx, sizeBytes);
        if (before === ctx.poolMaxBytes) return;
        ctx.log.info("dm-thin pool maximum raised", { pool: ctx.poolName, from: formatSize(before), to: formatSize(ctx.poolMaxBytes), ms: Date.now() - started });
      } catch (err) {
        if (err instanceof ThinvolError && !(err instanceof CommandError) && err.message.includes(ctx.poolName)) throw err;
        throw new ThinvolError(`cannot grow dm-thin pool ${ctx.poolName} to ${formatSize(sizeBytes)}: ${errorMessage(err)}`, { cause: err });
      }
    });
  }

  /**
   * Activates the snapshot's thin id read-only under a device of this reader's own
   * (readers.ts). Until release(), removeSnapshot refuses; release() is idempotent.
   */
  openSnapshot(volume: string, snapshot: string): Promise<SnapshotReader> {
    const what = `read snapshot "${snapshot}" of`;
    return this.underLock(what, volume, async (ctx, started) => {
      const snap = ctx.snapshot(volume, snapshot);
      const { name, path } = await activateReader(ctx, volume, snapshot, snap);
      ctx.log.info("dm-thin snapshot reader opened", { volume, snapshot, id: snap.id, device: name, ms: Date.now() - started });
      let released = false;
      const release = (): Promise<void> =>
        this.underLock(`release the reader of snapshot "${snapshot}" of`, volume, async (ctx) => {
          if (released || !ctx.readers.has(name)) return;
          await deactivateReader(ctx, name);
          released = true;
          ctx.log.info("dm-thin snapshot reader released", { volume, snapshot, device: name });
        }, { settle: false });
      return { path, release };
    });
  }

  /** From thin_delta on a metadata snapshot of the live pool (changes.ts). */
  changedRanges(volume: string, snapshot: string, since?: string): Promise<VolumeRange[]> {
    const what = since === undefined ? `list the mapped blocks of snapshot "${snapshot}" of` : `list the blocks of snapshot "${snapshot}" changed since snapshot "${since}" of`;
    return this.underLock(what, volume, async (ctx, started) => {
      const snap = ctx.snapshot(volume, snapshot);
      const sinceId = since === undefined ? undefined : ctx.snapshot(volume, since).id;
      const ranges = await changedRangesOf(ctx, snap.id, snap.sizeBytes, sinceId);
      const bytes = ranges.reduce((n, r) => n + r.length, 0);
      ctx.log.info("dm-thin changed ranges", { volume, snapshot, since, ranges: ranges.length, size: formatSize(bytes), ms: Date.now() - started });
      return ranges;
    });
  }
}
