import { ThinvolError, errorMessage } from "../../errors.js";
import { formatSize } from "../../size.js";
import { probeSignatures } from "../../system/blkid.js";
import { deviceSizeBytes } from "../../system/blockdev.js";
import type { Locked } from "./context.js";
import { MIN_POOL_BLOCKS } from "./growth.js";
import { saveState, stateFile, type PoolState } from "./state.js";

/*
 * A pool whose data is a block device (POOL_DEVICE) instead of data.img: the device is the
 * pool's whole length from the start, so there is nothing to reserve on the host and nothing
 * to grow. It is made only on a device that holds nothing, and never moves between a file
 * and a device, or to another device.
 */

/** POOL_DEVICE as found now. */
export interface DataDevice {
  /** POOL_DEVICE as given. */
  setting: string;
  /** Symlinks resolved. */
  path: string;
  /** `major:minor`, as the live pool table shows it. */
  number: string;
  sizeBytes: number;
  /** Its /dev/disk/by-id names. */
  ids: string[];
}

/** Resolves POOL_DEVICE and reads its size; changes nothing. */
export async function findDataDevice(ctx: Locked): Promise<DataDevice> {
  const setting = ctx.deviceSetting;
  try {
    const { path, number, ids } = await ctx.blockDevices.identify(setting);
    return { setting, path, number, ids, sizeBytes: await deviceSizeBytes(ctx.runner, path) };
  } catch (err) {
    throw new ThinvolError(`POOL_DEVICE ${setting} cannot hold the data of dm-thin pool ${ctx.poolName}: ${errorMessage(err)}`, { cause: err });
  }
}

/**
 * Refuses a pool opened with another backing than it was made on: its metadata maps blocks
 * of that file or device, and reading them from another would serve garbage or overwrite
 * someone's data. A by-id link that now resolves to a new kernel name is still the device.
 */
export async function checkBacking(ctx: Locked, state: PoolState, device: DataDevice | undefined): Promise<void> {
  const recorded = state.dataDevice;
  const where = `the dm-thin pool in ${ctx.dir}`;
  if (!recorded && !device) return;
  if (!recorded && device) {
    throw new ThinvolError(
      `POOL_DEVICE=${device.setting} (${device.path}), but ${where} keeps its data in the file ${ctx.dataFile}: a pool cannot move between a file and a device. ` +
        `Unset POOL_DEVICE to keep using this pool, or use an empty STATE_DIR for a pool on ${device.path}`,
    );
  }
  if (recorded && !device) {
    throw new ThinvolError(
      `POOL_DEVICE is not set, but ${where} keeps its data on the device ${recorded.path} (POOL_DEVICE=${recorded.setting}), not in a file: ` +
        `a pool cannot move between a file and a device. Set POOL_DEVICE=${recorded.setting} again`,
    );
  }
  if (!recorded || !device) return;
  // Kernel names (/dev/sdb) move between boots; the disk's serial does not.
  if (recorded.ids.length > 0 && !device.ids.some((id) => recorded.ids.includes(id))) {
    throw new ThinvolError(
      `POOL_DEVICE=${device.setting} (${device.path}) is not the disk ${where} was made on: that one is ${recorded.ids.join(", ")} in /dev/disk/by-id, ` +
        `this one is ${device.ids.join(", ") || "none of them"}. Nothing was written; set POOL_DEVICE to /dev/disk/by-id/${recorded.ids[0] ?? ""}`,
    );
  }
  if (device.path === recorded.path) return;
  if (device.setting !== recorded.setting) {
    throw new ThinvolError(
      `POOL_DEVICE=${device.setting} (${device.path}), but ${where} keeps its data on the device ${recorded.path} (POOL_DEVICE=${recorded.setting}): ` +
        `a pool cannot move to another device, nor between a file and a device. Set POOL_DEVICE=${recorded.setting} again`,
    );
  }
  ctx.log.info("POOL_DEVICE now resolves to another kernel name; it is the same device", { pool: ctx.poolName, setting: device.setting, was: recorded.path, now: device.path });
  state.dataDevice = { ...recorded, path: device.path };
  await saveState(ctx.dir, state);
}

/**
 * The pool's length on the device: the device's size in whole blocks when the pool is made,
 * then what the state file records. A device that shrank would cut volumes off.
 */
export function deviceLength(ctx: Locked, state: PoolState, device: DataDevice): number {
  const block = ctx.blockBytes;
  const recorded = state.dataDevice;
  if (recorded && device.sizeBytes < recorded.sizeBytes) {
    throw new ThinvolError(
      `POOL_DEVICE ${device.path} has ${formatSize(device.sizeBytes)} (${device.sizeBytes} bytes), less than the ${formatSize(recorded.sizeBytes)} ` +
        `(${recorded.sizeBytes} bytes) dm-thin pool ${ctx.poolName} was made on (${stateFile(ctx.dir)}): the pool would lose data. Restore the device's size`,
    );
  }
  if (recorded && device.sizeBytes > recorded.sizeBytes) {
    ctx.log.info("POOL_DEVICE is larger than the pool's length; the pool keeps its length until it is grown", {
      pool: ctx.poolName,
      device: device.path,
      size: formatSize(device.sizeBytes),
      recorded: formatSize(recorded.sizeBytes),
    });
  }
  const length = state.dataSizeBytes > 0 ? state.dataSizeBytes : Math.floor(device.sizeBytes / block) * block;
  if (length < MIN_POOL_BLOCKS * block) {
    throw new ThinvolError(`POOL_DEVICE ${device.path} has ${formatSize(device.sizeBytes)}: too small for dm-thin pool ${ctx.poolName}, which needs at least ${formatSize(MIN_POOL_BLOCKS * block)}`);
  }
  ctx.log.info("dm-thin pool keeps its data on POOL_DEVICE; POOL_SIZE is ignored", { pool: ctx.poolName, device: device.path, size: formatSize(length) });
  return length;
}

/** Refuses a device that holds anything blkid recognises: the pool would overwrite it. */
export async function refuseUnlessEmpty(ctx: Locked, device: DataDevice): Promise<void> {
  let found: Map<string, string> | undefined;
  try {
    found = await probeSignatures(ctx.runner, device.path);
  } catch (err) {
    throw new ThinvolError(`cannot check that POOL_DEVICE ${device.path} is empty before making dm-thin pool ${ctx.poolName} on it: ${errorMessage(err)}`, { cause: err });
  }
  if (!found) return;
  throw new ThinvolError(
    `POOL_DEVICE ${device.path}${device.setting === device.path ? "" : ` (${device.setting})`} is not empty: it holds ${describeSignatures(found)}. ` +
      `thinvol makes its pool only on a device that holds nothing, and then owns all of it. If nothing on it is needed, wipe it deliberately ` +
      `(wipefs -a ${device.path}) and start the plugin again`,
  );
}

/** "an ext4 filesystem (label "db")", "a gpt partition table", or blkid's own words. */
function describeSignatures(found: Map<string, string>): string {
  const parts: string[] = [];
  const type = found.get("TYPE");
  const label = found.get("LABEL");
  if (type) parts.push(`${/^[aeiou]/i.test(type) ? "an" : "a"} ${type} ${found.get("USAGE") ?? "signature"}${label ? ` (label ${JSON.stringify(label)})` : ""}`);
  const table = found.get("PTTYPE");
  if (table) parts.push(`a ${table} partition table`);
  if (parts.length > 0) return parts.join(" and ");
  return [...found].map(([k, v]) => `${k}=${v}`).join(" ") || "a signature blkid recognises";
}

/**
 * The kernel opens a pool's data device exclusively: a device mounted or held by something
 * else fails the table load with EBUSY, which alone would not say which device is taken.
 */
export function deviceBusyError(ctx: Locked, err: unknown): ThinvolError | undefined {
  if (!ctx.onDevice || !/Device or resource busy/i.test(errorMessage(err))) return undefined;
  return new ThinvolError(
    `cannot make dm-thin pool ${ctx.poolName} on POOL_DEVICE ${ctx.dataDevice}: the device is in use (mounted, or held by LVM, RAID, swap or another ` +
      `device-mapper device); the pool needs it for itself alone. Release it or choose another device: ${errorMessage(err)}`,
    { cause: err },
  );
}
