import { ConflictError, NoSpaceError, ThinvolError, errorMessage } from "../../errors.js";
import { dmFailureReason, sendMessage, thinPoolStatus } from "../../system/dmsetup.js";
import type { Locked } from "./context.js";
import { resumeIfSuspended, setDeviceLength, tearDownForRemove } from "./devices.js";
import { MAX_THIN_ID, snapshotKey, stateFile, type Pending } from "./state.js";

/*
 * Crash safety. The pool's transaction id is the commit point of every pool-wide
 * operation. Before its first message, an operation writes its intent (`pending`) into
 * the state file with the transaction id it starts from (T); its last message is
 * `set_transaction_id T T+1`; then the state is saved with the result and the intent
 * cleared. Whenever an intent is found (at open, and before every operation):
 *  - create / clone / snapshot: pool at T+1 → roll forward (it exists); pool at T →
 *    roll back (delete the thin id if it was made). An origin is resumed either way.
 *  - remove / remove-snapshot: roll forward: finish the delete. Only if a volume's
 *    device cannot be removed (it is open) is the intent dropped and the volume kept.
 *  - rollback: pool at T → delete the new thin id, the volume keeps its data; at T+1 →
 *    delete the old thin id (after the commit point, so it may be gone already) and
 *    record the new one.
 *  - resize: no message, so no transaction: always finished (the device, if active,
 *    brought to the new length; then the size recorded).
 * Any other difference between the pool and the state stops open() with an error.
 */

/** The next free 24-bit id. Ids are not reused until they wrap, so a stray id in the pool is never handed out twice. */
export function allocateId(ctx: Locked, volume: string): number {
  const state = ctx.openState;
  const used = new Set([...state.volumes.values(), ...state.snapshots.values()].map((v) => v.id));
  for (let i = 0; i <= MAX_THIN_ID; i++) {
    const id = (state.nextId + i) % (MAX_THIN_ID + 1);
    if (!used.has(id)) {
      state.nextId = (id + 1) % (MAX_THIN_ID + 1);
      return id;
    }
  }
  throw new NoSpaceError(`cannot create thin volume "${volume}": all ${MAX_THIN_ID + 1} thin ids of pool ${ctx.poolName} are in use`);
}

export async function deleteThinId(ctx: Locked, id: number): Promise<void> {
  try {
    await sendMessage(ctx.runner, ctx.poolName, `delete ${id}`);
  } catch (err) {
    // ENODATA: the id does not exist, which is what we wanted.
    if (/No data available/i.test(dmFailureReason(err))) return;
    throw err;
  }
}

export async function setTransactionId(ctx: Locked, from: number, to: number): Promise<void> {
  await sendMessage(ctx.runner, ctx.poolName, `set_transaction_id ${from} ${to}`);
}

type Transactional = Exclude<Pending, { op: "resize" }>;

/** Applies a committed operation to the state (not yet saved). */
function commit(ctx: Locked, p: Transactional): void {
  const state = ctx.openState;
  // A copy of a snapshot shares every block of it, and a snapshot every block of its volume
  // (as last read: taking a snapshot reads the exact figure when it can).
  const allocated = (from: { allocatedBytes?: number | undefined } | undefined) => (from?.allocatedBytes !== undefined ? { allocatedBytes: from.allocatedBytes } : {});
  switch (p.op) {
    case "create":
      state.volumes.set(p.name, { id: p.id, sizeBytes: p.sizeBytes });
      break;
    case "clone": {
      const snapshot = p.snapshot === undefined ? undefined : state.snapshots.get(snapshotKey(p.origin, p.snapshot));
      state.volumes.set(p.name, { id: p.id, sizeBytes: p.sizeBytes, ...allocated(snapshot) });
      break;
    }
    case "remove":
      state.volumes.delete(p.name);
      break;
    case "snapshot":
      state.snapshots.set(snapshotKey(p.name, p.snapshot), { id: p.id, sizeBytes: p.sizeBytes, ...allocated(state.volumes.get(p.name)) });
      break;
    case "remove-snapshot":
      state.snapshots.delete(snapshotKey(p.name, p.snapshot));
      break;
    case "rollback":
      state.volumes.set(p.name, { id: p.id, sizeBytes: p.sizeBytes, ...allocated(state.snapshots.get(snapshotKey(p.name, p.snapshot))) });
      break;
  }
  state.transactionId = p.fromTransaction + 1;
  state.pending = undefined;
}

/** Writes an operation's intent before its first message to the pool. */
export async function journal(ctx: Locked, p: Pending): Promise<void> {
  ctx.openState.pending = p;
  await ctx.save();
}

/** Forgets an intent that changed nothing in the pool. */
export async function dropJournal(ctx: Locked): Promise<void> {
  ctx.openState.pending = undefined;
  await ctx.save();
}

/**
 * Sends a journalled operation's messages (the one that bumps the transaction id is the
 * commit point) and records the result; `finish` may add to the record before it is
 * saved. On failure recovers in-process and rethrows.
 */
export async function commitJournalled(ctx: Locked, p: Pending, messages: () => Promise<void>, finish?: () => void): Promise<void> {
  try {
    await messages();
  } catch (err) {
    await recoverInProcess(ctx, p);
    throw err;
  }
  if (p.op === "resize") {
    finishResize(ctx, p);
  } else {
    commit(ctx, p);
  }
  finish?.();
  await ctx.save();
}

/** Settles what a failed step left, right away; when that fails too, the next operation tries again. */
export async function recoverInProcess(ctx: Locked, p: Pending): Promise<void> {
  try {
    await settlePending(ctx);
  } catch (again) {
    ctx.log.error("could not recover after a failed operation; will retry before the next one", { volume: p.name, op: p.op, error: errorMessage(again) });
  }
}

function finishResize(ctx: Locked, p: Extract<Pending, { op: "resize" }>): void {
  const vol = ctx.openState.volumes.get(p.name);
  if (vol?.id === p.id) vol.sizeBytes = p.toBytes;
  ctx.openState.pending = undefined;
}

/** The volume whose device the operation suspends, if any (a snapshot is never active, so a clone of one suspends nothing). */
function suspendedOrigin(p: Transactional): string | undefined {
  if (p.op === "snapshot") return p.name;
  if (p.op === "clone" && p.snapshot === undefined) return p.origin;
  return undefined;
}

/** Finishes or undoes the operation recorded in the journal, if any (see above). */
export async function settlePending(ctx: Locked): Promise<void> {
  const state = ctx.openState;
  const p = state.pending;
  if (!p) return;
  if (p.op === "resize") {
    const vol = state.volumes.get(p.name);
    if (vol?.id === p.id) await setDeviceLength(ctx, p.name, vol, p.toBytes);
    finishResize(ctx, p);
    await ctx.save();
    ctx.log.warn("completed an interrupted resize", { volume: p.name, size: p.toBytes });
    return;
  }
  const status = await thinPoolStatus(ctx.runner, ctx.poolName);
  const T = p.fromTransaction;
  const P = status.transactionId;
  const snapshot = "snapshot" in p ? p.snapshot : undefined;
  const what = `${p.op} of volume "${p.name}"${snapshot === undefined ? "" : ` (snapshot "${snapshot}")`}`;
  if (P !== T && P !== T + 1) {
    throw new ThinvolError(`cannot recover the interrupted ${what}: pool ${ctx.poolName} is at transaction ${P}, the journal in ${stateFile(ctx.dir)} expected ${T} or ${T + 1}`);
  }
  const fields = { volume: p.name, id: p.id, snapshot };
  // A suspended origin is resumed whatever else happens: a filesystem on it is frozen.
  const origin = suspendedOrigin(p);
  if (origin !== undefined) await resumeIfSuspended(ctx, origin, state.volumes.get(origin));
  switch (p.op) {
    case "create":
    case "clone":
    case "snapshot":
    case "rollback":
      if (P === T) {
        await deleteThinId(ctx, p.id);
        await dropJournal(ctx);
        ctx.log.warn(`rolled back an interrupted ${p.op}`, fields);
        return;
      }
      if (p.op === "rollback") await deleteThinId(ctx, p.oldId);
      break;
    case "remove":
    case "remove-snapshot":
      if (P !== T) break;
      if (p.op === "remove") {
        try {
          await tearDownForRemove(ctx, p.name);
        } catch (err) {
          if (!(err instanceof ConflictError)) throw err;
          await dropJournal(ctx);
          ctx.log.warn("kept a volume whose interrupted remove could not finish", { volume: p.name, error: err.message });
          return;
        }
      }
      await deleteThinId(ctx, p.id);
      await setTransactionId(ctx, T, T + 1);
      break;
  }
  commit(ctx, p);
  await ctx.save();
  ctx.log.warn(`completed an interrupted ${p.op}`, fields);
}
