import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { CommandError, ConflictError, InvalidRequestError, NoSpaceError, NotFoundError, ThinvolError, errorMessage } from "../errors.js";
import type { Logger } from "../log.js";
import { formatSize } from "../size.js";
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
  type DmDevice,
} from "../system/dmsetup.js";
import { attachOrReuseLoop, detachLoop, loopsOf, refreshLoopSize } from "../system/losetup.js";
import type { Runner } from "../system/runner.js";
import { checkThinMetadata } from "../system/thin-tools.js";
import { allocateFile, fileSize, growSparseFile, loopDeviceNumber, metadataIsBlank, metadataSizeFor } from "./dmthin-backing.js";
import { headroomBytes, hostFloorBytes, planGrowth, realHostSpace, type HostSpace } from "./host-space.js";
import { KeyedLock } from "../locks.js";
import { MAX_THIN_ID, loadState, saveState, stateFile, type Pending, type PoolState, type VolumeRecord } from "./dmthin-state.js";
import type { CloneOptions, Pool, PoolUsage } from "./types.js";

export { dmThinAvailable } from "./dmthin-probe.js";

export interface DmThinOptions {
  runner: Runner;
  /** A directory the driver owns: data.img, meta.img and its state file. */
  dir: string;
  /**
   * The most data space the pool may take (POOL_SIZE). The data file is allocated on the
   * host and the pool grown in steps up to this, while the host has room. It may grow
   * between runs, never shrink.
   */
  dataSizeBytes: number;
  log: Logger;
  /** Prefix of the dm device names: `<name>-pool`, `<name>-<volume>`. Default "thinvol", at most 30 characters. */
  name?: string;
  /** Pool block size for a new pool, in 512-byte sectors (default 128 = 64 KiB). An existing pool keeps its own. */
  blockSizeSectors?: number;
  /** Refuse create and clone when less than this percentage of data or metadata space is free (default 10). */
  minFreePercent?: number;
  /** The host filesystem's figures (tests play a small host). */
  host?: HostSpace;
  /** How often the pool's free reserved space is checked, to grow it; 0: only on open and create (tests). Default 2000. */
  growthIntervalMs?: number;
}

/**
 * no_discard_passdown: a discard frees blocks inside the pool but never punches a hole in
 * the data file, whose host space stays reserved for the pool.
 */
const FEATURES = ["skip_block_zeroing", "error_if_no_space", "no_discard_passdown"] as const;

/** The fewest data blocks a pool is made with. */
const MIN_POOL_BLOCKS = 16;

/** What is at a volume's device name: nothing, this pool's thin device of that volume, or something else. */
type Occupant = { kind: "absent" } | { kind: "ours"; dev: DmDevice } | { kind: "foreign"; dev: DmDevice; table: string };

/**
 * The dm-thin pool: a data file and a metadata file, each on a loop device, joined
 * into a thin-pool device; each volume is a thin device in it.
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
 *
 * Host space. The data file is allocated (never sparse) as far as the pool's data device
 * reaches, so a full host disk cannot fail a write half-way; the pool keeps about a
 * headroom of free, reserved space and grows (allocate, losetup -c, reload the table) while
 * the host has room, up to its size. When the host cannot give more, creates are refused
 * and a full pool fails writes with EIO (error_if_no_space) on the volume that writes.
 * A grow saves its new length before the table is reloaded, so a pool re-created after a
 * crash is never shorter than its metadata.
 *
 * Devices. Every path that touches a device named `<prefix>-<volume>` first checks that
 * its table is this pool's thin device of that volume; anything else is left alone.
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
  private readonly host: HostSpace;
  private readonly growthIntervalMs: number;
  /** Ids and transaction ids are handed out one operation at a time. */
  private readonly lock = new KeyedLock();

  private state: PoolState | undefined;
  /** major:minor of the pool device, for thin tables (no /dev node needed). */
  private poolDevice = "";
  private dataLoop = "";
  private metaLoop = "";
  /** The most data space the pool may take: POOL_SIZE, or more if the pool already has it. */
  private poolMaxBytes = 0;
  private blockBytes = 0;
  private headroom = 0;
  private growthTimer: NodeJS.Timeout | undefined;
  /** Warned once, until the condition clears, not on every check. */
  private hostLowWarned = false;
  private sparseWarned = false;
  private lastGrowthError = "";

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
    this.host = opts.host ?? realHostSpace;
    this.growthIntervalMs = opts.growthIntervalMs ?? 2000;
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
      this.blockBytes = blockBytes;
      const fresh = state.transactionId === 0 && state.volumes.size === 0 && state.pending === undefined;
      if (!fresh) {
        for (const file of [this.dataFile, this.metaFile]) {
          if ((await fileSize(file)) === undefined) {
            throw new ThinvolError(`dm-thin pool file ${file} is missing, but ${stateFile(this.dir)} says the pool holds volumes; restore the file or move the directory aside to start an empty pool`);
          }
        }
      }

      let poolMax = Math.floor(this.wantDataBytes / blockBytes) * blockBytes;
      if (poolMax < state.dataSizeBytes) {
        this.log.warn("dm-thin pool cannot shrink; keeping its size", { pool: this.poolName, size: formatSize(state.dataSizeBytes), asked: formatSize(poolMax) });
        poolMax = state.dataSizeBytes;
      }

      // Metadata is sized for the whole pool at once and fully allocated: it is small.
      const metaBytes = Math.max(state.metaSizeBytes, metadataSizeFor(poolMax, state.blockSizeSectors));
      await this.allocateOrFail(this.metaFile, metaBytes, "metadata");
      let lengthBytes = state.dataSizeBytes;
      if (lengthBytes === 0) {
        lengthBytes = await this.initialLength(poolMax, blockBytes);
        await this.allocateOrFail(this.dataFile, lengthBytes, "data");
      } else {
        await growSparseFile(this.dataFile, lengthBytes);
        await this.adoptSparseData(lengthBytes);
      }

      let dataLoop = await attachOrReuseLoop(this.runner, this.dataFile, this.log);
      let metaLoop = await attachOrReuseLoop(this.runner, this.metaFile, this.log);
      let dataNo = await loopDeviceNumber(this.runner, dataLoop);
      let metaNo = await loopDeviceNumber(this.runner, metaLoop);

      const live = (await listDevices(this.runner)).get(this.poolName);
      let liveLength = 0;
      let liveSettings = "";
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
        liveSettings = `${table.lowWaterBlocks} ${table.features.join(" ")}`;
      }
      this.dataLoop = dataLoop;
      this.metaLoop = metaLoop;

      // Never shorter than the live pool (a grow the state file missed).
      lengthBytes = Math.max(lengthBytes, liveLength);
      poolMax = Math.max(poolMax, lengthBytes);
      this.poolMaxBytes = poolMax;
      this.headroom = headroomBytes(poolMax, blockBytes);
      const metaGrew = metaBytes > state.metaSizeBytes;
      const table = this.poolTable(lengthBytes);

      if (live) {
        // A pool made by an earlier version also gets this version's features and low-water mark.
        const settingsDiffer = liveSettings !== `${this.headroom / blockBytes} ${FEATURES.join(" ")}`;
        if (lengthBytes > liveLength || metaGrew || settingsDiffer) {
          // The loop devices may predate the growth (or a crash interrupted it).
          await refreshLoopSize(this.runner, dataLoop);
          await refreshLoopSize(this.runner, metaLoop);
          await this.reloadPool(table);
        }
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

      if (lengthBytes !== state.dataSizeBytes || metaBytes !== state.metaSizeBytes) {
        const before = state.dataSizeBytes;
        state.dataSizeBytes = lengthBytes;
        state.metaSizeBytes = metaBytes;
        await saveState(this.dir, state);
        if (before > 0) this.log.info("dm-thin pool grown", { pool: this.poolName, size: formatSize(lengthBytes), metadata: formatSize(metaBytes) });
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
        await this.growLocked();
      } catch (err) {
        this.state = undefined;
        throw err;
      }
      const hostFree = await this.host.freeBytes(this.dir);
      this.log.info("dm-thin pool open", {
        pool: this.poolName,
        volumes: state.volumes.size,
        reused: live !== undefined,
        transaction: state.transactionId,
        reserved: formatSize(state.dataSizeBytes),
        size: formatSize(poolMax),
        hostFree: formatSize(hostFree),
        ms: Date.now() - started,
      });
      this.startGrowthTimer();
    });
  }

  private poolTable(lengthBytes: number): string {
    const blockBytes = this.blockBytes;
    return thinPoolTable({
      lengthSectors: lengthBytes / 512,
      metaDevice: this.metaLoop,
      dataDevice: this.dataLoop,
      blockSizeSectors: blockBytes / 512,
      // The kernel raises an event once less than the headroom is free.
      lowWaterBlocks: this.headroom / blockBytes,
      features: FEATURES,
    });
  }

  // ---------------------------------------------------------------- host space

  /** Allocates a pool file on the host; a host too full to hold it stops with the figures. */
  private async allocateOrFail(file: string, bytes: number, what: string): Promise<void> {
    try {
      await allocateFile(this.runner, file, bytes);
    } catch (err) {
      const free = await this.host.freeBytes(this.dir).catch(() => undefined);
      const msg =
        `cannot reserve ${formatSize(bytes)} on the host for the ${what} of dm-thin pool ${this.poolName} (${file})` +
        `${free === undefined ? "" : `: the host filesystem has ${formatSize(free)} free`}; free space under ${this.dir} or lower POOL_SIZE: ${errorMessage(err)}`;
      throw /No space left/i.test(errorMessage(err)) ? new NoSpaceError(msg, { cause: err }) : new ThinvolError(msg, { cause: err });
    }
  }

  /** A new pool starts with twice the headroom reserved, or what the host can give above its floor. */
  private async initialLength(poolMax: number, blockBytes: number): Promise<number> {
    const headroom = headroomBytes(poolMax, blockBytes);
    const free = await this.host.freeBytes(this.dir);
    const floor = hostFloorBytes(await this.host.totalBytes(this.dir));
    const plan = planGrowth({ lengthBytes: 0, usedBytes: 0, poolMaxBytes: poolMax, headroomBytes: headroom, blockBytes, hostFreeBytes: free, hostFloorBytes: floor });
    if (plan.targetBytes < MIN_POOL_BLOCKS * blockBytes) {
      throw new NoSpaceError(
        `cannot make dm-thin pool ${this.poolName}: the host filesystem under ${this.dir} has ${formatSize(free)} free and keeps ${formatSize(floor)} for itself, ` +
          `too little to reserve even ${formatSize(MIN_POOL_BLOCKS * blockBytes)}; free space on the host or move STATE_DIR`,
      );
    }
    if (plan.hostShort) this.log.warn("dm-thin pool made smaller than its headroom: the host filesystem is low", { pool: this.poolName, reserved: formatSize(plan.targetBytes), hostFree: formatSize(free) });
    return plan.targetBytes;
  }

  /**
   * A pool made before space was reserved has a sparse data file as long as its table:
   * allocate it when the host can hold it; until then it is served as before, with a warning.
   */
  private async adoptSparseData(lengthBytes: number): Promise<void> {
    const missing = lengthBytes - (await this.host.allocatedBytes(this.dataFile));
    if (missing <= 0) return;
    const free = await this.host.freeBytes(this.dir);
    const floor = hostFloorBytes(await this.host.totalBytes(this.dir));
    if (missing <= free - floor) {
      try {
        await allocateFile(this.runner, this.dataFile, lengthBytes);
        this.sparseWarned = false;
        this.log.info("dm-thin pool data file allocated: the host can no longer run out under it", { pool: this.poolName, reserved: formatSize(lengthBytes), hostFree: formatSize(free - missing) });
        return;
      } catch (err) {
        this.log.debug("cannot allocate the data file yet", { pool: this.poolName, error: errorMessage(err) });
      }
    }
    if (!this.sparseWarned) {
      this.sparseWarned = true;
      this.log.warn("dm-thin pool data file is sparse (made by an earlier version) and the host cannot hold all of it yet: a full host disk can fail writes; it is allocated once the host has room", {
        pool: this.poolName,
        unallocated: formatSize(missing),
        hostFree: formatSize(free),
      });
    }
  }

  /**
   * Keeps the headroom free: grows the data file and the pool while the host has room,
   * and warns once when it has not. Runs under the pool lock.
   */
  private async growLocked(): Promise<void> {
    const state = this.open_;
    const block = this.blockBytes;
    const status = await thinPoolStatus(this.runner, this.poolName);
    const lengthBytes = status.dataTotalBlocks * block;
    if (this.sparseWarned) await this.adoptSparseData(lengthBytes);
    if (lengthBytes >= this.poolMaxBytes || (status.dataTotalBlocks - status.dataUsedBlocks) * block >= this.headroom) {
      this.hostBackIfLow();
      return;
    }
    const hostFree = await this.host.freeBytes(this.dir);
    const floor = hostFloorBytes(await this.host.totalBytes(this.dir));
    const started = Date.now();
    const plan = planGrowth({
      lengthBytes,
      usedBytes: status.dataUsedBlocks * block,
      poolMaxBytes: this.poolMaxBytes,
      headroomBytes: this.headroom,
      blockBytes: block,
      hostFreeBytes: hostFree,
      hostFloorBytes: floor,
    });
    if (plan.targetBytes > lengthBytes) {
      const target = Math.max(plan.targetBytes, state.dataSizeBytes);
      try {
        await allocateFile(this.runner, this.dataFile, target);
      } catch (err) {
        this.warnHostLow(hostFree, floor, `cannot allocate ${formatSize(target - lengthBytes)} more: ${errorMessage(err)}`);
        return;
      }
      await refreshLoopSize(this.runner, this.dataLoop);
      // Saved before the reload: a pool re-created after a crash must not be shorter than its metadata.
      state.dataSizeBytes = target;
      await this.save();
      await this.reloadPool(this.poolTable(target));
      this.log.info("dm-thin pool grown", {
        pool: this.poolName,
        reserved: formatSize(target),
        used: formatSize(status.dataUsedBlocks * block),
        size: formatSize(this.poolMaxBytes),
        hostFree: formatSize(await this.host.freeBytes(this.dir)),
        ms: Date.now() - started,
      });
    }
    if (plan.hostShort) this.warnHostLow(await this.host.freeBytes(this.dir), floor, "the host filesystem is low");
    else this.hostBackIfLow();
  }

  private warnHostLow(hostFree: number, floor: number, why: string): void {
    if (this.hostLowWarned) return;
    this.hostLowWarned = true;
    this.log.warn("dm-thin pool cannot reserve more host space: creates are refused and a full pool fails writes; free space on the host", {
      pool: this.poolName,
      why,
      reserved: formatSize(this.open_.dataSizeBytes),
      size: formatSize(this.poolMaxBytes),
      hostFree: formatSize(hostFree),
      hostFloor: formatSize(floor),
    });
  }

  private hostBackIfLow(): void {
    if (!this.hostLowWarned) return;
    this.hostLowWarned = false;
    this.log.info("dm-thin pool has its headroom again", { pool: this.poolName, reserved: formatSize(this.open_.dataSizeBytes) });
  }

  /** Grows the pool now if it is short of headroom (the timer does this every few seconds). */
  growIfNeeded(): Promise<void> {
    return this.lock.with("pool", async () => {
      if (this.state) await this.growLocked();
    });
  }

  private startGrowthTimer(): void {
    this.stopGrowthTimer();
    if (this.growthIntervalMs <= 0) return;
    const tick = () => {
      this.growIfNeeded().then(
        () => {
          this.lastGrowthError = "";
        },
        (err: unknown) => {
          // Once per distinct failure, not once per tick.
          const msg = errorMessage(err);
          if (msg !== this.lastGrowthError) this.log.warn("dm-thin pool space check failed; retrying", { pool: this.poolName, error: msg });
          this.lastGrowthError = msg;
        },
      ).finally(() => {
        if (this.growthTimer !== undefined) this.growthTimer = setTimeout(tick, this.growthIntervalMs).unref();
      });
    };
    this.growthTimer = setTimeout(tick, this.growthIntervalMs).unref();
  }

  private stopGrowthTimer(): void {
    if (this.growthTimer !== undefined) clearTimeout(this.growthTimer);
    this.growthTimer = undefined;
  }

  // ---------------------------------------------------------------- devices

  /** Whether the device at a volume's name is exactly this pool's thin device of that volume. */
  private async occupant(name: string, vol: VolumeRecord | undefined): Promise<Occupant> {
    const devName = this.deviceName(name);
    const dev = await deviceInfo(this.runner, devName);
    if (!dev) return { kind: "absent" };
    const table = (await tableOf(this.runner, devName)).trim().split(/\s+/).join(" ");
    if (vol && this.poolDevice !== "" && table === thinTable(vol.sizeBytes / 512, this.poolDevice, vol.id)) return { kind: "ours", dev };
    return { kind: "foreign", dev, table };
  }

  private foreignDevice(name: string, vol: VolumeRecord | undefined, table: string): ConflictError {
    const devName = this.deviceName(name);
    const expected = vol ? `thin id ${vol.id} of ${this.poolName}` : `a volume of ${this.poolName}`;
    return new ConflictError(
      `device ${devName} has the name of thin volume "${name}" but maps ${JSON.stringify(table)}, not ${expected}; thinvol leaves it untouched. ` +
        `If it is stale, remove it (dmsetup remove ${devName}); if it belongs to something else, give this pool another name`,
    );
  }

  /** The volume's own device, undefined when none is active; throws ConflictError (changing nothing) for any other device of that name. */
  private async ownDevice(name: string, vol: VolumeRecord | undefined): Promise<DmDevice | undefined> {
    const o = await this.occupant(name, vol);
    if (o.kind === "foreign") throw this.foreignDevice(name, vol, o.table);
    return o.kind === "ours" ? o.dev : undefined;
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

  private async resumeLeftSuspended(): Promise<void> {
    const devices = await listDevices(this.runner);
    for (const [name, vol] of this.open_.volumes) {
      if (!devices.get(this.deviceName(name))?.suspended) continue;
      await this.resumeIfSuspended(name, vol);
    }
  }

  async close(): Promise<void> {
    this.stopGrowthTimer();
    await this.lock.with("pool", async () => {
      this.stopGrowthTimer();
      const state = this.state;
      if (!state) return;
      // An idle pool is taken down, so a disabled or removed plugin leaves no device on the
      // host; the next open() sets it up again from its files. Active volumes keep it up;
      // a device that only has a volume's name is not one of them.
      const active: string[] = [];
      for (const [name, vol] of state.volumes) {
        const o = await this.occupant(name, vol);
        if (o.kind === "ours") active.push(name);
        else if (o.kind === "foreign") this.log.warn("a device with a volume's name is not that volume; left untouched", { volume: name, error: this.foreignDevice(name, vol, o.table).message });
      }
      this.state = undefined;
      this.poolDevice = "";
      if (active.length > 0) {
        this.log.info("dm-thin pool left up: volumes are active", { pool: this.poolName, active: active.length });
        return;
      }
      if (await deviceInfo(this.runner, this.poolName)) await removeDevice(this.runner, this.poolName);
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

  /**
   * A crash between suspend and resume leaves a device frozen, and a filesystem on it hung.
   * Only the volume's own device is resumed: a foreign one is left as it is, with a warning,
   * so that recovery never stops on it.
   */
  private async resumeIfSuspended(volume: string, vol: VolumeRecord | undefined): Promise<void> {
    const o = await this.occupant(volume, vol);
    if (o.kind === "foreign") {
      if (o.dev.suspended) this.log.warn("a suspended device with a volume's name is not that volume; left untouched", { volume, error: this.foreignDevice(volume, vol, o.table).message });
      return;
    }
    if (o.kind === "ours" && o.dev.suspended) {
      this.log.warn("resuming a thin volume left suspended", { volume });
      await resumeDevice(this.runner, o.dev.name);
    }
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
    if (p.op === "clone") await this.resumeIfSuspended(p.origin, state.volumes.get(p.origin));
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

  /** Grows the pool first if it is short of headroom, then refuses when it still is, or is nearly full. */
  private async checkSpace(volume: string, what: string): Promise<void> {
    await this.growLocked();
    const status = await thinPoolStatus(this.runner, this.poolName);
    const fail = (why: string) => new NoSpaceError(`cannot ${what} thin volume "${volume}" in pool ${this.poolName}: ${why}; remove volumes or grow the pool`);
    const block = this.blockBytes;
    const lengthBytes = status.dataTotalBlocks * block;
    const freeReserved = (status.dataTotalBlocks - status.dataUsedBlocks) * block;
    if (lengthBytes < this.poolMaxBytes && freeReserved < this.headroom) {
      // The pool may grow but the host cannot give it room.
      const hostFree = await this.host.freeBytes(this.dir);
      const floor = hostFloorBytes(await this.host.totalBytes(this.dir));
      throw new NoSpaceError(
        `cannot ${what} thin volume "${volume}" in pool ${this.poolName}: the host filesystem under ${this.dir} has only ${formatSize(hostFree)} free ` +
          `(the pool leaves ${formatSize(floor)} of it to the host), so the pool cannot reserve more than its ${formatSize(lengthBytes)}, ` +
          `of which ${formatSize(freeReserved)} is free (it keeps ${formatSize(this.headroom)} ahead). Free space on the host filesystem, or remove volumes`,
      );
    }
    if (status.mode === "out_of_data_space") throw fail("the pool is out of data space");
    if (status.mode === "ro") throw new ThinvolError(`cannot ${what} thin volume "${volume}": pool ${this.poolName} is read-only (its metadata needs checking)`);
    // Against the size the pool may grow to, not what it has reserved so far.
    const totalBlocks = Math.max(status.dataTotalBlocks, Math.floor(this.poolMaxBytes / block));
    const dataFree = totalBlocks - status.dataUsedBlocks;
    if (dataFree * 100 < totalBlocks * this.minFreePercent) {
      throw fail(`only ${formatSize(dataFree * block)} of ${formatSize(totalBlocks * block)} of data space is free, under the ${this.minFreePercent}% minimum`);
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

  async attached(): Promise<Set<string>> {
    const devices = await listDevices(this.runner);
    return new Set([...this.open_.volumes.keys()].filter((name) => devices.has(this.deviceName(name))));
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
        await this.checkSpace(name, "create");
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
        await this.checkSpace(name, what);
        // Checked before anything is written: a foreign device is never suspended.
        const originActive = (await this.ownDevice(origin, from)) !== undefined;
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
            if (originActive) {
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
    const dev = await this.ownDevice(name, vol);
    if (dev) {
      if (dev.suspended) await resumeDevice(this.runner, devName);
    } else {
      await createDevice(this.runner, devName, thinTable(vol.sizeBytes / 512, this.poolDevice, vol.id));
      this.log.debug("dm-thin activate", { volume: name, id: vol.id });
    }
    await makeNodes(this.runner, devName);
    return dmPath(devName);
  }

  deactivate(name: string): Promise<void> {
    return this.lock.with("pool", async () => {
      const devName = this.deviceName(name);
      try {
        const vol = this.open_.volumes.get(name);
        const dev = await this.ownDevice(name, vol);
        if (!dev || !vol) return;
        try {
          vol.allocatedBytes = (await thinStatus(this.runner, devName)).mappedSectors * 512;
        } catch (err) {
          this.log.debug("cannot read a thin volume's allocation", { volume: name, error: errorMessage(err) });
        }
        if (dev.openCount > 0) throw new ConflictError(`${dmPath(devName)} is in use (open ${dev.openCount} times); unmount it first`);
        await removeDevice(this.runner, devName);
        await this.save();
      } catch (err) {
        throw this.failure("deactivate", name, err);
      }
    });
  }

  /**
   * Takes a volume's device away before its id is deleted. No discard first: the pool
   * keeps its host space (no_discard_passdown), and deleting the id frees its blocks.
   * Throws ConflictError when the device is open or is not the volume's: then nothing has
   * been changed.
   */
  private async tearDownForRemove(name: string): Promise<void> {
    const devName = this.deviceName(name);
    const dev = await this.ownDevice(name, this.open_.volumes.get(name));
    if (!dev) return;
    if (dev.openCount > 0) {
      throw new ConflictError(`${dmPath(devName)} is in use (open ${dev.openCount} times); unmount it first`);
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

  /** Data figures are against the size the pool may grow to; host figures say how much of it is reserved. */
  async usage(): Promise<PoolUsage> {
    this.open_;
    const status = await thinPoolStatus(this.runner, this.poolName);
    const block = this.blockBytes;
    const [data, meta, hostFree] = await Promise.all([
      this.host.allocatedBytes(this.dataFile),
      this.host.allocatedBytes(this.metaFile),
      this.host.freeBytes(this.dir),
    ]);
    return {
      driver: "dm-thin",
      dataTotalBytes: Math.max(status.dataTotalBlocks * block, this.poolMaxBytes),
      dataUsedBytes: status.dataUsedBlocks * block,
      metaTotalBytes: status.metaTotalBlocks * 4096,
      metaUsedBytes: status.metaUsedBlocks * 4096,
      hostReservedBytes: data + meta,
      hostFreeBytes: hostFree,
    };
  }

  async allocatedBytes(name: string): Promise<number> {
    const vol = this.volume(name);
    const devName = this.deviceName(name);
    try {
      if (await this.ownDevice(name, vol)) vol.allocatedBytes = (await thinStatus(this.runner, devName)).mappedSectors * 512;
    } catch (err) {
      throw this.failure("read the allocation of", name, err);
    }
    return vol.allocatedBytes ?? 0;
  }
}
