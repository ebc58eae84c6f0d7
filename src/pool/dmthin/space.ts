import { NoSpaceError, ThinvolError } from "../../errors.js";
import { formatSize } from "../../size.js";
import { thinPoolStatus } from "../../system/dmsetup.js";
import type { PoolUsage } from "../types.js";
import type { DmThinContext, Locked } from "./context.js";
import { growLocked, hostRoom } from "./growth.js";

/** Metadata blocks are 4 KiB whatever the pool's block size. */
const META_BLOCK_BYTES = 4096;

/**
 * The pool's one free-space rule for a new volume (create or clone). It takes the lock's
 * context, so the figures it reads cannot change before the volume is made. Grows the pool
 * first if it is short of headroom, then refuses when it still is, or is nearly full.
 */
export async function checkSpace(ctx: Locked, volume: string, what: string): Promise<void> {
  await growLocked(ctx);
  const status = await thinPoolStatus(ctx.runner, ctx.poolName);
  const fail = (why: string) => new NoSpaceError(`cannot ${what} thin volume "${volume}" in pool ${ctx.poolName}: ${why}; remove volumes or grow the pool`);
  const block = ctx.blockBytes;
  const lengthBytes = status.dataTotalBlocks * block;
  const freeReserved = (status.dataTotalBlocks - status.dataUsedBlocks) * block;
  if (!ctx.onDevice && lengthBytes < ctx.poolMaxBytes && freeReserved < ctx.headroom) {
    // The pool may grow but the host cannot give it room.
    const { free: hostFree, floor } = await hostRoom(ctx);
    throw new NoSpaceError(
      `cannot ${what} thin volume "${volume}" in pool ${ctx.poolName}: the host filesystem under ${ctx.dir} has only ${formatSize(hostFree)} free ` +
        `(the pool leaves ${formatSize(floor)} of it to the host), so the pool cannot reserve more than its ${formatSize(lengthBytes)}, ` +
        `of which ${formatSize(freeReserved)} is free (it keeps ${formatSize(ctx.headroom)} ahead). Free space on the host filesystem, or remove volumes`,
    );
  }
  if (status.mode === "out_of_data_space") throw fail("the pool is out of data space");
  if (status.mode === "ro") throw new ThinvolError(`cannot ${what} thin volume "${volume}": pool ${ctx.poolName} is read-only (its metadata needs checking)`);
  // Against the size the pool may grow to, not what it has reserved so far.
  const totalBlocks = Math.max(status.dataTotalBlocks, Math.floor(ctx.poolMaxBytes / block));
  const dataFree = totalBlocks - status.dataUsedBlocks;
  if (dataFree * 100 < totalBlocks * ctx.minFreePercent) {
    throw fail(`only ${formatSize(dataFree * block)} of ${formatSize(totalBlocks * block)} of data space is free, under the ${ctx.minFreePercent}% minimum`);
  }
  const metaFree = status.metaTotalBlocks - status.metaUsedBlocks;
  if (metaFree * 100 < status.metaTotalBlocks * ctx.minFreePercent) {
    throw fail(
      `only ${formatSize(metaFree * META_BLOCK_BYTES)} of ${formatSize(status.metaTotalBlocks * META_BLOCK_BYTES)} of metadata space is free, under the ${ctx.minFreePercent}% minimum`,
    );
  }
}

/**
 * Data figures are against the size the pool may grow to; host figures say how much of it is
 * reserved. A pool on a device reserves nothing on the host, so it has no host figures.
 */
export async function usage(ctx: DmThinContext): Promise<PoolUsage> {
  void ctx.openState; // throws when the pool is not open
  const status = await thinPoolStatus(ctx.runner, ctx.poolName);
  const block = ctx.blockBytes;
  const figures: PoolUsage = {
    driver: "dm-thin",
    dataTotalBytes: Math.max(status.dataTotalBlocks * block, ctx.poolMaxBytes),
    dataUsedBytes: status.dataUsedBlocks * block,
    metaTotalBytes: status.metaTotalBlocks * META_BLOCK_BYTES,
    metaUsedBytes: status.metaUsedBlocks * META_BLOCK_BYTES,
  };
  if (ctx.onDevice) return figures;
  const [data, meta, hostFree] = await Promise.all([ctx.host.allocatedBytes(ctx.dataFile), ctx.host.allocatedBytes(ctx.metaFile), ctx.host.freeBytes(ctx.dir)]);
  return { ...figures, hostReservedBytes: data + meta, hostFreeBytes: hostFree };
}
