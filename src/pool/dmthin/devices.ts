import { ConflictError, ThinvolError, errorMessage } from "../../errors.js";
import {
  createDevice,
  deviceInfo,
  dmPath,
  listDevices,
  loadTable,
  makeNodes,
  removeDevice,
  resumeDevice,
  suspendDevice,
  tableOf,
  thinStatus,
  thinTable,
  type DmDevice,
} from "../../system/dmsetup.js";
import type { DmThinContext, Locked } from "./context.js";
import type { VolumeRecord } from "./state.js";

/*
 * A volume's device, `<prefix>-<volume>`. Every path that touches one first checks that
 * its table is this pool's thin device of that volume; anything else is left alone.
 */

/** What is at a volume's device name: nothing, this pool's thin device of that volume, or something else. */
export type Occupant = { kind: "absent" } | { kind: "ours"; dev: DmDevice; lengthBytes: number } | { kind: "foreign"; dev: DmDevice; table: string };

/**
 * The lengths the volume's own device may have: its recorded size, and during an
 * interrupted resize (journalled, not yet recorded) the size it is growing to as well.
 */
function ownLengths(ctx: DmThinContext, name: string, vol: VolumeRecord): number[] {
  const p = ctx.state?.pending;
  return p?.op === "resize" && p.name === name && p.id === vol.id ? [vol.sizeBytes, p.fromBytes, p.toBytes] : [vol.sizeBytes];
}

/** Whether the device at a volume's name is exactly this pool's thin device of that volume. */
export async function occupant(ctx: DmThinContext, name: string, vol: VolumeRecord | undefined): Promise<Occupant> {
  const devName = ctx.deviceName(name);
  const dev = await deviceInfo(ctx.runner, devName);
  if (!dev) return { kind: "absent" };
  const table = (await tableOf(ctx.runner, devName)).trim().split(/\s+/).join(" ");
  if (vol && ctx.poolDevice !== "") {
    const length = ownLengths(ctx, name, vol).find((bytes) => table === thinTable(bytes / 512, ctx.poolDevice, vol.id));
    if (length !== undefined) return { kind: "ours", dev, lengthBytes: length };
  }
  return { kind: "foreign", dev, table };
}

export function foreignDevice(ctx: DmThinContext, name: string, vol: VolumeRecord | undefined, table: string): ConflictError {
  const devName = ctx.deviceName(name);
  const expected = vol ? `thin id ${vol.id} of ${ctx.poolName}` : `a volume of ${ctx.poolName}`;
  return new ConflictError(
    `device ${devName} has the name of thin volume "${name}" but maps ${JSON.stringify(table)}, not ${expected}; thinvol leaves it untouched. ` +
      `If it is stale, remove it (dmsetup remove ${devName}); if it belongs to something else, give this pool another name`,
  );
}

/** The volume's own device, undefined when none is active; throws ConflictError (changing nothing) for any other device of that name. */
export async function ownDevice(ctx: DmThinContext, name: string, vol: VolumeRecord | undefined): Promise<DmDevice | undefined> {
  const o = await occupant(ctx, name, vol);
  if (o.kind === "foreign") throw foreignDevice(ctx, name, vol, o.table);
  return o.kind === "ours" ? o.dev : undefined;
}

export async function activateDevice(ctx: Locked, name: string, vol: VolumeRecord): Promise<string> {
  const devName = ctx.deviceName(name);
  const dev = await ownDevice(ctx, name, vol);
  if (dev) {
    if (dev.suspended) await resumeDevice(ctx.runner, devName);
  } else {
    await createDevice(ctx.runner, devName, thinTable(vol.sizeBytes / 512, ctx.poolDevice, vol.id));
    ctx.log.debug("dm-thin activate", { volume: name, id: vol.id });
  }
  await makeNodes(ctx.runner, devName);
  return dmPath(devName);
}

/**
 * Runs `snapshot` with the origin's device suspended, which freezes a filesystem mounted on
 * it, and resumes the device whether or not the snapshot was made.
 */
export async function snapshotSuspended(ctx: Locked, originDev: string, snapshot: () => Promise<void>): Promise<void> {
  await suspendDevice(ctx.runner, originDev);
  let snapError: unknown;
  try {
    await snapshot();
  } catch (err) {
    snapError = err;
  }
  try {
    await resumeDevice(ctx.runner, originDev);
  } catch (err) {
    throw new ThinvolError(`cannot resume origin device ${originDev} after the snapshot${snapError ? ` (the snapshot also failed: ${errorMessage(snapError)})` : ""}: ${errorMessage(err)}`, { cause: err });
  }
  if (snapError) throw snapError;
}

/**
 * Brings the volume's own, active device to `lengthBytes`: loads the longer table and swaps it
 * in (suspend, resume), so a filesystem on it sees the new size at once. A device left
 * suspended is resumed; one already that long is left alone.
 */
export async function setDeviceLength(ctx: Locked, name: string, vol: VolumeRecord, lengthBytes: number): Promise<void> {
  const o = await occupant(ctx, name, vol);
  if (o.kind !== "ours") return;
  const devName = o.dev.name;
  if (o.lengthBytes === lengthBytes) {
    if (o.dev.suspended) await resumeDevice(ctx.runner, devName);
    return;
  }
  await loadTable(ctx.runner, devName, thinTable(lengthBytes / 512, ctx.poolDevice, vol.id));
  try {
    await suspendDevice(ctx.runner, devName);
  } finally {
    await resumeDevice(ctx.runner, devName);
  }
}

function inUse(devName: string, dev: DmDevice): ConflictError {
  return new ConflictError(`${dmPath(devName)} is in use (open ${dev.openCount} times); unmount it first`);
}

/** The active volume's allocation now; a figure the kernel will not give is not worth failing for (logged, undefined). */
export async function mappedBytes(ctx: DmThinContext, volume: string): Promise<number | undefined> {
  try {
    return (await thinStatus(ctx.runner, ctx.deviceName(volume))).mappedSectors * 512;
  } catch (err) {
    ctx.log.debug("cannot read a thin volume's allocation", { volume, error: errorMessage(err) });
    return undefined;
  }
}

/** Takes the volume's device away, keeping its last allocation figure; an absent device is fine. */
export async function deactivateDevice(ctx: Locked, name: string): Promise<void> {
  const devName = ctx.deviceName(name);
  const vol = ctx.openState.volumes.get(name);
  const dev = await ownDevice(ctx, name, vol);
  if (!dev || !vol) return;
  const mapped = await mappedBytes(ctx, name);
  if (mapped !== undefined) vol.allocatedBytes = mapped;
  if (dev.openCount > 0) throw inUse(devName, dev);
  await removeDevice(ctx.runner, devName);
  await ctx.save();
}

/**
 * Takes a volume's device away before its id is deleted. No discard first: the pool
 * keeps its host space (no_discard_passdown), and deleting the id frees its blocks.
 * Throws ConflictError when the device is open or is not the volume's: then nothing has
 * been changed.
 */
export async function tearDownForRemove(ctx: Locked, name: string): Promise<void> {
  const devName = ctx.deviceName(name);
  const dev = await ownDevice(ctx, name, ctx.openState.volumes.get(name));
  if (!dev) return;
  if (dev.openCount > 0) throw inUse(devName, dev);
  await removeDevice(ctx.runner, devName);
}

/**
 * A crash between suspend and resume leaves a device frozen, and a filesystem on it hung.
 * Only the volume's own device is resumed: a foreign one is left as it is, with a warning,
 * so that recovery never stops on it.
 */
export async function resumeIfSuspended(ctx: Locked, volume: string, vol: VolumeRecord | undefined): Promise<void> {
  const o = await occupant(ctx, volume, vol);
  if (o.kind === "foreign") {
    if (o.dev.suspended) ctx.log.warn("a suspended device with a volume's name is not that volume; left untouched", { volume, error: foreignDevice(ctx, volume, vol, o.table).message });
    return;
  }
  if (o.kind === "ours" && o.dev.suspended) {
    ctx.log.warn("resuming a thin volume left suspended", { volume });
    await resumeDevice(ctx.runner, o.dev.name);
  }
}

export async function resumeLeftSuspended(ctx: Locked): Promise<void> {
  const devices = await listDevices(ctx.runner);
  for (const [name, vol] of ctx.openState.volumes) {
    if (!devices.get(ctx.deviceName(name))?.suspended) continue;
    await resumeIfSuspended(ctx, name, vol);
  }
}
