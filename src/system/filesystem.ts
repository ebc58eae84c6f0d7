import type { Runner } from "./runner.js";

export type FsType = "ext4" | "xfs";

/**
 * Makes a filesystem on a fresh thin device. No discard (the device is already
 * empty) and lazy ext4 initialisation keep creation fast and the volume thin;
 * ext4 keeps no blocks back for root, since the whole size is the volume's.
 */
export async function formatFilesystem(runner: Runner, device: string, fs: FsType, label: string): Promise<void> {
  if (fs === "ext4") {
    await runner.run("mkfs.ext4", [
      "-q",
      "-F",
      "-m",
      "0",
      // Loop devices with direct I/O take the backing filesystem's 4 KiB sectors; 1 KiB blocks would not mount.
      "-b",
      "4096",
      "-L",
      label.slice(0, 16),
      "-E",
      "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
      device,
    ]);
  } else {
    await runner.run("mkfs.xfs", ["-q", "-f", "-K", "-L", label.slice(0, 12), device]);
  }
}

/**
 * Options every mount of a volume gets. ext4: no background inode-table zeroing,
 * which would write (and so allocate) the whole table on a thin device.
 * xfs: clones carry their origin's UUID, which xfs refuses twice unless told.
 */
export function baseMountOptions(fs: FsType): string[] {
  return fs === "ext4" ? ["noinit_itable"] : ["nouuid"];
}

/** Freezes a mounted filesystem: writes block and everything is on the device. */
export async function freezeFilesystem(runner: Runner, mountpoint: string): Promise<void> {
  await runner.run("fsfreeze", ["--freeze", mountpoint]);
}

export async function thawFilesystem(runner: Runner, mountpoint: string): Promise<void> {
  await runner.run("fsfreeze", ["--unfreeze", mountpoint]);
}

/** Checks a filesystem without changing it; resolves to true when it is clean. */
export async function checkFilesystem(runner: Runner, device: string, fs: FsType): Promise<boolean> {
  const result =
    fs === "ext4"
      ? await runner.run("e2fsck", ["-f", "-n", device], { okExitCodes: [1, 2, 4, 8] })
      : await runner.run("xfs_repair", ["-n", device], { okExitCodes: [1] });
  return result.exitCode === 0;
}
