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

/** A byte range of a volume or snapshot. */
export interface VolumeRange {
  offset: number;
  length: number;
}

/** A snapshot opened for reading (a backup reads its bytes); release() when done. */
export interface SnapshotReader {
  /** A file or block device holding the snapshot's bytes, read only. */
  path: string;
  release(): Promise<void>;
}

export interface CloneOptions {
  /**
   * Where the origin's filesystem is mounted, if it is. A driver that cannot
   * quiesce the device itself freezes this filesystem for the instant of the copy.
   */
  originMountpoint?: string;
  /** Copy the origin's snapshot of this name, not the origin itself (the copy has the snapshot's size). */
  snapshot?: string;
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

  /**
   * Grows the volume's block device to `sizeBytes` (a multiple of 512), also while it is
   * attached and mounted: an attached device sees its new size at once. Never shrinks (a
   * smaller size is refused). Idempotent: a volume already that size is fine. A crash leaves
   * the old size or the new one.
   */
  resize(name: string, sizeBytes: number): Promise<void>;
  /**
   * A read-only, point-in-time copy of `volume` named `snapshot`, sharing every block until
   * either side is written. Fails if it exists. A mounted origin is quiesced for the instant
   * of the copy (see CloneOptions.originMountpoint).
   */
  snapshot(volume: string, snapshot: string, options?: CloneOptions): Promise<void>;
  /** The snapshots the pool holds, by volume (names sorted). */
  snapshots(): Promise<Map<string, string[]>>;
  /** Size in bytes of a snapshot's device (the volume's size when it was taken). */
  snapshotSizeOf(volume: string, snapshot: string): Promise<number>;
  /** Bytes the pool has allocated to a snapshot (shared blocks counted too). */
  snapshotAllocatedBytes(volume: string, snapshot: string): Promise<number>;
  /** Removes a snapshot. Idempotent: an absent snapshot is fine. */
  removeSnapshot(volume: string, snapshot: string): Promise<void>;
  /**
   * Puts the volume's data back to its snapshot's, in place: same name, and the size the
   * snapshot had. The volume must not be attached (refused with ConflictError). The snapshot
   * stays. A crash leaves the old data or the snapshot's, and running it again finishes it.
   */
  rollback(volume: string, snapshot: string): Promise<void>;
  /** Grows the pool's data space to `sizeBytes` while volumes are in use. A smaller size is refused. */
  grow(sizeBytes: number): Promise<void>;

  /**
   * Opens a snapshot's bytes for reading while the volume stays in use. The snapshot must
   * not be removed before release(). Several readers of one snapshot may be open at once.
   */
  openSnapshot(volume: string, snapshot: string): Promise<SnapshotReader>;
  /**
   * The byte ranges of `snapshot` that may hold data differing from snapshot `since` of the
   * same volume (a range may be larger than what changed, never smaller), or, without
   * `since`, every range that may hold data (the rest reads as zeros). Ranges are sorted and
   * do not overlap. Found from the pool's own records of where data lies: nothing is read.
   */
  changedRanges(volume: string, snapshot: string, since?: string): Promise<VolumeRange[]>;
}
