import { ConflictError, NoSpaceError, ThinvolError, errorMessage } from "../../errors.js";
import { dmFailureReason, sendMessage, thinPoolStatus } from "../../system/dmsetup.js";
import type { Locked } from "./context.js";
import { resumeIfSuspended, tearDownForRemove } from "./devices.js";
import { MAX_THIN_ID, stateFile, type Pending, type VolumeRecord } from "./state.js";

/*
 * Crash safety. The pool's transaction id is the commit point of every pool-wide
 * operation. Before its first message, an operation writes its intent (`pending`) into
 * the state file with the transaction id it starts from (T); its last message is
 * `set_transaction_id T T+1`; then the state is saved with the result and the intent
 * cleared. Whenever an intent is found (at open, and before every operation):
 *  - create / clone: pool at T+1 → roll forward (the volume exists); pool at T →
 *    roll back (delete the thin id if it was made). A clone's origin is resumed
 *    either way.
 *  - remove: roll forward: finish the delete. Only if the device cannot be
 *    removed (it is open) is the intent dropped and the volume kept.
 * Any other difference between the pool and the state stops open() with an error.
 */

/** The next free 24-bit id. Ids are not reused until they wrap, so a stray id in the pool is never handed out twice. */
export function allocateId(ctx: Locked, volume: string): number {
  const state = ctx.openState;
  const used = new Set([...state.volumes.values()].map((v) => v.id));
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

/** Applies a committed operation to the state (not yet saved). */
function commit(ctx: Locked, p: Pending, vol: VolumeRecord | undefined): void {
  const state = ctx.openState;
  if (vol) state.volumes.set(p.name, vol);
  else state.volumes.delete(p.name);
  state.transactionId = p.fromTransaction + 1;
  state.pending = undefined;
}

/** The record a committed create or clone leaves. */
function madeVolume(p: Extract<Pending, { op: "create" | "clone" }>): VolumeRecord {
  return { id: p.id, sizeBytes: p.sizeBytes };
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
 * Sends a journalled operation's messages (the last one bumps the transaction
 * id) and records the result; on failure recovers in-process and rethrows.
 */
export async function commitJournalled(ctx: Locked, p: Pending, messages: () => Promise<void>): Promise<void> {
  try {
    await messages();
  } catch (err) {
    try {
      await settlePending(ctx);
    } catch (again) {
      ctx.log.error("could not recover after a failed operation; will retry before the next one", { volume: p.name, op: p.op, error: errorMessage(again) });
    }
    throw err;
  }
  commit(ctx, p, p.op === "remove" ? undefined : madeVolume(p));
  await ctx.save();
}

/** Finishes or undoes the operation recorded in the journal, if any (see above). */
export async function settlePending(ctx: Locked): Promise<void> {
  const state = ctx.openState;
  const p = state.pending;
  if (!p) return;
  const status = await thinPoolStatus(ctx.runner, ctx.poolName);
  const T = p.fromTransaction;
  const P = status.transactionId;
  if (P !== T && P !== T + 1) {
    throw new ThinvolError(
      `cannot recover the interrupted ${p.op} of volume "${p.name}": pool ${ctx.poolName} is at transaction ${P}, the journal in ${stateFile(ctx.dir)} expected ${T} or ${T + 1}`,
    );
  }
  if (p.op === "clone") await resumeIfSuspended(ctx, p.origin, state.volumes.get(p.origin));
  if (p.op === "create" || p.op === "clone") {
    if (P === T) {
      await deleteThinId(ctx, p.id);
      await dropJournal(ctx);
      ctx.log.warn(`rolled back an interrupted ${p.op}`, { volume: p.name, id: p.id });
    } else {
      commit(ctx, p, madeVolume(p));
      await ctx.save();
      ctx.log.warn(`completed an interrupted ${p.op}`, { volume: p.name, id: p.id });
    }
    return;
  }
  if (P === T) {
    try {
      await tearDownForRemove(ctx, p.name);
    } catch (err) {
      if (!(err instanceof ConflictError)) throw err;
      await dropJournal(ctx);
      ctx.log.warn("kept a volume whose interrupted remove could not finish", { volume: p.name, error: err.message });
      return;
    }
    await deleteThinId(ctx, p.id);
    await setTransactionId(ctx, T, T + 1);
  }
  commit(ctx, p, undefined);
  await ctx.save();
  ctx.log.warn("completed an interrupted remove", { volume: p.name, id: p.id });
}
