import * as v from "valibot";

/**
 * The admin API's replies (docs/admin-api.md), checked when they arrive so a table
 * never prints "undefined". Objects are loose: fields a newer plugin adds are kept
 * (and shown by --json), not refused.
 */
const Bytes = v.pipe(v.number(), v.minValue(0));
const Count = v.pipe(v.number(), v.integer(), v.minValue(0));

export const VolumeReply = v.looseObject({
  name: v.string(),
  createdAt: v.optional(v.string()),
  sizeBytes: Bytes,
  filesystem: v.optional(v.string()),
  mounted: v.boolean(),
  mountpoint: v.optional(v.string()),
  mounts: Count,
  /** Only while mounted. */
  usedBytes: v.optional(Bytes),
  availableBytes: v.optional(Bytes),
  allocatedBytes: Bytes,
  /** Only for a clone: a volume name or VOLUME@SNAPSHOT. */
  origin: v.optional(v.string()),
  snapshots: v.array(v.string()),
});
export type Volume = v.InferOutput<typeof VolumeReply>;

export const VolumeListReply = v.looseObject({ volumes: v.array(VolumeReply) });

export const PoolReply = v.looseObject({
  driver: v.string(),
  dataTotalBytes: Bytes,
  dataUsedBytes: Bytes,
  /** dm-thin only. */
  metaTotalBytes: v.optional(Bytes),
  metaUsedBytes: v.optional(Bytes),
  /** Pools kept in files only. */
  hostReservedBytes: v.optional(Bytes),
  hostFreeBytes: v.optional(Bytes),
  minFreePercent: v.number(),
  volumes: Count,
  snapshots: Count,
});
export type Pool = v.InferOutput<typeof PoolReply>;

export const SnapshotReply = v.looseObject({
  volume: v.string(),
  name: v.string(),
  createdAt: v.optional(v.string()),
  sizeBytes: Bytes,
  allocatedBytes: Bytes,
});
export type Snapshot = v.InferOutput<typeof SnapshotReply>;

export const SnapshotListReply = v.looseObject({ snapshots: v.array(SnapshotReply) });

export const ResizeReply = v.looseObject({ name: v.string(), previousSizeBytes: Bytes, sizeBytes: Bytes });
export type Resized = v.InferOutput<typeof ResizeReply>;

/** `DELETE` of a snapshot replies `{}`. */
export const EmptyReply = v.looseObject({});

/** Any failure: `{"error", "kind"}` with a 4xx or 5xx status. */
export const ErrorReply = v.looseObject({ error: v.string(), kind: v.optional(v.string(), "error") });

/** One line of an `application/x-ndjson` reply. */
export const StreamEvent = v.variant("event", [
  v.looseObject({
    event: v.literal("progress"),
    message: v.string(),
    done: v.optional(v.number()),
    total: v.optional(v.number()),
  }),
  v.looseObject({ event: v.literal("result"), result: v.unknown() }),
  v.looseObject({ event: v.literal("error"), error: v.string(), kind: v.optional(v.string(), "error") }),
]);
export type Progress = { message: string; done?: number | undefined; total?: number | undefined };

export const BackupReply = v.looseObject({
  id: v.string(),
  volume: v.string(),
  createdAt: v.string(),
  sizeBytes: Bytes,
  filesystem: v.optional(v.string()),
  blocks: Count,
  dataBytes: Bytes,
  previous: v.optional(v.string()),
});
export type Backup = v.InferOutput<typeof BackupReply>;

export const BackupListReply = v.looseObject({ backups: v.array(BackupReply) });

export const BackupResultReply = v.looseObject({
  ...BackupReply.entries,
  target: v.string(),
  blocksRead: Count,
  blocksChanged: Count,
  blocksUploaded: Count,
  bytesRead: Bytes,
  bytesUploaded: Bytes,
  incremental: v.boolean(),
  durationMs: Bytes,
});

export const BackupRemovalReply = v.looseObject({ id: v.string(), volume: v.string(), blocksDeleted: Count, blocksKept: Count });

export const VerifyReply = v.looseObject({
  id: v.string(),
  volume: v.string(),
  ok: v.boolean(),
  blocksChecked: Count,
  missing: v.array(Count),
  damaged: v.array(Count),
});
