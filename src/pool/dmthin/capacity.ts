import { ConflictError, InvalidRequestError, NoSpaceError, errorMessage } from "../../errors.js";
import { formatSize } from "../../size.js";
import { deviceSizeBytes } from "../../system/blockdev.js";
import { deviceInfo, resumeDevice, thinPoolStatus } from "../../system/dmsetup.js";
import { refreshLoopSize } from "../../system/losetup.js";
import { headroomBytes } from "../host-space.js";
import { metadataSizeFor } from "./backing.js";
import type { Locked } from "./context.js";
import { allocateOrFail, growLocked, poolTable, reloadPool } from "./growth.js";

/*
 * The pool's maximum, raised at run time. On files the maximum is only a limit: the data
 * file is reserved up to it as it is used (growth.ts), so raising it takes the metadata
 * (sized for the whole maximum) and the pool's low-water mark, and the state records the
 * new maximum (maxDataBytes) so that a restart with the old POOL_SIZE keeps it. On a device
 * (POOL_DEVICE) the pool's length is the maximum: the table grows at once, up to the device.
 */

/** Raises the pool's maximum to `sizeBytes` (in whole blocks). Returns the maximum before. */
export async function growPool(ctx: Locked, sizeBytes: number): Promise<number> {
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0) {
    throw new InvalidRequestError(`cannot grow dm-thin pool ${ctx.poolName}: size ${sizeBytes} is not a positive number of bytes`);
  }
  const block = ctx.blockBytes;
  const target = Math.floor(sizeBytes / block) * block;
  const before = ctx.poolMaxBytes;
  if (target < before) {
    throw new ConflictError(
      `cannot grow dm-thin pool ${ctx.poolName} to ${formatSize(sizeBytes)} (${sizeBytes} bytes): it already has ${formatSize(before)} (${before} bytes) and a pool never shrinks`,
    );
  }
  if (target === before) return before;
  if (ctx.onDevice) await growOnDevice(ctx, target);
  else await growOnFiles(ctx, target);
  return before;
}

/** The metadata file grown for a pool of `maxBytes`, and its loop device told; its new size. */
async function growMetadata(ctx: Locked, maxBytes: number): Promise<number> {
  const state = ctx.openState;
  const metaBytes = Math.max(state.metaSizeBytes, metadataSizeFor(maxBytes, state.blockSizeSectors));
  if (metaBytes > state.metaSizeBytes) {
    await allocateOrFail(ctx, ctx.metaFile, metaBytes, "metadata");
    await refreshLoopSize(ctx.runner, ctx.metaLoop);
  }
  return metaBytes;
}

async function growOnFiles(ctx: Locked, target: number): Promise<void> {
  const state = ctx.openState;
  const metaBytes = await growMetadata(ctx, target);
  const status = await thinPoolStatus(ctx.runner, ctx.poolName);
  const saved = { max: ctx.poolMaxBytes, headroom: ctx.headroom };
  ctx.poolMaxBytes = target;
  ctx.headroom = headroomBytes(target, ctx.blockBytes);
  try {
    // The pool sees more metadata, and its new low-water mark, only with a reloaded table.
    if (metaBytes > state.metaSizeBytes || ctx.headroom !== saved.headroom) await reloadPool(ctx, poolTable(ctx, status.dataTotalBlocks * ctx.blockBytes));
  } catch (err) {
    ctx.poolMaxBytes = saved.max;
    ctx.headroom = saved.headroom;
    await resumePoolIfSuspended(ctx);
    throw err;
  }
  // The commit point: a crash before it leaves the old maximum (a larger metadata file is harmless).
  state.maxDataBytes = target;
  state.metaSizeBytes = metaBytes;
  await ctx.save();
  // Reserves the new headroom now, as far as the host allows.
  await growLocked(ctx);
}

async function growOnDevice(ctx: Locked, target: number): Promise<void> {
  const state = ctx.openState;
  const recorded = state.dataDevice;
  const deviceBytes = await deviceSizeBytes(ctx.runner, ctx.dataDevice);
  if (target > deviceBytes) {
    throw new NoSpaceError(
      `cannot grow dm-thin pool ${ctx.poolName} to ${formatSize(target)} (${target} bytes): its POOL_DEVICE ${ctx.dataDevice} has only ` +
        `${formatSize(deviceBytes)} (${deviceBytes} bytes); enlarge the device first, or grow the pool to at most its size`,
    );
  }
  const metaBytes = await growMetadata(ctx, target);
  const saved = { length: state.dataSizeBytes, meta: state.metaSizeBytes, device: recorded, max: ctx.poolMaxBytes, headroom: ctx.headroom };
  // Saved before the reload, as growth does: a pool re-created after a crash must not be shorter than its metadata.
  state.dataSizeBytes = target;
  state.metaSizeBytes = metaBytes;
  if (recorded) state.dataDevice = { ...recorded, sizeBytes: deviceBytes };
  await ctx.save();
  ctx.poolMaxBytes = target;
  ctx.headroom = headroomBytes(target, ctx.blockBytes);
  try {
    await reloadPool(ctx, poolTable(ctx, target));
  } catch (err) {
    state.dataSizeBytes = saved.length;
    state.metaSizeBytes = saved.meta;
    state.dataDevice = saved.device;
    ctx.poolMaxBytes = saved.max;
    ctx.headroom = saved.headroom;
    await ctx.save();
    await resumePoolIfSuspended(ctx);
    throw err;
  }
}

/** A reload that failed at its resume leaves every volume's I/O held: try once more, and say so if that fails too. */
async function resumePoolIfSuspended(ctx: Locked): Promise<void> {
  try {
    if ((await deviceInfo(ctx.runner, ctx.poolName))?.suspended) await resumeDevice(ctx.runner, ctx.poolName);
  } catch (err) {
    ctx.log.error("dm-thin pool left suspended after a failed grow: volumes' I/O is held; resume it (dmsetup resume) or restart the plugin", {
      pool: ctx.poolName,
      error: errorMessage(err),
    });
  }
}
