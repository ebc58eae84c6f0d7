import { ConflictError, errorMessage } from "../../errors.js";
import { createDevice, dmPath, listDevices, makeNodes, removeDevice, tableOf, thinTable, type DmDevice } from "../../system/dmsetup.js";
import type { DmThinContext, Locked } from "./context.js";
import type { SnapshotRecord } from "./state.js";

/*
 * Snapshot readers: a snapshot's thin id activated read-only, so a backup can read its
 * bytes while the volume stays in use. Each reader has its own device,
 * `<prefix>-@read-<thin id>-<n>`: no volume's device can have that name (a volume name has
 * no '@'), several readers of one snapshot need no count, and a device left by a crash is
 * recognised by its name and its table (a thin device of this pool) at the next open().
 *
 * A snapshot with an open reader cannot be removed: removeSnapshot refuses with a
 * ConflictError naming it until release(). A reader device a crash left is removed by the
 * next open(); one still open then (a reading process outlived the plugin) is remembered,
 * and removeSnapshot removes it once it is closed. So removeSnapshot runs no command of its
 * own unless such a device exists, and a crash left behind never blocks it.
 */

/** What this process has open: by device name. */
export interface OpenReader {
  volume: string;
  snapshot: string;
  id: number;
}

const readerPrefix = (ctx: DmThinContext): string => `${ctx.prefix}-@read-`;

export const readerName = (ctx: DmThinContext, id: number, n: number): string => `${readerPrefix(ctx)}${id}-${n}`;

/** The thin id in a reader device's name, or undefined when the name is not one of this pool's readers. */
function readerId(ctx: DmThinContext, name: string): number | undefined {
  if (!name.startsWith(readerPrefix(ctx))) return undefined;
  const m = /^(\d+)-\d+$/.exec(name.slice(readerPrefix(ctx).length));
  return m ? Number(m[1]) : undefined;
}

/** Whether the device is a thin device of this pool mapping thin id `id` (any length): a reader's table. */
async function mapsThinId(ctx: DmThinContext, name: string, id: number): Promise<boolean> {
  const table = (await tableOf(ctx.runner, name)).trim().split(/\s+/);
  return table.length === 5 && table[0] === "0" && table[2] === "thin" && table[3] === ctx.poolDevice && table[4] === String(id);
}

/** Activates `snap` read-only under a name of its own and returns the device's path. */
export async function activateReader(ctx: Locked, volume: string, snapshot: string, snap: SnapshotRecord): Promise<{ name: string; path: string }> {
  const devices = await listDevices(ctx.runner);
  let name: string;
  do name = readerName(ctx, snap.id, ++ctx.readerCount);
  while (devices.has(name));
  await createDevice(ctx.runner, name, thinTable(snap.sizeBytes / 512, ctx.poolDevice, snap.id), { readOnly: true });
  ctx.readers.set(name, { volume, snapshot, id: snap.id });
  try {
    await makeNodes(ctx.runner, name);
  } catch (err) {
    await deactivateReader(ctx, name).catch(() => undefined);
    throw err;
  }
  return { name, path: dmPath(name) };
}

/** Removes a reader's device; an absent one is fine. Refused (ConflictError) while something still has it open. */
export async function deactivateReader(ctx: Locked, name: string): Promise<void> {
  const reader = ctx.readers.get(name);
  const dev = (await listDevices(ctx.runner)).get(name);
  if (dev && dev.openCount > 0) {
    const what = reader ? ` of snapshot "${reader.snapshot}" of thin volume "${reader.volume}"` : "";
    throw new ConflictError(`cannot release the reader${what}: ${dmPath(name)} is still open (${dev.openCount} times); close it first`);
  }
  if (dev) await removeDevice(ctx.runner, name);
  ctx.readers.delete(name);
}

/** Reader devices of this pool that no reader of this process holds. */
async function leftoverReaders(ctx: Locked): Promise<DmDevice[]> {
  const left: DmDevice[] = [];
  for (const [name, dev] of await listDevices(ctx.runner)) {
    const mapped = readerId(ctx, name);
    if (mapped === undefined || ctx.readers.has(name)) continue;
    if (!(await mapsThinId(ctx, name, mapped))) {
      ctx.log.warn("a device with a snapshot reader's name is not a thin device of this pool; left untouched", { pool: ctx.poolName, device: name });
      continue;
    }
    left.push(dev);
  }
  return left;
}

/**
 * Removes reader devices left by a process that ended without releasing them (open() calls
 * it). One still open (a reading process outlived the plugin) is left, with a warning, and
 * remembered: it is removed once closed, by removeSnapshot or the next open().
 */
export async function removeLeftoverReaders(ctx: Locked): Promise<void> {
  ctx.leftReaders.clear();
  for (const dev of await leftoverReaders(ctx)) {
    if (dev.openCount > 0) {
      ctx.leftReaders.set(dev.name, readerId(ctx, dev.name) ?? -1);
      ctx.log.warn("a snapshot reader left by an earlier run is still open; left in place", { pool: ctx.poolName, device: dev.name, open: dev.openCount });
      continue;
    }
    try {
      await removeDevice(ctx.runner, dev.name);
      ctx.log.info("removed a snapshot reader left by an earlier run", { pool: ctx.poolName, device: dev.name });
    } catch (err) {
      ctx.log.warn("cannot remove a snapshot reader left by an earlier run", { pool: ctx.poolName, device: dev.name, error: errorMessage(err) });
    }
  }
}

/**
 * Before a snapshot's thin id is deleted: refuses while this process reads it, and removes
 * reader devices of it a crash left (refused only while one of them is still open).
 */
export async function clearReadersOf(ctx: Locked, volume: string, snapshot: string, snap: SnapshotRecord): Promise<void> {
  const open = [...ctx.readers].filter(([, r]) => r.id === snap.id);
  if (open.length > 0) {
    throw new ConflictError(
      `snapshot "${snapshot}" of thin volume "${volume}" is being read (${open.length === 1 ? "a reader is" : `${open.length} readers are`} open: ` +
        `${open.map(([name]) => dmPath(name)).join(", ")}, e.g. by a backup); remove it once the reading is done`,
    );
  }
  const left = [...ctx.leftReaders].filter(([, id]) => id === snap.id);
  if (left.length === 0) return;
  const devices = await listDevices(ctx.runner);
  for (const [name] of left) {
    const dev = devices.get(name);
    if (!dev) {
      ctx.leftReaders.delete(name);
      continue;
    }
    if (dev.openCount > 0) {
      throw new ConflictError(
        `snapshot "${snapshot}" of thin volume "${volume}" is still open through ${dmPath(dev.name)} (${dev.openCount} times), a reader left by an earlier run; ` +
          `stop whatever reads it, then remove the snapshot again`,
      );
    }
    await removeDevice(ctx.runner, dev.name);
    ctx.leftReaders.delete(name);
    ctx.log.info("removed a snapshot reader left by an earlier run", { volume, snapshot, device: dev.name });
  }
}

/**
 * At close: removes every reader device of this pool that nothing has open (the readers of
 * this process are forgotten; their release() then finds nothing to do). Returns the names
 * of those still open: they keep the pool up, as active volumes do.
 */
export async function removeIdleReaders(ctx: Locked): Promise<string[]> {
  const stillOpen: string[] = [];
  const devices = await listDevices(ctx.runner);
  for (const [name, dev] of devices) {
    const id = readerId(ctx, name);
    if (id === undefined || !(ctx.readers.has(name) || (await mapsThinId(ctx, name, id)))) continue;
    if (dev.openCount > 0) stillOpen.push(name);
    else await removeDevice(ctx.runner, name);
  }
  ctx.readers.clear();
  ctx.leftReaders.clear();
  return stillOpen;
}
