import { readdir, realpath, stat } from "node:fs/promises";
import { join } from "node:path";
import type { Runner } from "./runner.js";

/** A block device's size in bytes. */
export async function deviceSizeBytes(runner: Runner, device: string): Promise<number> {
  const { stdout } = await runner.run("blockdev", ["--getsize64", device]);
  const n = Number(stdout.trim());
  if (!Number.isSafeInteger(n)) throw new Error(`blockdev printed no size for ${device}: ${JSON.stringify(stdout)}`);
  return n;
}

/** Tells the device that every block is unused, so a thin pool can take the space back. */
export async function discardDevice(runner: Runner, device: string): Promise<void> {
  // Discarding a large thin device can take a while; Docker allows Remove 60 s.
  await runner.run("blkdiscard", [device], { timeoutMs: 50_000 });
}

/** A block device as found from a path: the node it resolves to and its `major:minor`. */
export interface BlockDeviceId {
  /** The path with every symlink resolved (`/dev/disk/by-id/...` → `/dev/sdb`). */
  path: string;
  /** `major:minor`, as dm tables print a device. */
  number: string;
  /**
   * Its stable names: the entries of /dev/disk/by-id that lead to it (udev makes them from
   * the disk's serial or WWN). Empty where there are none, as for a loop device.
   */
  ids: string[];
}

/** Finds block devices from paths (tests play simulated disks). */
export interface BlockDevices {
  /** Resolves `path`; fails when it is missing or not a block device. */
  identify(path: string): Promise<BlockDeviceId>;
}

/** Linux's dev_t split into major and minor (the glibc encoding: 12+20 bits across 64). */
export function deviceNumberOf(rdev: bigint): string {
  const major = ((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & 0xfffff000n);
  const minor = (rdev & 0xffn) | ((rdev >> 12n) & 0xffffff00n);
  return `${major}:${minor}`;
}

const BY_ID = "/dev/disk/by-id";

/** The names in /dev/disk/by-id that resolve to `device`; none when the directory is missing. */
async function stableNames(device: string): Promise<string[]> {
  let names: string[];
  try {
    names = await readdir(BY_ID);
  } catch {
    return [];
  }
  const leads = await Promise.all(names.map(async (n) => (await realpath(join(BY_ID, n)).catch(() => "")) === device));
  return names.filter((_, i) => leads[i]).sort();
}

/** The real devices: realpath, stat's st_rdev and /dev/disk/by-id, no process started. */
export const realBlockDevices: BlockDevices = {
  async identify(path) {
    const resolved = await realpath(path);
    const st = await stat(resolved, { bigint: true });
    if (!st.isBlockDevice()) throw new Error(`${resolved} is not a block device`);
    return { path: resolved, number: deviceNumberOf(st.rdev), ids: await stableNames(resolved) };
  },
};
