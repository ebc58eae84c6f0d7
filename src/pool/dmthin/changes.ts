import { changedRangesFromThinDelta, cutRanges, mappedRangesFromThinDelta, readThinDelta, type ThinDelta } from "../../backup/plan.js";
import { ThinvolError, errorMessage } from "../../errors.js";
import { dmFailureReason, sendMessage } from "../../system/dmsetup.js";
import type { VolumeRange } from "../types.js";
import type { Locked } from "./context.js";

/*
 * Which parts of a snapshot hold data, or changed since an earlier snapshot, from the pool's
 * own mappings: thin_delta reads them from a metadata snapshot of the live pool (the kernel
 * keeps one frozen copy of the metadata root while it is reserved), so nothing is read from
 * the volumes and the pool keeps running. The pool allows one metadata snapshot at a time;
 * the pool lock, held from reserve to release, keeps this process to one.
 */

/**
 * Releases a metadata snapshot a killed process left reserved (open() calls it): while it is
 * held, blocks of thin ids deleted since stay allocated, since the snapshot still maps them.
 */
export async function releaseLeftMetadataSnapshot(ctx: Locked): Promise<void> {
  ctx.log.warn("releasing a metadata snapshot an earlier run left reserved", { pool: ctx.poolName });
  await sendMessage(ctx.runner, ctx.poolName, "release_metadata_snap");
}

/**
 * Runs `work` with a metadata snapshot reserved, and releases it whatever happens. One left
 * reserved by a process killed in between is released and taken again.
 */
export async function withMetadataSnapshot<T>(ctx: Locked, work: () => Promise<T>): Promise<T> {
  try {
    await sendMessage(ctx.runner, ctx.poolName, "reserve_metadata_snap");
  } catch (err) {
    if (!/Device or resource busy/i.test(dmFailureReason(err))) throw err;
    await releaseLeftMetadataSnapshot(ctx);
    await sendMessage(ctx.runner, ctx.poolName, "reserve_metadata_snap");
  }
  let result: T;
  try {
    result = await work();
  } catch (err) {
    await sendMessage(ctx.runner, ctx.poolName, "release_metadata_snap").catch((releaseErr: unknown) => {
      ctx.log.warn("cannot release the metadata snapshot", { pool: ctx.poolName, error: errorMessage(releaseErr) });
    });
    throw err;
  }
  await sendMessage(ctx.runner, ctx.poolName, "release_metadata_snap");
  return result;
}

/**
 * The byte ranges of thin id `id` (a device of `sizeBytes`) that hold data, or, with
 * `sinceId`, that may differ from thin id `sinceId`. Without `sinceId`, thin_delta compares
 * the id with itself: every mapped run comes out "same", every unmapped one not at all.
 */
export async function changedRangesOf(ctx: Locked, id: number, sizeBytes: number, sinceId?: number): Promise<VolumeRange[]> {
  let delta: ThinDelta;
  try {
    delta = await withMetadataSnapshot(ctx, () => readThinDelta(ctx.runner, ctx.metaLoop, sinceId ?? id, id));
  } catch (err) {
    throw new ThinvolError(`cannot read the pool's mappings with thin_delta (metadata ${ctx.metaLoop}): ${errorMessage(err)}`, { cause: err });
  }
  const ranges = sinceId === undefined ? mappedRangesFromThinDelta(delta) : changedRangesFromThinDelta(delta);
  return cutRanges(ranges, sizeBytes);
}
