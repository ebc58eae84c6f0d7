import { ConflictError, InvalidRequestError } from "../../errors.js";
import { dmPath, sendMessage } from "../../system/dmsetup.js";
import type { Locked } from "./context.js";
import { mappedBytes, occupant, ownDevice, snapshotSuspended } from "./devices.js";
import { allocateId, commitJournalled, deleteThinId, journal, setTransactionId } from "./journal.js";
import { checkSpace } from "./space.js";
import { isValidName, snapshotKey, splitSnapshotKey, type Pending, type PoolState } from "./state.js";

/*
 * Snapshots: thin ids made with `create_snap`, kept in the state apart from volumes, and
 * never activated, so nothing writes them: they cost nothing until their volume is written,
 * and their size and allocation stay what they were at the instant they were taken.
 * Each change is journalled like create and remove (journal.ts).
 */

/** `snapshot` of `volume`: the volume's device, if active, is suspended for the instant of `create_snap`. */
export async function takeSnapshot(ctx: Locked, volume: string, snapshot: string, what: string): Promise<{ id: number; originWasActive: boolean }> {
  if (!isValidName(snapshot)) throw new InvalidRequestError(`cannot take snapshot ${JSON.stringify(snapshot)} of thin volume "${volume}": not a valid snapshot name`);
  const vol = ctx.volume(volume);
  if (ctx.openState.snapshots.has(snapshotKey(volume, snapshot))) {
    throw new ConflictError(`snapshot "${snapshot}" of thin volume "${volume}" already exists in pool ${ctx.poolName}`);
  }
  await checkSpace(ctx, volume, what);
  // Checked before anything is written: a foreign device is never suspended.
  const originActive = (await ownDevice(ctx, volume, vol)) !== undefined;
  const id = allocateId(ctx, volume);
  const T = ctx.openState.transactionId;
  const p: Pending = { op: "snapshot", name: volume, snapshot, id, originId: vol.id, sizeBytes: vol.sizeBytes, fromTransaction: T };
  // The volume's allocation at the instant (read while it is suspended): the snapshot shares every block of it, forever.
  let allocated: number | undefined;
  await journal(ctx, p);
  await commitJournalled(
    ctx,
    p,
    async () => {
      const snap = () => sendMessage(ctx.runner, ctx.poolName, `create_snap ${id} ${vol.id}`);
      if (originActive) {
        await snapshotSuspended(ctx, ctx.deviceName(volume), async () => {
          await snap();
          allocated = await mappedBytes(ctx, volume);
        });
      } else {
        await snap();
      }
      await setTransactionId(ctx, T, T + 1);
    },
    () => {
      const rec = ctx.openState.snapshots.get(snapshotKey(volume, snapshot));
      if (rec && allocated !== undefined) rec.allocatedBytes = allocated;
    },
  );
  return { id, originWasActive: originActive };
}

/** Deletes a snapshot's thin id and forgets it; an absent snapshot is fine. */
export async function deleteSnapshot(ctx: Locked, volume: string, snapshot: string): Promise<number | undefined> {
  const snap = ctx.openState.snapshots.get(snapshotKey(volume, snapshot));
  if (!snap) return undefined;
  const T = ctx.openState.transactionId;
  const p: Pending = { op: "remove-snapshot", name: volume, snapshot, id: snap.id, fromTransaction: T };
  await journal(ctx, p);
  await commitJournalled(ctx, p, async () => {
    await deleteThinId(ctx, snap.id);
    await setTransactionId(ctx, T, T + 1);
  });
  return snap.id;
}

/**
 * Gives `volume` a new thin id, a snapshot of its snapshot, and deletes its old id: the
 * volume is then the snapshot's data and size, under the same name. Refused while the
 * volume's device is active (open or not): the caller deactivates it first, so nothing
 * can hold the old data while it goes.
 */
export async function rollbackVolume(ctx: Locked, volume: string, snapshot: string): Promise<{ id: number; oldId: number }> {
  const vol = ctx.volume(volume);
  const snap = ctx.snapshot(volume, snapshot);
  const o = await occupant(ctx, volume, vol);
  if (o.kind !== "absent") {
    const how = o.kind === "ours" ? (o.dev.openCount > 0 ? `in use (open ${o.dev.openCount} times)` : "active") : "taken by another device";
    throw new ConflictError(
      `cannot roll thin volume "${volume}" back to snapshot "${snapshot}": its device ${dmPath(o.dev.name)} is ${how}; unmount and deactivate the volume first`,
    );
  }
  const id = allocateId(ctx, volume);
  const T = ctx.openState.transactionId;
  const p: Pending = { op: "rollback", name: volume, snapshot, id, oldId: vol.id, snapshotId: snap.id, sizeBytes: snap.sizeBytes, fromTransaction: T };
  await journal(ctx, p);
  await commitJournalled(ctx, p, async () => {
    await sendMessage(ctx.runner, ctx.poolName, `create_snap ${id} ${snap.id}`);
    await setTransactionId(ctx, T, T + 1);
    // After the commit point: a crash from here on finishes the delete.
    await deleteThinId(ctx, vol.id);
  });
  return { id, oldId: vol.id };
}

/** A new volume `name` from `origin`'s snapshot: no device is suspended, since nothing writes a snapshot. */
export async function cloneSnapshot(ctx: Locked, name: string, origin: string, snapshot: string, what: string): Promise<number> {
  ctx.volume(origin);
  const snap = ctx.snapshot(origin, snapshot);
  ctx.checkNewName(name);
  await checkSpace(ctx, name, what);
  const id = allocateId(ctx, name);
  const T = ctx.openState.transactionId;
  const p: Pending = { op: "clone", name, id, sizeBytes: snap.sizeBytes, origin, originId: snap.id, snapshot, fromTransaction: T };
  await journal(ctx, p);
  await commitJournalled(ctx, p, async () => {
    await sendMessage(ctx.runner, ctx.poolName, `create_snap ${id} ${snap.id}`);
    await setTransactionId(ctx, T, T + 1);
  });
  return id;
}

/** Snapshot names by volume, sorted. */
export function snapshotsByVolume(state: PoolState): Map<string, string[]> {
  const byVolume = new Map<string, string[]>();
  for (const key of state.snapshots.keys()) {
    const [volume, snapshot] = splitSnapshotKey(key);
    byVolume.set(volume, [...(byVolume.get(volume) ?? []), snapshot]);
  }
  return new Map([...byVolume].sort(([a], [b]) => (a < b ? -1 : 1)).map(([volume, names]) => [volume, names.sort()]));
}
