import { stat, statfs } from "node:fs/promises";

const MiB = 1024 * 1024;

/**
 * What the driver reads of the host filesystem under the pool. Injected so tests can
 * play a small or full host disk; the real one reads the kernel directly (no process).
 */
export interface HostSpace {
  /** Bytes the filesystem holding `dir` still has available. */
  freeBytes(dir: string): Promise<number>;
  /** The filesystem's size in bytes. */
  totalBytes(dir: string): Promise<number>;
  /** Bytes of `file` backed by allocated blocks (0 when it does not exist). */
  allocatedBytes(file: string): Promise<number>;
}

export const realHostSpace: HostSpace = {
  async freeBytes(dir) {
    const s = await statfs(dir);
    return s.bavail * s.bsize;
  },
  async totalBytes(dir) {
    const s = await statfs(dir);
    return s.blocks * s.bsize;
  },
  async allocatedBytes(file) {
    try {
      return (await stat(file)).blocks * 512;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return 0;
      throw err;
    }
  },
};

const GiB = 1024 * MiB;

/**
 * Free, reserved space a pool (either driver) keeps ahead of its use, in whole blocks:
 * 10 % of its size, at least 512 MiB (a fast writer's worth between two checks), at most
 * 4 GiB (a large pool need not hold more of the host back).
 */
export function headroomBytes(poolMaxBytes: number, blockBytes: number): number {
  const want = Math.min(4 * GiB, Math.max(512 * MiB, Math.ceil(poolMaxBytes / 10)));
  return Math.min(poolMaxBytes, Math.ceil(want / blockBytes) * blockBytes);
}

/** Host space a pool never takes, so the host (and the pool's own state files) can still write: max(256 MiB, 2 %). */
export function hostFloorBytes(hostTotalBytes: number): number {
  return Math.max(256 * MiB, Math.ceil(hostTotalBytes / 50));
}

export interface GrowthPlan {
  /** The new data length (bytes, whole blocks); equal to `lengthBytes` when nothing can grow. */
  targetBytes: number;
  /** True when the pool wants more than the host can give. */
  hostShort: boolean;
}

/**
 * How far to grow the pool's data device: when less than the headroom is free, to twice the
 * headroom above what is used, never past the pool's size, and never into the host's floor.
 */
export function planGrowth(p: {
  lengthBytes: number;
  usedBytes: number;
  poolMaxBytes: number;
  headroomBytes: number;
  blockBytes: number;
  hostFreeBytes: number;
  hostFloorBytes: number;
}): GrowthPlan {
  const free = p.lengthBytes - p.usedBytes;
  if (free >= p.headroomBytes || p.lengthBytes >= p.poolMaxBytes) return { targetBytes: p.lengthBytes, hostShort: false };
  const roundUp = (n: number) => Math.ceil(n / p.blockBytes) * p.blockBytes;
  const want = Math.min(p.poolMaxBytes, roundUp(p.usedBytes + 2 * p.headroomBytes));
  const allowed = Math.max(0, p.hostFreeBytes - p.hostFloorBytes);
  const can = p.lengthBytes + Math.floor(allowed / p.blockBytes) * p.blockBytes;
  if (can >= want) return { targetBytes: want, hostShort: false };
  return { targetBytes: Math.max(p.lengthBytes, can), hostShort: true };
}
