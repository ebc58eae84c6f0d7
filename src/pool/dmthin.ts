import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { CommandError, ConflictError, InvalidRequestError, NoSpaceError, NotFoundError, ThinvolError, errorMessage } from "../errors.js";
import type { Logger } from "../log.js";
import { formatSize } from "../size.js";
import { discardDevice } from "../system/blockdev.js";
import {
  createDevice,
  deviceInfo,
  dmFailureReason,
  dmPath,
  listDevices,
  loadTable,
  makeNodes,
  parseThinPoolTable,
  removeDevice,
  resumeDevice,
  sendMessage,
  suspendDevice,
  tableOf,
  thinPoolStatus,
  thinPoolTable,
  thinStatus,
  thinTable,
  type ThinPoolStatus,
} from "../system/dmsetup.js";
import { attachOrReuseLoop, detachLoop, loopsOf, refreshLoopSize } from "../system/losetup.js";
import type { Runner } from "../system/runner.js";
import { checkThinMetadata } from "../system/thin-tools.js";
import { fileSize, growSparseFile, loopDeviceNumber, metadataIsBlank, metadataSizeFor } from "./dmthin-backing.js";
import { KeyedLock } from "../locks.js";
import { MAX_THIN_ID, loadState, saveState, stateFile, type Pending, type PoolState, type VolumeRecord } from "./dmthin-state.js";
import type { CloneOptions, Pool, PoolUsage } from "./types.js";

export { dmThinAvailable } from "./dmthin-probe.js";

export interface DmThinOptions {
  runner: Runner;
  /** A directory the driver owns: data.img, meta.img and its state file. */
  dir: string;
  /** Size of the sparse data file. It may grow between runs, never shrink. */
  dataSizeBytes: number;
  log: Logger;
  /** Prefix of the dm device names: `<name>-pool`, `<name>-<volume>`. Default "thinvol", at most 30 characters. */
  name?: string;
  /** Pool block size for a new pool, in 512-byte sectors (default 128 = 64 KiB). An existing pool keeps its own. */
  blockSizeSectors?: number;
  /** Refuse create and clone when less than this percentage of data or metadata space is free (default 10). */
  minFreePercent?: number;
}

const FEATURES = ["skip_block_zeroing", "error_if_no_space"] as const;

/**
 * The dm-thin pool: a sparse data file and a sparse metadata file, each on a loop
 * device, joined into a thin-pool device; each volume is a thin device in it.
 *
 * Crash safety. The pool's transaction id is the commit point of every
 * pool-wide operation. Before its first message, an operation writes its intent
 * (`pending`) into the state file with the transaction id it starts from (T);
 * its last message is `set_transaction_id T T+1`; then the state is saved with
 * the result and the intent cleared. Whenever an intent is found (at open, and
 * before every operation):
 *  - create / clone: pool at T+1 → roll forward (the volume exists); pool at T →
 *    roll back (delete the thin id if it was made). A clone's origin is resumed
 *    either way.
 *  - remove: roll forward: finish the delete. Only if the device cannot be
 *    removed (it is open) is the intent dropped and the volume kept.
 * Any other difference between the pool and the state stops open() with an error.
 */
export class DmThinPool implements Pool {
  readonly driver = "dm-thin" as const;

  private readonly runner: Runner;
  private readonly dir: string;
  private readonly log: Logger;
  private readonly prefix: string;
  private readonly poolName: string;
  private readonly wantDataBytes: number;
  private readonly wantBlockSize: number;
  private readonly minFreePercent: number;
  private readonly dataFile: string;
  private readonly metaFile: string;
  /** Ids and transaction ids are handed out one operation at a time. */
  private readonly lock = new KeyedLock();

  private state: PoolState | undefined;
  /** major:minor of the pool device, for thin tables (no /dev node needed). */
  private poolDevice = "";

  constructor(opts: DmThinOptions) {
    this.runner = opts.runner;
    this.dir = opts.dir;
    this.log = opts.log;
    this.prefix = opts.name ?? "thinvol";
    if (!/^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,29}$/.test(this.prefix)) {
      throw new InvalidRequestError(`dm-thin pool name ${JSON.stringify(this.prefix)} must be 1 to 30 letters, digits, '_', '.' or '-'`);
    }
    this.poolName = `${this.prefix}-pool`;
    this.wantBlockSize = opts.blockSizeSectors ?? 128;
    const bs = this.wantBlockSize;
    if (!Number.isInteger(bs) || bs < 128 || bs > 2_097_152 || bs % 128 !== 0) {
      throw new InvalidRequestError(`dm-thin block size must be a multiple of 128 sectors from 128 to 2097152, not ${bs}`);
    }
    this.wantDataBytes = opts.dataSizeBytes;
    if (!Number.isSafeInteger(opts.dataSizeBytes) || opts.dataSizeBytes < bs * 512 * 16) {
      throw new InvalidRequestError(`dm-thin pool size must be at least 16 blocks (${formatSize(bs * 512 * 16)}), not ${opts.dataSizeBytes} bytes`);
    }
    this.minFreePercent = opts.minFreePercent ?? 10;
    this.dataFile = join(this.dir, "data.img");
    this.metaFile = join(this.dir, "meta.img");
  }

  private deviceName(volume: string): string {
    return `${this.prefix}-${volume}`;
  }

  private get open_(): PoolState {
    if (!this.state) throw new ThinvolError(`dm-thin pool ${this.poolName} is not open`);
    return this.state;
  }

  private async save(): Promise<void> {
    await saveState(this.dir, this.open_);
  }

  // ---------------------------------------------------------------- open

  open(): Promise<void> {
    return this.lock.with("pool", async () => {
      const started = Date.now();
      await mkdir(this.dir, { recursive: true, mode: 0o700 });
      const state = (await loadState(this.dir)) ?? (await this.initState());
      if (state.blockSizeSectors !== this.wantBlockSize) {
        this.log.warn("dm-thin pool keeps the block size it was made with", { pool: this.poolName, blockSizeSectors: state.blockSizeSectors, asked: this.wantBlockSize });
      }
      const blockBytes = state.blockSizeSectors * 512;
      const fresh = state.transactionId === 0 && state.volumes.size === 0 && state.pending === undefined;
      if (!fresh) {
        for (const file of [this.dataFile, this.metaFile]) {
          if ((await fileSize(file)) === undefined) {
            throw new ThinvolError(`dm-thin pool file ${file} is missing, but ${stateFile(this.dir)} says the pool holds volumes; restore the file or move the directory aside to start an empty pool`);
          }
        }
      }

      let dataBytes = Math.floor(this.wantDataBytes / blockBytes) * blockBytes;
      if (dataBytes < state.dataSizeBytes) {
        this.log.warn("dm-thin pool cannot shrink; keeping its size", { pool: this.poolName, size: formatSize(state.dataSizeBytes), asked: formatSize(dataBytes) });
        dataBytes = state.dataSizeBytes;
      }

      // Files first (a new pool has none yet); growing them is idempotent.
      let metaBytes = Math.max(state.metaSizeBytes, metadataSizeFor(dataBytes, state.blockSizeSectors));
      await growSparseFile(this.dataFile, dataBytes);
      metaBytes = await growSparseFile(this.metaFile, metaBytes);

      let dataLoop = await attachOrReuseLoop(this.runner, this.dataFile, this.log);
      let metaLoop = await attachOrReuseLoop(this.runner, this.metaFile, this.log);
      let dataNo = await loopDeviceNumber(this.runner, dataLoop);
      let metaNo = await loopDeviceNumber(this.runner, metaLoop);

      const live = (await listDevices(this.runner)).get(this.poolName);
      let liveLength = 0;
      if (live) {
        // Left suspended by a crash during a grow: resuming makes a loaded larger table live.
        if (live.suspended) await resumeDevice(this.runner, this.poolName);
        const table = parseThinPoolTable(this.poolName, await tableOf(this.runner, this.poolName));
        // A file can have more than one loop device; use the ones the live pool uses.
        if (table.dataDevice !== dataNo) [dataLoop, dataNo] = await this.loopOfFileNumbered(this.dataFile, table.dataDevice, [dataLoop, dataNo]);
        if (table.metaDevice !== metaNo) [metaLoop, metaNo] = await this.loopOfFileNumbered(this.metaFile, table.metaDevice, [metaLoop, metaNo]);
        if (table.dataDevice !== dataNo || table.metaDevice !== metaNo || table.blockSizeSectors !== state.blockSizeSectors) {
          throw new ThinvolError(
            `device ${this.poolName} is active but is not the pool in ${this.dir}: it uses data ${table.dataDevice}, metadata ${table.metaDevice}, ` +
              `block size ${table.blockSizeSectors}; expected ${dataLoop} (${dataNo}), ${metaLoop} (${metaNo}), block size ${state.blockSizeSectors}. ` +
              `Another pool has this name: set a different pool name or remove that device`,
          );
        }
        liveLength = table.lengthSectors * 512;
      }

      // Never shrink, and never below what the live pool already has.
      dataBytes = Math.max(dataBytes, state.dataSizeBytes, liveLength);
      const grow = dataBytes > state.dataSizeBytes || metaBytes > state.metaSizeBytes;
      if (grow) {
        // The loop devices may predate the growth (or a crash interrupted it).
        await refreshLoopSize(this.runner, dataLoop);
        await refreshLoopSize(this.runner, metaLoop);
      }
      const table = thinPoolTable({
        lengthSectors: dataBytes / 512,
        metaDevice: metaLoop,
        dataDevice: dataLoop,
        blockSizeSectors: state.blockSizeSectors,
        lowWaterBlocks: Math.floor(dataBytes / blockBytes / 10),
        features: FEATURES,
      });

      if (live) {
        if (grow) await this.reloadPool(table);
      } else {
        if (await metadataIsBlank(this.metaFile)) {
          if (!fresh) {
            throw new ThinvolError(
              `dm-thin metadata ${this.metaFile} is blank, but ${stateFile(this.dir)} says the pool holds volumes (transaction ${state.transactionId}); ` +
                `creating the pool now would lose them. Restore the metadata file, or move the directory aside to start an empty pool`,
            );
          }
        } else {
          await this.checkMetadata(metaLoop);
        }
        try {
          await createDevice(this.runner, this.poolName, table);
        } catch (err) {
          throw new ThinvolError(`cannot create dm-thin pool ${this.poolName} from ${this.dataFile} and ${this.metaFile}: ${errorMessage(err)}`, { cause: err });
        }
      }
      await makeNodes(this.runner, this.poolName);
      const dev = await deviceInfo(this.runner, this.poolName);
      if (!dev) throw new ThinvolError(`dm-thin pool ${this.poolName} vanished right after it was set up`);
      this.poolDevice = `${dev.major}:${dev.minor}`;

      if (grow) {
        state.dataSizeBytes = dataBytes;
        state.metaSizeBytes = metaBytes;
        await saveState(this.dir, state);
        this.log.info("dm-thin pool grown", { pool: this.poolName, size: formatSize(dataBytes), metadata: formatSize(metaBytes) });
      }
      this.state = state;
      try {
        await this.settlePending();
        const status = await thinPoolStatus(this.runner, this.poolName);
        if (status.transactionId !== state.transactionId) {
          throw new ThinvolError(
            `dm-thin pool ${this.poolName} is at transaction ${status.transactionId} but ${stateFile(this.dir)} records ${state.transactionId}: ` +
              `the state file does not belong to this metadata (restored from a backup?). Refusing to guess which volumes exist`,
          );
        }
        if (status.needsCheck) this.log.warn("dm-thin pool metadata is flagged needs_check; run thin_check on it while the pool is down", { pool: this.poolName });
        await this.resumeLeftSuspended();
      } catch (err) {
        this.state = undefined;
        throw err;
      }
      this.log.info("dm-thin pool open", {
        pool: this.poolName,
        volumes: state.volumes.size,
        reused: live !== undefined,
        transaction: state.transactionId,
        ms: Date.now() - started,
      });
    });
  }

  /** The loop device of `file` whose number is `devno`, or `fallback`. */
  private async loopOfFileNumbered(file: string, devno: string, fallback: [string, string]): Promise<[string, string]> {
    for (const dev of await loopsOf(this.runner, file)) {
      if ((await loopDeviceNumber(this.runner, dev)) === devno) return [dev, devno];
    }
    return fallback;
  }

  private async initState(): Promise<PoolState> {
    if ((await fileSize(this.metaFile)) !== undefined && !(await metadataIsBlank(this.metaFile))) {
      throw new ThinvolError(
        `found dm-thin metadata ${this.metaFile} but no state file ${stateFile(this.dir)}: refusing to reuse a pool whose volumes are unknown; restore the state file or move the directory aside`,
      );
    }
    // Sizes start at 0, so open() makes the files as if growing the pool.
    const state: PoolState = {
      blockSizeSectors: this.wantBlockSize,
      dataSizeBytes: 0,
      metaSizeBytes: 0,
      transactionId: 0,
      nextId: 1,
      volumes: new Map(),
      pending: undefined,
    };
    await saveState(this.dir, state);
    this.log.info("dm-thin pool state created", { pool: this.poolName, dir: this.dir, blockSizeSectors: this.wantBlockSize });
    return state;
  }

  private async checkMetadata(metaLoop: string): Promise<void> {
    try {
      await checkThinMetadata(this.runner, metaLoop);
    } catch (err) {
      if (err instanceof CommandError && err.exitCode === undefined && /ENOENT/.test(err.message)) {
        this.log.warn("thin_check is not installed; starting the pool without checking its metadata", { pool: this.poolName });
        return;
      }
      const report = err instanceof CommandError ? (err.stderr || err.message).trim() : errorMessage(err);
      throw new ThinvolError(
        `dm-thin metadata ${this.metaFile} (on ${metaLoop}) failed thin_check, so pool ${this.poolName} was not started: ${report}. ` +
          `Repair it with thin_repair (keep a copy of the file first)`,
        { cause: err },
      );
    }
  }

  /** Loads a new pool table; the pool is suspended only between load and resume, and always resumed. */
  private async reloadPool(table: string): Promise<void> {
    await loadTable(this.runner, this.poolName, table);
    try {
      await suspendDevice(this.runner, this.poolName);
    } finally {
      await resumeDevice(this.runner, this.poolName);
    }
  }

  /** A crash between suspend and resume leaves a device frozen, and a filesystem on it hung. */
  private async resumeLeftSuspended(): Promise<void> {
    const devices = await listDevices(this.runner);
    for (const name of this.open_.volumes.keys()) {
      const dev = devices.get(this.deviceName(name));
      if (dev?.suspended) {
        this.log.warn("resuming a thin volume left suspended", { volume: name });
        await resumeDevice(this.runner, dev.name);
      }
    }
  }

  async close(): Promise<void> {
    await this.lock.with("pool", async () => {
      const state = this.state;
      this.state = undefined;
      this.poolDevice = "";
      if (!state) return;
      // An idle pool is taken down, so a disabled or removed plugin leaves no device on the
      // host; the next open() sets it up again from its files. Active volumes keep it up.
      const devices = await listDevices(this.runner);
      const active = [...state.volumes.keys()].filter((v) => devices.has(this.deviceName(v)));
      if (active.length > 0) {
        this.log.info("dm-thin pool left up: volumes are active", { pool: this.poolName, active: active.length });
        return;
      }
      if (devices.has(this.poolName)) await removeDevice(this.runner, this.poolName);
      for (const file of [this.dataFile, this.metaFile]) {
        for (const dev of await loopsOf(this.runner, file)) await detachLoop(this.runner, dev);
      }
      this.log.info("dm-thin pool taken down: no volume is active", { pool: this.poolName });
    });
  }

  // ---------------------------------------------------------------- recovery

  private async deleteThinId(id: number): Promise<void> {
    try {
      await sendMessage(this.runner, this.poolName, `delete ${id}`);
    } catch (err) {
      // ENODATA: the id does not exist, which is what we wanted.
      if (/No data available/i.test(dmFailureReason(err))) return;
      throw err;
    }
  }

  private async setTransactionId(from: number, to: number): Promise<void> {
    await sendMessage(this.runner, this.poolName, `set_transaction_id ${from} ${to}`);
  }

  private async resumeIfSuspended(volume: string): Promise<void> {
    const dev = await deviceInfo(this.runner, this.deviceName(volume));
    if (dev?.suspended) await resumeDevice(this.runner, dev.name);
  }

  /** Finishes or undoes the operation recorded in the journal, if any (see the class comment). */
  private async settlePending(): Promise<void> {
    const state = this.open_;
    const p = state.pending;
    if (!p) return;
    const status = await thinPoolStatus(this.runner, this.poolName);
    const T = p.fromTransaction;
    const P = status.transactionId;
    if (P !== T && P !== T + 1) {
      throw new ThinvolError(
        `cannot recover the interrupted ${p.op} of volume "${p.name}": pool ${this.poolName} is at transaction ${P}, the journal in ${stateFile(this.dir)} expected ${T} or ${T + 1}`,
      );
    }
    if (p.op === "clone") await this.resumeIfSuspended(p.origin);
    if (p.op === "create" || p.op === "clone") {
      if (P === T) {
        await this.deleteThinId(p.id);
        state.pending = undefined;
        await this.save();
        this.log.warn(`rolled back an interrupted ${p.op}`, { volume: p.name, id: p.id });
      } else {
        this.commit(p, { id: p.id, sizeBytes: p.sizeBytes });
        await this.save();
        this.log.warn(`completed an interrupted ${p.op}`, { volume: p.name, id: p.id });
      }
      return;
    }
    if (P === T) {
      try {
        await this.tearDownForRemove(p.name);
      } catch (err) {
        if (!(err instanceof ConflictError)) throw err;
        state.pending = undefined;
        await this.save();
        this.log.warn("kept a volume whose interrupted remove could not finish", { volume: p.name, error: err.message });
        return;
      }
      await this.deleteThinId(p.id);
      await this.setTransactionId(T, T + 1);
    }
    this.commit(p, undefined);
    await this.save();
    this.log.warn("completed an interrupted remove", { volume: p.name, id: p.id });
  }

  /** Applies a committed operation to the state (not yet saved). */
  private commit(p: Pending, vol: VolumeRecord | undefined): void {
    const state = this.open_;
    if (vol) state.volumes.set(p.name, vol);
    else state.volumes.delete(p.name);
    state.transactionId = p.fromTransaction + 1;
    state.pending = undefined;
  }

  /** Writes an operation's intent before its first message to the pool. */
  private async journal(p: Pending): Promise<void> {
    this.open_.pending = p;
    await this.save();
  }

  /**
   * Sends a journalled operation's messages (the last one bumps the transaction
   * id) and records the result; on failure recovers in-process and rethrows.
   */
  private async commitJournalled(p: Pending, messages: () => Promise<void>): Promise<void> {
    try {
      await messages();
    } catch (err) {
      try {
        await this.settlePending();
      } catch (again) {
        this.log.error("could not recover after a failed operation; will retry before the next one", { volume: p.name, op: p.op, error: errorMessage(again) });
      }
      throw err;
    }
    if (p.op === "remove") this.commit(p, undefined);
    else this.commit(p, { id: p.id, sizeBytes: p.sizeBytes });
    await this.save();
  }

  // ---------------------------------------------------------------- volumes

  /** An error for the user: names the volume, the pool and the cause, and keeps the error's kind. */
  private failure(what: string, volume: string, err: unknown): ThinvolError {
    if (err instanceof ThinvolError && !(err instanceof CommandError) && err.message.includes(`"${volume}"`)) return err;
    const msg = `cannot ${what} thin volume "${volume}" in pool ${this.poolName}: ${errorMessage(err)}`;
    if (err instanceof NoSpaceError || /No space left on device/i.test(dmFailureReason(err))) return new NoSpaceError(msg, { cause: err });
    if (err instanceof ConflictError) return new ConflictError(msg, { cause: err });
    if (err instanceof NotFoundError) return new NotFoundError(msg, { cause: err });
    return new ThinvolError(msg, { cause: err });
  }

  private checkNewName(name: string): void {
    if (name === "pool") throw new InvalidRequestError(`volume name "pool" is reserved by the dm-thin driver (its device would clash with ${this.poolName})`);
    if (this.open_.volumes.has(name)) throw new ConflictError(`thin volume "${name}" already exists in pool ${this.poolName}`);
  }

  private checkSpace(status: ThinPoolStatus, volume: string, what: string): void {
    const fail = (why: string) => new NoSpaceError(`cannot ${what} thin volume "${volume}" in pool ${this.poolName}: ${why}; remove volumes or grow the pool`);
    if (status.mode === "out_of_data_space") throw fail("the pool is out of data space");
    if (status.mode === "ro") throw new ThinvolError(`cannot ${what} thin volume "${volume}": pool ${this.poolName} is read-only (its metadata needs checking)`);
    const block = this.open_.blockSizeSectors * 512;
    const dataFree = status.dataTotalBlocks - status.dataUsedBlocks;
    if (dataFree * 100 < status.dataTotalBlocks * this.minFreePercent) {
      throw fail(`only ${formatSize(dataFree * block)} of ${formatSize(status.dataTotalBlocks * block)} of data space is free, under the ${this.minFreePercent}% minimum`);
    }
    const metaFree = status.metaTotalBlocks - status.metaUsedBlocks;
    if (metaFree * 100 < status.metaTotalBlocks * this.minFreePercent) {
      throw fail(`only ${formatSize(metaFree * 4096)} of ${formatSize(status.metaTotalBlocks * 4096)} of metadata space is free, under the ${this.minFreePercent}% minimum`);
    }
  }

  /** The next free 24-bit id. Ids are not reused until they wrap, so a stray id in the pool is never handed out twice. */
  private allocateId(volume: string): number {
    const state = this.open_;
    const used = new Set([...state.volumes.values()].map((v) => v.id));
    for (let i = 0; i <= MAX_THIN_ID; i++) {
      const id = (state.nextId + i) % (MAX_THIN_ID + 1);
      if (!used.has(id)) {
        state.nextId = (id + 1) % (MAX_THIN_ID + 1);
        return id;
      }
    }
    throw new NoSpaceError(`cannot create thin volume "${volume}": all ${MAX_THIN_ID + 1} thin ids of pool ${this.poolName} are in use`);
  }

  private volume(name: string): VolumeRecord {
    const vol = this.open_.volumes.get(name);
    if (!vol) throw new NotFoundError(`no thin volume "${name}" in pool ${this.poolName}`);
    return vol;
  }

  async list(): Promise<string[]> {
    return [...this.open_.volumes.keys()].sort();
  }

  async sizeOf(name: string): Promise<number> {
    return this.volume(name).sizeBytes;
  }

  create(name: string, sizeBytes: number): Promise<void> {
    return this.lock.with("pool", async () => {
      const started = Date.now();
      try {
        await this.settlePending();
        this.checkNewName(name);
        if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 512 || sizeBytes % 512 !== 0) {
          throw new InvalidRequestError(`cannot create thin volume "${name}": size ${sizeBytes} is not a positive multiple of 512 bytes`);
        }
        this.checkSpace(await thinPoolStatus(this.runner, this.poolName), name, "create");
        const state = this.open_;
        const id = this.allocateId(name);
        const T = state.transactionId;
        const p: Pending = { op: "create", name, id, sizeBytes, fromTransaction: T };
        await this.journal(p);
        await this.commitJournalled(p, async () => {
          await sendMessage(this.runner, this.poolName, `create_thin ${id}`);
          await this.setTransactionId(T, T + 1);
        });
        this.log.info("dm-thin create", { volume: name, id, size: formatSize(sizeBytes), ms: Date.now() - started });
      } catch (err) {
        throw this.failure("create", name, err);
      }
    });
  }

  clone(name: string, origin: string, _options?: CloneOptions): Promise<void> {
    // The origin device is suspended for the snapshot, which freezes a filesystem
    // mounted on it, so the mountpoint is not needed.
    return this.lock.with("pool", async () => {
      const started = Date.now();
      const what = `clone "${origin}" as`;
      try {
        await this.settlePending();
        const from = this.volume(origin);
        this.checkNewName(name);
        this.checkSpace(await thinPoolStatus(this.runner, this.poolName), name, what);
        const state = this.open_;
        const id = this.allocateId(name);
        const T = state.transactionId;
        const originDev = this.deviceName(origin);
        let suspended = false;
        const p: Pending = { op: "clone", name, id, sizeBytes: from.sizeBytes, origin, originId: from.id, fromTransaction: T };
        await this.journal(p);
        await this.commitJournalled(
          p,
          async () => {
            if (await deviceInfo(this.runner, originDev)) {
              await suspendDevice(this.runner, originDev);
              suspended = true;
              let snapError: unknown;
              try {
                await sendMessage(this.runner, this.poolName, `create_snap ${id} ${from.id}`);
              } catch (err) {
                snapError = err;
              }
              try {
                await resumeDevice(this.runner, originDev);
              } catch (err) {
                throw new ThinvolError(`cannot resume origin device ${originDev} after the snapshot${snapError ? ` (the snapshot also failed: ${errorMessage(snapError)})` : ""}: ${errorMessage(err)}`, { cause: err });
              }
              if (snapError) throw snapError;
            } else {
              await sendMessage(this.runner, this.poolName, `create_snap ${id} ${from.id}`);
            }
            await this.setTransactionId(T, T + 1);
          },
        );
        this.log.info("dm-thin clone", { volume: name, origin, id, originWasActive: suspended, ms: Date.now() - started });
      } catch (err) {
        throw this.failure(what, name, err);
      }
    });
  }

  activate(name: string): Promise<string> {
    return this.lock.with("pool", async () => {
      try {
        await this.settlePending();
        const vol = this.volume(name);
        return await this.activateDevice(name, vol);
      } catch (err) {
        throw this.failure("activate", name, err);
      }
    });
  }

  private async activateDevice(name: string, vol: VolumeRecord): Promise<string> {
    const devName = this.deviceName(name);
    const want = thinTable(vol.sizeBytes / 512, this.poolDevice, vol.id);
    const dev = await deviceInfo(this.runner, devName);
    if (dev) {
      const have = (await tableOf(this.runner, devName)).trim().split(/\s+/).join(" ");
      if (have !== want) {
        throw new ConflictError(`device ${devName} is active but maps ${JSON.stringify(have)}, not thin id ${vol.id} of ${this.poolName}; remove that device`);
      }
      if (dev.suspended) await resumeDevice(this.runner, devName);
    } else {
      await createDevice(this.runner, devName, want);
      this.log.debug("dm-thin activate", { volume: name, id: vol.id });
    }
    await makeNodes(this.runner, devName);
    return dmPath(devName);
  }

  deactivate(name: string): Promise<void> {
    return this.lock.with("pool", async () => {
      const devName = this.deviceName(name);
      try {
        const dev = await deviceInfo(this.runner, devName);
        if (!dev) return;
        const vol = this.open_.volumes.get(name);
        if (vol) {
          try {
            vol.allocatedBytes = (await thinStatus(this.runner, devName)).mappedSectors * 512;
          } catch (err) {
            this.log.debug("cannot read a thin volume's allocation", { volume: name, error: errorMessage(err) });
          }
        }
        if (dev.openCount > 0) throw new ConflictError(`${dmPath(devName)} is in use (open ${dev.openCount} times); unmount it first`);
        await removeDevice(this.runner, devName);
        if (vol) await this.save();
      } catch (err) {
        throw this.failure("deactivate", name, err);
      }
    });
  }

  /**
   * Takes a volume's device away before its id is deleted, discarding its blocks
   * first so the sparse data file gives the space back. Throws ConflictError when
   * the device is open: then nothing has been changed.
   */
  private async tearDownForRemove(name: string): Promise<void> {
    const devName = this.deviceName(name);
    let dev = await deviceInfo(this.runner, devName);
    if (dev && dev.openCount > 0) {
      throw new ConflictError(`${dmPath(devName)} is in use (open ${dev.openCount} times); unmount it first`);
    }
    const vol = this.open_.volumes.get(name);
    if (!dev && vol) {
      try {
        await this.activateDevice(name, vol);
        dev = await deviceInfo(this.runner, devName);
      } catch (err) {
        this.log.warn("cannot activate a volume to discard its blocks; its space stays in the data file until reused", { volume: name, error: errorMessage(err) });
      }
    }
    if (!dev) return;
    try {
      await discardDevice(this.runner, dmPath(devName));
    } catch (err) {
      this.log.warn("blkdiscard failed; the volume's space stays in the data file until reused", { volume: name, error: errorMessage(err) });
    }
    await removeDevice(this.runner, devName);
  }

  remove(name: string): Promise<void> {
    return this.lock.with("pool", async () => {
      const started = Date.now();
      try {
        await this.settlePending();
        const state = this.open_;
        const vol = state.volumes.get(name);
        if (!vol) return;
        const T = state.transactionId;
        const p: Pending = { op: "remove", name, id: vol.id, fromTransaction: T };
        await this.journal(p);
        try {
          await this.tearDownForRemove(name);
        } catch (err) {
          // Nothing is deleted yet: keep the volume.
          state.pending = undefined;
          await this.save();
          throw err;
        }
        await this.commitJournalled(p, async () => {
          await this.deleteThinId(vol.id);
          await this.setTransactionId(T, T + 1);
        });
        this.log.info("dm-thin remove", { volume: name, id: vol.id, ms: Date.now() - started });
      } catch (err) {
        throw this.failure("remove", name, err);
      }
    });
  }

  async usage(): Promise<PoolUsage> {
    const state = this.open_;
    const status = await thinPoolStatus(this.runner, this.poolName);
    const block = state.blockSizeSectors * 512;
    return {
      driver: "dm-thin",
      dataTotalBytes: status.dataTotalBlocks * block,
      dataUsedBytes: status.dataUsedBlocks * block,
      metaTotalBytes: status.metaTotalBlocks * 4096,
      metaUsedBytes: status.metaUsedBlocks * 4096,
    };
  }

  async allocatedBytes(name: string): Promise<number> {
    const vol = this.volume(name);
    const devName = this.deviceName(name);
    if (await deviceInfo(this.runner, devName)) {
      try {
        vol.allocatedBytes = (await thinStatus(this.runner, devName)).mappedSectors * 512;
      } catch (err) {
        throw this.failure("read the allocation of", name, err);
      }
    }
    return vol.allocatedBytes ?? 0;
  }
}
