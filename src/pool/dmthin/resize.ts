import { ConflictError, InvalidRequestError } from "../../errors.js";
import { formatSize } from "../../size.js";
import type { Locked } from "./context.js";
import { ownDevice, setDeviceLength } from "./devices.js";
import { commitJournalled, journal } from "./journal.js";
import { checkSpace } from "./space.js";
import type { Pending } from "./state.js";

/*
 * A thin device has no size in the pool's metadata: its size is the length of its table,
 * which the state file records. Growing a volume is a longer table, swapped in while the
 * device runs. The new space costs nothing until it is written, but the filesystem's growth
 * writes metadata at once: so, as for a new volume, a pool short of space (checkSpace)
 * refuses it before anything changes, and says to grow the pool first.
 */

/** Outcome of a resize: the size before, and whether a live device was grown. */
export interface Resized {
  fromBytes: number;
  deviceGrown: boolean;
}

/** Grows volume `name` to `sizeBytes`; equal is a no-op, smaller is refused. */
export async function resizeVolume(ctx: Locked, name: string, sizeBytes: number): Promise<Resized> {
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 512 || sizeBytes % 512 !== 0) {
    throw new InvalidRequestError(`cannot resize thin volume "${name}": size ${sizeBytes} is not a positive multiple of 512 bytes`);
  }
  const vol = ctx.volume(name);
  const fromBytes = vol.sizeBytes;
  if (sizeBytes === fromBytes) return { fromBytes, deviceGrown: false };
  if (sizeBytes < fromBytes) {
    throw new ConflictError(
      `cannot resize thin volume "${name}" to ${formatSize(sizeBytes)} (${sizeBytes} bytes): it has ${formatSize(fromBytes)} (${fromBytes} bytes) and a volume never shrinks`,
    );
  }
  await checkSpace(ctx, name, "resize");
  // Checked before anything is written: a foreign device is never touched.
  const active = (await ownDevice(ctx, name, vol)) !== undefined;
  const p: Pending = { op: "resize", name, id: vol.id, fromBytes, toBytes: sizeBytes };
  await journal(ctx, p);
  // Settling rolls forward: whatever step failed or crashed, the device ends at the new length.
  await commitJournalled(ctx, p, () => setDeviceLength(ctx, name, vol, sizeBytes));
  return { fromBytes, deviceGrown: active };
}
