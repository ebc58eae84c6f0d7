import { NoSpaceError, ThinvolError, errorMessage } from "../../errors.js";
import { formatSize } from "../../size.js";
import { loadTable, resumeDevice, suspendDevice, thinPoolStatus, thinPoolTable } from "../../system/dmsetup.js";
import { refreshLoopSize } from "../../system/losetup.js";
import { headroomBytes, hostFloorBytes, planGrowth } from "../host-space.js";
import { allocateFile } from "./backing.js";
import type { DmThinContext, Locked } from "./context.js";

/*
 * Host space. The data file is allocated (never sparse) as far as the pool's data device
 * reaches, so a full host disk cannot fail a write half-way; the pool keeps about a
 * headroom of free, reserved space and grows (allocate, losetup -c, reload the table) while
 * the host has room, up to its size. When the host cannot give more, creates are refused
 * and a full pool fails writes with EIO (error_if_no_space) on the volume that writes.
 * A grow saves its new length before the table is reloaded, so a pool re-created after a
 * crash is never shorter than its metadata.
 */

/**
 * no_discard_passdown: a discard frees blocks inside the pool but never punches a hole in
 * the data file, whose host space stays reserved for the pool.
 */
export const FEATURES = ["skip_block_zeroing", "error_if_no_space", "no_discard_passdown"] as const;

/** The fewest data blocks a pool is made with. */
export const MIN_POOL_BLOCKS = 16;

export function poolTable(ctx: DmThinContext, lengthBytes: number): string {
  const blockBytes = ctx.blockBytes;
  return thinPoolTable({
    lengthSectors: lengthBytes / 512,
    metaDevice: ctx.metaLoop,
    dataDevice: ctx.dataDevice,
    blockSizeSectors: blockBytes / 512,
    // The kernel raises an event once less than the headroom is free.
    lowWaterBlocks: ctx.headroom / blockBytes,
    features: FEATURES,
  });
}

/** Loads a new pool table; the pool is suspended only between load and resume, and always resumed. */
export async function reloadPool(ctx: Locked, table: string): Promise<void> {
  await loadTable(ctx.runner, ctx.poolName, table);
  try {
    await suspendDevice(ctx.runner, ctx.poolName);
  } finally {
    await resumeDevice(ctx.runner, ctx.poolName);
  }
}

/** What the host filesystem under the pool has free, and the part of it the pool leaves to the host. */
export async function hostRoom(ctx: DmThinContext): Promise<{ free: number; floor: number }> {
  const free = await ctx.host.freeBytes(ctx.dir);
  const floor = hostFloorBytes(await ctx.host.totalBytes(ctx.dir));
  return { free, floor };
}

/** Allocates a pool file on the host; a host too full to hold it stops with the figures. */
export async function allocateOrFail(ctx: Locked, file: string, bytes: number, what: string): Promise<void> {
  try {
    await allocateFile(ctx.runner, file, bytes);
  } catch (err) {
    const free = await ctx.host.freeBytes(ctx.dir).catch(() => undefined);
    const msg =
      `cannot reserve ${formatSize(bytes)} on the host for the ${what} of dm-thin pool ${ctx.poolName} (${file})` +
      `${free === undefined ? "" : `: the host filesystem has ${formatSize(free)} free`}; free space under ${ctx.dir} or lower POOL_SIZE: ${errorMessage(err)}`;
    throw /No space left/i.test(errorMessage(err)) ? new NoSpaceError(msg, { cause: err }) : new ThinvolError(msg, { cause: err });
  }
}

/** A new pool starts with twice the headroom reserved, or what the host can give above its floor. */
export async function initialLength(ctx: Locked, poolMax: number, blockBytes: number): Promise<number> {
  const headroom = headroomBytes(poolMax, blockBytes);
  const { free, floor } = await hostRoom(ctx);
  const plan = planGrowth({ lengthBytes: 0, usedBytes: 0, poolMaxBytes: poolMax, headroomBytes: headroom, blockBytes, hostFreeBytes: free, hostFloorBytes: floor });
  if (plan.targetBytes < MIN_POOL_BLOCKS * blockBytes) {
    throw new NoSpaceError(
      `cannot make dm-thin pool ${ctx.poolName}: the host filesystem under ${ctx.dir} has ${formatSize(free)} free and keeps ${formatSize(floor)} for itself, ` +
        `too little to reserve even ${formatSize(MIN_POOL_BLOCKS * blockBytes)}; free space on the host or move STATE_DIR`,
    );
  }
  if (plan.hostShort) ctx.log.warn("dm-thin pool made smaller than its headroom: the host filesystem is low", { pool: ctx.poolName, reserved: formatSize(plan.targetBytes), hostFree: formatSize(free) });
  return plan.targetBytes;
}

/**
 * A pool made before space was reserved has a sparse data file as long as its table:
 * allocate it when the host can hold it; until then it is served as before, with a warning.
 */
export async function adoptSparseData(ctx: Locked, lengthBytes: number): Promise<void> {
  const missing = lengthBytes - (await ctx.host.allocatedBytes(ctx.dataFile));
  if (missing <= 0) return;
  const { free, floor } = await hostRoom(ctx);
  if (missing <= free - floor) {
    try {
      await allocateFile(ctx.runner, ctx.dataFile, lengthBytes);
      ctx.sparseWarned = false;
      ctx.log.info("dm-thin pool data file allocated: the host can no longer run out under it", { pool: ctx.poolName, reserved: formatSize(lengthBytes), hostFree: formatSize(free - missing) });
      return;
    } catch (err) {
      ctx.log.debug("cannot allocate the data file yet", { pool: ctx.poolName, error: errorMessage(err) });
    }
  }
  if (!ctx.sparseWarned) {
    ctx.sparseWarned = true;
    ctx.log.warn("dm-thin pool data file is sparse (made by an earlier version) and the host cannot hold all of it yet: a full host disk can fail writes; it is allocated once the host has room", {
      pool: ctx.poolName,
      unallocated: formatSize(missing),
      hostFree: formatSize(free),
    });
  }
}

/**
 * Keeps the headroom free: grows the data file and the pool while the host has room,
 * and warns once when it has not.
 */
export async function growLocked(ctx: Locked): Promise<void> {
  // A device is the pool's whole length from the start: nothing to reserve or grow.
  if (ctx.onDevice) return;
  const state = ctx.openState;
  const block = ctx.blockBytes;
  const status = await thinPoolStatus(ctx.runner, ctx.poolName);
  const lengthBytes = status.dataTotalBlocks * block;
  if (ctx.sparseWarned) await adoptSparseData(ctx, lengthBytes);
  if (lengthBytes >= ctx.poolMaxBytes || (status.dataTotalBlocks - status.dataUsedBlocks) * block >= ctx.headroom) {
    hostBackIfLow(ctx);
    return;
  }
  const { free: hostFree, floor } = await hostRoom(ctx);
  const started = Date.now();
  const plan = planGrowth({
    lengthBytes,
    usedBytes: status.dataUsedBlocks * block,
    poolMaxBytes: ctx.poolMaxBytes,
    headroomBytes: ctx.headroom,
    blockBytes: block,
    hostFreeBytes: hostFree,
    hostFloorBytes: floor,
  });
  if (plan.targetBytes > lengthBytes) {
    const target = Math.max(plan.targetBytes, state.dataSizeBytes);
    try {
      await allocateFile(ctx.runner, ctx.dataFile, target);
    } catch (err) {
      warnHostLow(ctx, hostFree, floor, `cannot allocate ${formatSize(target - lengthBytes)} more: ${errorMessage(err)}`);
      return;
    }
    await refreshLoopSize(ctx.runner, ctx.dataDevice);
    // Saved before the reload: a pool re-created after a crash must not be shorter than its metadata.
    state.dataSizeBytes = target;
    await ctx.save();
    await reloadPool(ctx, poolTable(ctx, target));
    ctx.log.info("dm-thin pool grown", {
      pool: ctx.poolName,
      reserved: formatSize(target),
      used: formatSize(status.dataUsedBlocks * block),
      size: formatSize(ctx.poolMaxBytes),
      hostFree: formatSize(await ctx.host.freeBytes(ctx.dir)),
      ms: Date.now() - started,
    });
  }
  if (plan.hostShort) warnHostLow(ctx, await ctx.host.freeBytes(ctx.dir), floor, "the host filesystem is low");
  else hostBackIfLow(ctx);
}

function warnHostLow(ctx: Locked, hostFree: number, floor: number, why: string): void {
  if (ctx.hostLowWarned) return;
  ctx.hostLowWarned = true;
  ctx.log.warn("dm-thin pool cannot reserve more host space: creates are refused and a full pool fails writes; free space on the host", {
    pool: ctx.poolName,
    why,
    reserved: formatSize(ctx.openState.dataSizeBytes),
    size: formatSize(ctx.poolMaxBytes),
    hostFree: formatSize(hostFree),
    hostFloor: formatSize(floor),
  });
}

function hostBackIfLow(ctx: Locked): void {
  if (!ctx.hostLowWarned) return;
  ctx.hostLowWarned = false;
  ctx.log.info("dm-thin pool has its headroom again", { pool: ctx.poolName, reserved: formatSize(ctx.openState.dataSizeBytes) });
}

/** Runs `grow` every growthIntervalMs while the pool is open; each failure is logged once until it changes. */
export class GrowthTimer {
  private timer: NodeJS.Timeout | undefined;
  private lastError = "";

  constructor(
    private readonly ctx: DmThinContext,
    private readonly grow: () => Promise<void>,
  ) {}

  start(): void {
    this.stop();
    const interval = this.ctx.growthIntervalMs;
    if (interval <= 0) return;
    const tick = () => {
      this.grow().then(
        () => {
          this.lastError = "";
        },
        (err: unknown) => {
          // Once per distinct failure, not once per tick.
          const msg = errorMessage(err);
          if (msg !== this.lastError) this.ctx.log.warn("dm-thin pool space check failed; retrying", { pool: this.ctx.poolName, error: msg });
          this.lastError = msg;
        },
      ).finally(() => {
        if (this.timer !== undefined) this.timer = setTimeout(tick, interval).unref();
      });
    };
    this.timer = setTimeout(tick, interval).unref();
  }

  stop(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
  }
}
