export type PoolDriverName = "dm-thin" | "loop";

export interface PoolUsage {
  driver: PoolDriverName;
  /** Bytes the pool can hold, and bytes already allocated to volumes. */
  dataTotalBytes: number;
  dataUsedBytes: number;
  /** dm-thin only: its metadata device fills up separately from the data. */
  metaTotalBytes?: number;
  metaUsedBytes?: number;
  /**
   * Host space the pool has already taken for itself (allocated blocks of its files), and
   * what the host filesystem under the pool still has free. The pool never writes into host
   * space it has not reserved, so a full host disk cannot fail a write half-way.
   */
  hostReservedBytes?: number;
  hostFreeBytes?: number;
}

export interface CloneOptions {
  /**
   * Where the origin's filesystem is mounted, if it is. A driver that cannot
   * quiesce the device itself freezes this filesystem for the instant of the copy.
   */
  originMountpoint?: string;
}

/**
 * A thin pool of block devices. It knows volumes by name (already validated by
 * the volume layer) and knows nothing of Docker, filesystems' contents or mounts
 * beyond what a clone needs. Every method is idempotent where the doc says so,
 * because a crash can interrupt any of them and start-up finishes the job.
 */
export interface Pool {
  readonly driver: PoolDriverName;
  /** Creates the pool on first use, or finds it again after a restart and recovers interrupted work. */
  open(): Promise<void>;
  /**
   * Releases what this process holds. Volumes stay attached and mounted; a pool with no
   * active volume is taken down (its devices detached), and open() sets it up again.
   */
  close(): Promise<void>;
  /** Names of the volumes the pool holds. */
  list(): Promise<string[]>;
  /** A new, empty thin volume of `sizeBytes` (a multiple of 512). Fails if the name exists. */
  create(name: string, sizeBytes: number): Promise<void>;
  /** A copy-on-write clone of `origin`, of the same size. Fails if `name` exists. */
  clone(name: string, origin: string, options?: CloneOptions): Promise<void>;
  /** The volume's size in bytes. */
  sizeOf(name: string): Promise<number>;
  /** Makes the volume's block device available and returns its path. Idempotent. */
  activate(name: string): Promise<string>;
  /**
   * Names of the volumes whose block device exists now, found for the whole pool at once
   * (start-up calls it instead of asking volume by volume).
   */
  attached(): Promise<Set<string>>;
  /** Takes the block device away; the data stays. Idempotent; the device must not be mounted. */
  deactivate(name: string): Promise<void>;
  /** Returns the volume's space to the pool and forgets it. Idempotent: an absent volume is fine. */
  remove(name: string): Promise<void>;
  /** Pool-wide space. */
  usage(): Promise<PoolUsage>;
  /** Bytes the pool has allocated to this volume. */
  allocatedBytes(name: string): Promise<number>;
}
