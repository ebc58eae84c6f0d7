import { open } from "node:fs/promises";

/** The superblock fields that say how small a device's sectors may be for the filesystem. */
const XFS_MAGIC = 0x58465342; // "XFSB"
const XFS_SECTSIZE_OFFSET = 102;
const EXT4_SUPERBLOCK = 1024;
const EXT4_MAGIC = 0xef53;
const EXT4_MAGIC_OFFSET = EXT4_SUPERBLOCK + 56;
const EXT4_LOG_BLOCK_SIZE_OFFSET = EXT4_SUPERBLOCK + 24;

/**
 * The logical sector size a volume's loop device must have for the filesystem in `image`.
 * thinvol makes every filesystem for 4 KiB sectors; an xfs made by an older thinvol with
 * 512-byte sectors (or an ext4 with blocks under 4 KiB) needs 512, which a direct-I/O device
 * over a reflinked image cannot give, so the kernel then runs it without direct I/O.
 */
export async function sectorSizeForImage(image: string): Promise<512 | 4096> {
  const head = Buffer.alloc(2048);
  const handle = await open(image, "r");
  try {
    await handle.read(head, 0, head.length, 0);
  } finally {
    await handle.close();
  }
  if (head.readUInt32BE(0) === XFS_MAGIC) return head.readUInt16BE(XFS_SECTSIZE_OFFSET) < 4096 ? 512 : 4096;
  if (head.readUInt16LE(EXT4_MAGIC_OFFSET) === EXT4_MAGIC) return 1024 << head.readUInt32LE(EXT4_LOG_BLOCK_SIZE_OFFSET) < 4096 ? 512 : 4096;
  return 4096;
}
