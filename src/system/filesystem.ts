import type { Runner } from "./runner.js";

export type FsType = "ext4" | "xfs";

/** The sector size every new filesystem is made with (ext4's block size is the same). */
export const FS_SECTOR_BYTES = 4096;

/** Past this size mkfs.ext4 would make a 1 GiB journal; 128 MiB is plenty and costs the pool less. */
const JOURNAL_CAP_ABOVE = 128 * 1024 ** 3;

/**
 * Makes a filesystem on a fresh thin device. No discard (the device is already
 * empty) and lazy inode tables keep creation fast and the volume thin; ext4 keeps
 * no blocks back for root, since the whole size is the volume's. The journal, though,
 * is written out in full: it is then backed by real blocks, so when the pool runs out
 * of space the filesystem can still commit, a delete can free space, and the volume
 * does not turn read-only.
 */
export async function formatFilesystem(runner: Runner, device: string, fs: FsType, label: string, sizeBytes = 0): Promise<void> {
  if (fs === "ext4") {
    const journal = sizeBytes > JOURNAL_CAP_ABOVE ? ["-J", "size=128"] : [];
    await runner.run("mkfs.ext4", [
      ...journal,
      "-q",
      "-F",
      "-m",
      "0",
      // Loop devices with direct I/O take the backing filesystem's 4 KiB sectors; 1 KiB blocks would not mount.
      "-b",
      String(FS_SECTOR_BYTES),
      "-L",
      label.slice(0, 16),
      "-E",
      "lazy_itable_init=1,lazy_journal_init=0,nodiscard",
      device,
    ]);
  } else {
    // 4 KiB sectors: the filesystem then mounts on any device it can meet, including a
    // direct-I/O loop device over a reflinked image, which has 4 KiB logical sectors.
    await runner.run("mkfs.xfs", ["-q", "-f", "-K", "-s", `size=${FS_SECTOR_BYTES}`, "-L", label.slice(0, 12), device]);
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

/**
 * Grows a mounted filesystem to fill its device, online: ext4 through the device, xfs
 * through its mount point. Growing to the size it already has is a no-op, so a resize
 * interrupted after this step can run it again.
 */
export async function growFilesystem(runner: Runner, device: string, mountpoint: string, fs: FsType): Promise<void> {
  if (fs === "ext4") await runner.run("resize2fs", [device], { timeoutMs: 600_000 });
  else await runner.run("xfs_growfs", [mountpoint], { timeoutMs: 600_000 });
}

/**
 * Grows an unmounted ext4 filesystem: checked first (resize2fs insists on a clean, checked
 * filesystem), then grown. Exit 1 of e2fsck means it fixed something, and the check passed.
 */
export async function growExt4Offline(runner: Runner, device: string): Promise<void> {
  await runner.run("e2fsck", ["-f", "-p", device], { okExitCodes: [1], timeoutMs: 600_000 });
  await runner.run("resize2fs", [device], { timeoutMs: 600_000 });
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
