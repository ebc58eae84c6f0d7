import { stat, statfs, truncate } from "node:fs/promises";
import { dirname } from "node:path";
import { ThinvolError, errorMessage } from "../errors.js";
import { KeyedLock } from "../locks.js";
import type { Logger } from "../log.js";
import { formatSize } from "../size.js";
import { allocateFileRange, allocateRange, allocateRanges, fileExtents, gapsBetween, punchRange, type Extent } from "../system/extents.js";
import type { Runner } from "../system/runner.js";
import { headroomBytes, hostFloorBytes } from "./host-space.js";

const MiB = 1024 ** 2;

/** The reserve follows use in steps no finer than this, so a writer does not cause a command per block. */
const SLACK_MAX = 64 * MiB;
/** Left out of the balloon when it is made: the pool's XFS needs some room for its own metadata. */
const BALLOON_MARGIN = 32 * MiB;
/** How often the pool's free space is looked at (one statfs, no process) while the plugin runs. */
export const RESERVE_POLL_MS = 200;

export interface HostReserveOptions {
  runner: Runner;
  log: Logger;
  /** The pool's file on the host. */
  poolFile: string;
  /** Where the pool's filesystem is mounted. */
  mnt: string;
  /** The balloon: a file in the pool's filesystem that holds the pool space not backed by the host. */
  balloon: string;
}

export interface ReserveFigures {
  /** Free pool space that volumes can write into now. */
  poolFreeBytes: number;
  /** Host blocks the pool file holds. */
  hostReservedBytes: number;
  /** Free space of the host filesystem under the pool. */
  hostFreeBytes: number;
  /** Pool space held back because the host has not backed it (yet). */
  balloonBytes: number;
}

const roundDown = (n: number, unit: number) => Math.floor(n / unit) * unit;

/**
 * Keeps every block the pool can write into backed by a block already allocated on the host,
 * so that a full host disk makes a write fail with ENOSPC in the pool, never with an I/O
 * error under it (which shuts the pool's filesystem down and every volume with it).
 *
 * The pool's filesystem is as large as POOL_SIZE, and its file on the host is sparse. All of
 * its free space but a headroom is taken by a balloon file, fallocated in the pool (so it
 * reads as zeros and writes nothing) and punched out of the host file. The headroom is free
 * pool space whose host blocks are allocated. As volumes write, the headroom is refilled from
 * the balloon's tail: its blocks are allocated on the host first, then the balloon is cut
 * short, so they are backed before anything can write into them. When volumes free space,
 * the balloon grows over the surplus and its new blocks are punched: the host gets the space
 * back. The pool is mounted without discard, so nothing else punches the host file.
 *
 * Every step leaves the pool safe after a crash: at worst a balloon block is still allocated
 * on the host, which setUp() notices (the host file holds more than the pool can use) and
 * punches again.
 */
export class HostReserve {
  private readonly lock = new KeyedLock();
  private hostLow = false;
  private timer: NodeJS.Timeout | undefined;
  private headroom = 0;
  /** The device number of the pool's filesystem, taken at setUp(): nothing is done anywhere else. */
  private poolDev: number | undefined;

  constructor(
    private readonly o: HostReserveOptions,
    poolSizeBytes: number,
  ) {
    this.setPoolSize(poolSizeBytes);
  }

  setPoolSize(poolSizeBytes: number): void {
    this.headroom = headroomBytes(poolSizeBytes, MiB);
  }

  private get slack(): number {
    return Math.min(SLACK_MAX, this.headroom / 8);
  }

  private async hostFloor(): Promise<{ avail: number; floor: number }> {
    const s = await statfs(this.o.poolFile);
    return { avail: s.bavail * s.bsize, floor: hostFloorBytes(s.blocks * s.bsize) };
  }

  /**
   * The balloon is only ever touched inside the pool's own filesystem: were the pool
   * unmounted under the plugin, the same path would lie on the host's filesystem.
   */
  private async poolMounted(): Promise<boolean> {
    if (this.poolDev === undefined) return false;
    const [here, parent] = await Promise.all([stat(this.o.mnt), stat(dirname(this.o.mnt))]);
    return here.dev === this.poolDev && here.dev !== parent.dev;
  }

  private async poolFree(): Promise<number> {
    const s = await statfs(this.o.mnt);
    return s.bavail * s.bsize;
  }

  private async balloonSize(): Promise<number | undefined> {
    try {
      return (await stat(this.o.balloon)).size;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw err;
    }
  }

  async figures(): Promise<ReserveFigures> {
    const [poolFreeBytes, file, host, balloonBytes] = await Promise.all([
      this.poolFree(),
      stat(this.o.poolFile),
      statfs(this.o.poolFile),
      this.balloonSize(),
    ]);
    return { poolFreeBytes, hostReservedBytes: file.blocks * 512, hostFreeBytes: host.bavail * host.bsize, balloonBytes: balloonBytes ?? 0 };
  }

  /**
   * Run once the pool's filesystem is mounted: makes the balloon for a pool that has none (a
   * new pool, or one made before the reserve existed), punches balloon blocks that a crash
   * left allocated on the host, then backs the headroom.
   */
  async setUp(): Promise<void> {
    await this.lock.with("reserve", async () => {
      const [here, parent] = await Promise.all([stat(this.o.mnt), stat(dirname(this.o.mnt))]);
      if (here.dev === parent.dev) throw new ThinvolError(`the loop pool is not mounted at ${this.o.mnt}`);
      this.poolDev = here.dev;
      if ((await this.balloonSize()) === undefined) {
        await this.inflate(0, roundDown((await this.poolFree()) - BALLOON_MARGIN, MiB), "the pool's free space");
        this.o.log.info("host space reserve set up: free pool space is backed on the host only as volumes need it", { file: this.o.poolFile });
      } else {
        await this.punchStrayBalloonBlocks();
      }
      await this.backAllButBalloon();
    });
    await this.rebalance();
  }

  /**
   * Backs on the host every block of the pool file that the balloon does not hold: the pool's
   * metadata and log, its free space, and the free blocks XFS keeps back for itself. Its
   * reserves are counts, not places: a volume's data can land on any free block. The
   * balloon's blocks are then the only ones not backed, and the pool never writes there.
   * Blocks already allocated cost nothing, so this runs at every start and after growth.
   */
  private async backAllButBalloon(): Promise<void> {
    const [file, balloon] = await Promise.all([stat(this.o.poolFile), this.balloonSize()]);
    const held = (await fileExtents(this.o.runner, this.o.balloon, { offset: 0, length: balloon ?? 0 })).map((e) => ({
      offset: e.deviceOffset,
      length: e.length,
    }));
    try {
      await allocateRanges(this.o.runner, this.o.poolFile, gapsBetween(held, file.size));
    } catch (err) {
      this.o.log.warn("could not back all of the pool's own space on the host; a full host disk may fail its writes", {
        file: this.o.poolFile,
        error: errorMessage(err),
      });
    }
  }

  /** After the pool's filesystem grew: the balloon takes the new space, which the host has not backed. */
  async absorbGrowth(grownBytes: number): Promise<void> {
    await this.lock.with("reserve", async () => {
      if (!(await this.poolMounted())) return;
      const size = (await this.balloonSize()) ?? 0;
      await this.inflate(size, roundDown(Math.min(grownBytes, (await this.poolFree()) - BALLOON_MARGIN), MiB), "the pool's new space");
      // The new space's own metadata and reserved blocks are not in the balloon.
      await this.backAllButBalloon();
    });
    await this.rebalance();
  }

  /**
   * Balloon blocks allocated on the host are found by the host file holding more than all
   * of the pool but the balloon.
   */
  private async punchStrayBalloonBlocks(): Promise<void> {
    const [file, balloon] = await Promise.all([stat(this.o.poolFile), this.balloonSize()]);
    const usable = file.size - (balloon ?? 0);
    if (file.blocks * 512 <= usable + BALLOON_MARGIN) return;
    this.o.log.warn("the host backs blocks the pool holds back (an interrupted resize of the reserve); giving them back", {
      file: this.o.poolFile,
      excess: formatSize(file.blocks * 512 - usable),
    });
    await this.punchOnHost(await fileExtents(this.o.runner, this.o.balloon, { offset: 0, length: balloon ?? 0 }));
  }

  /** Grows the balloon from `at` by `length` bytes of free pool space and gives their host blocks back. */
  private async inflate(at: number, length: number, what: string): Promise<void> {
    if (length <= 0) return;
    try {
      await allocateFileRange(this.o.runner, this.o.balloon, { offset: at, length });
    } catch (err) {
      this.o.log.warn(`could not hold back ${what}; it stays backed on the host`, { file: this.o.poolFile, bytes: length, error: errorMessage(err) });
      return;
    }
    await this.punchOnHost(await fileExtents(this.o.runner, this.o.balloon, { offset: at, length }));
  }

  private async punchOnHost(extents: readonly Extent[]): Promise<void> {
    for (const e of extents) await punchRange(this.o.runner, this.o.poolFile, { offset: e.deviceOffset, length: e.length });
  }

  /**
   * Brings the backed free space back to the headroom when it is more than `slack` away:
   * backs more of the pool while the host has room above its floor, or returns a surplus to
   * the host. Returns the pool's free space.
   */
  async rebalance(slack = this.slack): Promise<number> {
    return this.lock.with("reserve", async () => {
      if (!(await this.poolMounted())) throw new ThinvolError(`the loop pool is not mounted at ${this.o.mnt}`);
      const free = await this.poolFree();
      const balloon = (await this.balloonSize()) ?? 0;
      // The reserve moves in whole MiB: less than that is not worth a command.
      const band = Math.max(slack, MiB);
      if (free < this.headroom - band && balloon > 0) await this.back(free, balloon);
      else if (free > this.headroom + band) await this.release(free, balloon);
      return this.poolFree();
    });
  }

  /** Moves pool space from the balloon's tail to the free space, allocating its host blocks first. */
  private async back(free: number, balloon: number): Promise<void> {
    const host = await this.hostFloor();
    const want = Math.min(balloon, this.headroom - free);
    const amount = roundDown(Math.min(want, host.avail - host.floor), MiB);
    if (host.avail - host.floor < want) this.warnHostLow(free, host.avail);
    if (amount <= 0) return;
    const extents = await fileExtents(this.o.runner, this.o.balloon, { offset: balloon - amount, length: amount });
    const backed: Extent[] = [];
    try {
      for (const e of extents) {
        await allocateRange(this.o.runner, this.o.poolFile, { offset: e.deviceOffset, length: e.length });
        backed.push(e);
      }
    } catch (err) {
      // The host filled up under us: leave the balloon as it was and give back what was taken.
      this.o.log.warn("could not allocate host space for the pool", { file: this.o.poolFile, error: errorMessage(err) });
      await this.punchOnHost(backed);
      return;
    }
    await truncate(this.o.balloon, balloon - amount);
    if (this.hostLow && amount === want) {
      this.hostLow = false;
      this.o.log.info("the host has room for the pool again", { file: this.o.poolFile, hostFree: formatSize(host.avail - amount) });
    }
    this.o.log.debug("host space reserve grown", { file: this.o.poolFile, bytes: amount });
  }

  /** Returns free pool space above the headroom to the host. */
  private async release(free: number, balloon: number): Promise<void> {
    // Space freed a moment ago is busy until the pool's log is written; a sync lets the balloon take it.
    await this.o.runner.run("sync", ["--file-system", this.o.mnt]);
    const amount = roundDown(free - this.headroom, MiB);
    await this.inflate(balloon, amount, "free pool space");
    this.o.log.debug("host space reserve returned", { file: this.o.poolFile, bytes: amount });
  }

  private warnHostLow(poolFree: number, hostFree: number): void {
    if (this.hostLow) return;
    this.hostLow = true;
    this.o.log.warn("the host filesystem under the pool is nearly full: volumes can write only what the pool has reserved; creates are refused", {
      file: this.o.poolFile,
      poolFree: formatSize(poolFree),
      hostFree: formatSize(hostFree),
    });
  }

  /**
   * Why a new volume cannot be made now, or undefined: the pool has used up its reserve and
   * the host cannot back more.
   */
  async refusal(): Promise<string | undefined> {
    const free = await this.rebalance();
    if (free >= this.headroom / 2) return undefined;
    const host = await this.hostFloor();
    if (host.avail - host.floor >= this.headroom / 2) return undefined;
    return (
      `the pool has ${formatSize(free)} of reserved space left and the host filesystem under it (${this.o.poolFile}) ` +
      `has only ${formatSize(host.avail)} free; free space on the host or remove volumes`
    );
  }

  /** Keeps the reserve following use while the plugin runs. */
  startWatching(): void {
    this.stopWatching();
    let busy = false;
    this.timer = setInterval(() => {
      if (busy) return;
      busy = true;
      void this.watchOnce()
        .catch((err: unknown) => this.o.log.warn("could not adjust the host space reserve", { file: this.o.poolFile, error: errorMessage(err) }))
        .finally(() => (busy = false));
    }, RESERVE_POLL_MS);
    this.timer.unref();
  }

  /** Stops watching; the pool is being taken down. */
  stopWatching(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  private async watchOnce(): Promise<void> {
    if (!(await this.poolMounted())) {
      this.o.log.warn("the loop pool was unmounted under the plugin; the host space reserve is no longer kept", { file: this.o.poolFile });
      this.stopWatching();
      return;
    }
    const free = await this.poolFree();
    if (free < this.headroom - this.slack || free > this.headroom + this.slack) await this.rebalance();
  }
}
