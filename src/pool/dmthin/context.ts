import { join } from "node:path";
import { ConflictError, InvalidRequestError, NotFoundError, ThinvolError } from "../../errors.js";
import { KeyedLock } from "../../locks.js";
import type { Logger } from "../../log.js";
import { formatSize } from "../../size.js";
import { realBlockDevices, type BlockDevices } from "../../system/blockdev.js";
import type { Runner } from "../../system/runner.js";
import { realHostSpace, type HostSpace } from "../host-space.js";
import type { OpenReader } from "./readers.js";
import { saveState, snapshotKey, type PoolState, type SnapshotRecord, type VolumeRecord } from "./state.js";

export interface DmThinOptions {
  runner: Runner;
  /** A directory the driver owns: data.img, meta.img and its state file. */
  dir: string;
  /**
   * The most data space the pool may take (POOL_SIZE). The data file is allocated on the
   * host and the pool grown in steps up to this, while the host has room. It may grow
   * between runs, never shrink. Ignored when the data is on a device.
   */
  dataSizeBytes: number;
  /**
   * POOL_DEVICE: a block device the pool keeps its data on, whole, instead of data.img.
   * Unset or empty: data.img. A pool never moves between the two.
   */
  dataDevice?: string;
  /** How block devices are found from paths (tests play simulated disks). */
  blockDevices?: BlockDevices;
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

declare const held: unique symbol;

/**
 * The context as handed out inside the pool lock. Whatever needs the lock (the journal,
 * growth, the free-space check) takes this type, so it cannot be reached without it.
 */
export type Locked = DmThinContext & { readonly [held]: true };

/**
 * What the parts of the dm-thin driver share: its settings, checked once, and what open()
 * learns of the pool (its state, devices and sizes).
 */
export class DmThinContext {
  readonly runner: Runner;
  readonly dir: string;
  readonly log: Logger;
  readonly prefix: string;
  readonly poolName: string;
  readonly wantDataBytes: number;
  readonly wantBlockSize: number;
  readonly minFreePercent: number;
  readonly dataFile: string;
  readonly metaFile: string;
  readonly host: HostSpace;
  readonly growthIntervalMs: number;
  /** POOL_DEVICE, or "" when the data is in data.img. */
  readonly deviceSetting: string;
  readonly blockDevices: BlockDevices;
  /** Ids and transaction ids are handed out one operation at a time. */
  private readonly lock = new KeyedLock();

  state: PoolState | undefined;
  /** major:minor of the pool device, for thin tables (no /dev node needed). */
  poolDevice = "";
  /** The block device under the pool's data: data.img's loop device, or POOL_DEVICE resolved. */
  dataDevice = "";
  metaLoop = "";
  /** The most data space the pool may take: POOL_SIZE, or more if the pool already has it. */
  poolMaxBytes = 0;
  blockBytes = 0;
  headroom = 0;
  /** Snapshot readers this process has open, by device name (readers.ts), and how many were ever opened (their names' numbers). */
  readonly readers = new Map<string, OpenReader>();
  readerCount = 0;
  /** Reader devices an earlier run left that were still open at open(), with the thin id each maps. */
  readonly leftReaders = new Map<string, number>();
  /** Warned once, until the condition clears, not on every check. */
  hostLowWarned = false;
  sparseWarned = false;

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
    this.deviceSetting = opts.dataDevice ?? "";
    if (this.deviceSetting !== "" && !this.deviceSetting.startsWith("/")) {
      throw new InvalidRequestError(`dm-thin data device ${JSON.stringify(this.deviceSetting)} must be an absolute path`);
    }
    this.blockDevices = opts.blockDevices ?? realBlockDevices;
  }

  /** True when the data is on POOL_DEVICE: no data file, no host space to reserve, no growth. */
  get onDevice(): boolean {
    return this.deviceSetting !== "";
  }

  /** The files the pool's loop devices are made from. */
  get backingFiles(): string[] {
    return this.onDevice ? [this.metaFile] : [this.dataFile, this.metaFile];
  }

  deviceName(volume: string): string {
    return `${this.prefix}-${volume}`;
  }

  get openState(): PoolState {
    if (!this.state) throw new ThinvolError(`dm-thin pool ${this.poolName} is not open`);
    return this.state;
  }

  /** The volume's record; NotFoundError naming it when there is none. */
  volume(name: string): VolumeRecord {
    const vol = this.openState.volumes.get(name);
    if (!vol) throw new NotFoundError(`no thin volume "${name}" in pool ${this.poolName}`);
    return vol;
  }

  /** The snapshot's record; NotFoundError naming both when there is none. */
  snapshot(volume: string, snapshot: string): SnapshotRecord {
    const snap = this.openState.snapshots.get(snapshotKey(volume, snapshot));
    if (!snap) throw new NotFoundError(`no snapshot "${snapshot}" of thin volume "${volume}" in pool ${this.poolName}`);
    return snap;
  }

  /** Refuses a name a new volume cannot take. */
  checkNewName(name: string): void {
    if (name === "pool") throw new InvalidRequestError(`volume name "pool" is reserved by the dm-thin driver (its device would clash with ${this.poolName})`);
    if (this.openState.volumes.has(name)) throw new ConflictError(`thin volume "${name}" already exists in pool ${this.poolName}`);
  }

  async save(): Promise<void> {
    await saveState(this.dir, this.openState);
  }

  /** Runs `work` under the pool lock: the one place a Locked context comes from. */
  withLock<T>(work: (ctx: Locked) => Promise<T>): Promise<T> {
    return this.lock.with("pool", () => work(this as DmThinContext as Locked));
  }
}
