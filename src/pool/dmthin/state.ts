import { join } from "node:path";
import * as v from "valibot";
import { ThinvolError } from "../../errors.js";
import { readJsonFile, writeFileAtomic } from "../../system/atomic-file.js";

/** Thin ids are 24-bit. */
export const MAX_THIN_ID = 2 ** 24 - 1;

const Count = v.pipe(v.number(), v.integer(), v.minValue(0));
const ThinId = v.pipe(v.number(), v.integer(), v.minValue(0), v.maxValue(MAX_THIN_ID));
const NAME = "[a-zA-Z0-9][a-zA-Z0-9_.-]{0,95}";
const NAME_RE = new RegExp(`^${NAME}$`);
const Name = v.pipe(v.string(), v.regex(NAME_RE));
/** `VOLUME@SNAPSHOT`: `@` cannot occur in either name. */
const SnapshotKey = v.pipe(v.string(), v.regex(new RegExp(`^${NAME}@${NAME}$`)));
const Size = v.pipe(Count, v.minValue(512));

/** Whether `name` can be a volume's or a snapshot's name. */
export const isValidName = (name: string): boolean => NAME_RE.test(name);

const VolumeSchema = v.object({
  id: ThinId,
  sizeBytes: Size,
  /** Last figure read from the kernel, for when the device is not active. */
  allocatedBytes: v.optional(Count),
});

/**
 * A snapshot: a thin id that is never activated nor written, so its size (the volume's when
 * it was taken) and its allocation (the volume's at that instant, shared blocks counted)
 * never change.
 */
const SnapshotSchema = v.object({
  id: ThinId,
  sizeBytes: Size,
  allocatedBytes: v.optional(Count),
});

/**
 * The journal: the one pool-wide operation in flight, written before the first
 * message to the pool. `fromTransaction` is the pool's transaction id before the
 * operation; the operation's `set_transaction_id fromTransaction fromTransaction+1`
 * is its commit point.
 */
const PendingSchema = v.variant("op", [
  v.object({ op: v.literal("create"), name: Name, id: ThinId, sizeBytes: Size, fromTransaction: Count }),
  v.object({
    op: v.literal("clone"),
    name: Name,
    id: ThinId,
    sizeBytes: Size,
    origin: Name,
    /** The origin's thin id, or its snapshot's when `snapshot` is set. */
    originId: ThinId,
    /** A clone of the origin's snapshot of this name: nothing was suspended. */
    snapshot: v.optional(Name),
    fromTransaction: Count,
  }),
  v.object({ op: v.literal("remove"), name: Name, id: ThinId, fromTransaction: Count }),
  /** `snapshot` of volume `name`: a new thin id `id` as a snapshot of `originId`. */
  v.object({ op: v.literal("snapshot"), name: Name, snapshot: Name, id: ThinId, originId: ThinId, sizeBytes: Size, fromTransaction: Count }),
  v.object({ op: v.literal("remove-snapshot"), name: Name, snapshot: Name, id: ThinId, fromTransaction: Count }),
  /**
   * Volume `name` gets a new thin id `id`, a snapshot of `snapshotId`; its old id `oldId` is
   * deleted after the commit point.
   */
  v.object({
    op: v.literal("rollback"),
    name: Name,
    snapshot: Name,
    id: ThinId,
    oldId: ThinId,
    snapshotId: ThinId,
    sizeBytes: Size,
    fromTransaction: Count,
  }),
  /**
   * Volume `name` grows from `fromBytes` to `toBytes`. No message to the pool (a thin device
   * has no size in the metadata), so no transaction: it is always finished, never undone.
   */
  v.object({ op: v.literal("resize"), name: Name, id: ThinId, fromBytes: Size, toBytes: Size }),
]);

/**
 * A pool whose data sits on a block device (POOL_DEVICE) rather than data.img. `setting` is
 * POOL_DEVICE as given (a /dev/disk/by-id link stays valid when kernel names change),
 * `path` what it resolved to, `sizeBytes` the device's size when the pool was made or last grown.
 */
const DataDeviceSchema = v.object({
  setting: v.pipe(v.string(), v.startsWith("/")),
  path: v.pipe(v.string(), v.startsWith("/")),
  sizeBytes: Count,
  /** The device's /dev/disk/by-id names when the pool was made: who it is, whatever its kernel name. */
  ids: v.optional(v.array(v.string()), []),
});

const StateSchema = v.object({
  version: v.literal(1),
  /** Fixed when the pool is made; the metadata is unreadable with any other. */
  blockSizeSectors: v.pipe(Count, v.minValue(128)),
  dataSizeBytes: Count,
  metaSizeBytes: Count,
  /** The pool's transaction id as of the last completed operation. */
  transactionId: Count,
  /** Next thin id to try; ids are not reused until they wrap. */
  nextId: ThinId,
  volumes: v.record(Name, VolumeSchema),
  /** By `VOLUME@SNAPSHOT`; absent in pools made before snapshots existed. */
  snapshots: v.optional(v.record(SnapshotKey, SnapshotSchema), {}),
  pending: v.optional(PendingSchema),
  /** Absent: the data is in data.img (every pool made before POOL_DEVICE existed). */
  dataDevice: v.optional(DataDeviceSchema),
  /**
   * The most data space the pool may take, as grown at run time (grow()): a restart with a
   * smaller POOL_SIZE keeps it. Absent: POOL_SIZE alone says (a pool on a device: its length).
   */
  maxDataBytes: v.optional(Count),
});

export type VolumeRecord = v.InferOutput<typeof VolumeSchema>;
export type SnapshotRecord = v.InferOutput<typeof SnapshotSchema>;
export type Pending = v.InferOutput<typeof PendingSchema>;
export type DataDeviceRecord = v.InferOutput<typeof DataDeviceSchema>;

export interface PoolState {
  blockSizeSectors: number;
  dataSizeBytes: number;
  metaSizeBytes: number;
  transactionId: number;
  nextId: number;
  volumes: Map<string, VolumeRecord>;
  /** By snapshotKey(volume, snapshot). */
  snapshots: Map<string, SnapshotRecord>;
  pending: Pending | undefined;
  /** Where the data lives: undefined for data.img. */
  dataDevice: DataDeviceRecord | undefined;
  /** The maximum grow() set, if any. */
  maxDataBytes: number | undefined;
}

export const snapshotKey = (volume: string, snapshot: string): string => `${volume}@${snapshot}`;

/** The volume and the snapshot name of a snapshot key. */
export function splitSnapshotKey(key: string): [volume: string, snapshot: string] {
  const at = key.indexOf("@");
  return [key.slice(0, at), key.slice(at + 1)];
}

export const stateFile = (dir: string): string => join(dir, "dmthin-state.json");

export async function loadState(dir: string): Promise<PoolState | undefined> {
  const path = stateFile(dir);
  let raw: unknown;
  try {
    raw = await readJsonFile(path);
  } catch (err) {
    throw new ThinvolError(`cannot read the dm-thin pool state ${path}: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
  }
  if (raw === undefined) return undefined;
  const parsed = v.safeParse(StateSchema, raw);
  if (!parsed.success) {
    const issue = parsed.issues[0];
    const where = issue ? v.getDotPath(issue) : undefined;
    throw new ThinvolError(`the dm-thin pool state ${path} is damaged${where ? ` at ${where}` : ""}: ${issue?.message ?? "invalid"}`);
  }
  const s = parsed.output;
  return {
    blockSizeSectors: s.blockSizeSectors,
    dataSizeBytes: s.dataSizeBytes,
    metaSizeBytes: s.metaSizeBytes,
    transactionId: s.transactionId,
    nextId: s.nextId,
    volumes: new Map(Object.entries(s.volumes)),
    snapshots: new Map(Object.entries(s.snapshots)),
    pending: s.pending,
    dataDevice: s.dataDevice,
    maxDataBytes: s.maxDataBytes,
  };
}

/** A map as a JSON object, keys sorted. */
function sortedRecord<T>(map: Map<string, T>): Record<string, T> {
  const out: Record<string, T> = {};
  for (const [key, value] of [...map].sort(([a], [b]) => (a < b ? -1 : 1))) out[key] = value;
  return out;
}

export async function saveState(dir: string, state: PoolState): Promise<void> {
  const out = {
    version: 1,
    blockSizeSectors: state.blockSizeSectors,
    dataSizeBytes: state.dataSizeBytes,
    metaSizeBytes: state.metaSizeBytes,
    transactionId: state.transactionId,
    nextId: state.nextId,
    volumes: sortedRecord(state.volumes),
    ...(state.snapshots.size > 0 ? { snapshots: sortedRecord(state.snapshots) } : {}),
    ...(state.pending ? { pending: state.pending } : {}),
    ...(state.dataDevice ? { dataDevice: state.dataDevice } : {}),
    ...(state.maxDataBytes !== undefined ? { maxDataBytes: state.maxDataBytes } : {}),
  };
  await writeFileAtomic(stateFile(dir), JSON.stringify(out, null, 2) + "\n");
}
