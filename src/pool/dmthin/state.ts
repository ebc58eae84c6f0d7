import { join } from "node:path";
import * as v from "valibot";
import { ThinvolError } from "../../errors.js";
import { readJsonFile, writeFileAtomic } from "../../system/atomic-file.js";

/** Thin ids are 24-bit. */
export const MAX_THIN_ID = 2 ** 24 - 1;

const Count = v.pipe(v.number(), v.integer(), v.minValue(0));
const ThinId = v.pipe(v.number(), v.integer(), v.minValue(0), v.maxValue(MAX_THIN_ID));
const Name = v.pipe(v.string(), v.regex(/^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,95}$/));

const VolumeSchema = v.object({
  id: ThinId,
  sizeBytes: v.pipe(Count, v.minValue(512)),
  /** Last figure read from the kernel, for when the device is not active. */
  allocatedBytes: v.optional(Count),
});

/**
 * The journal: the one pool-wide operation in flight, written before the first
 * message to the pool. `fromTransaction` is the pool's transaction id before the
 * operation; the operation's `set_transaction_id fromTransaction fromTransaction+1`
 * is its commit point.
 */
const PendingSchema = v.variant("op", [
  v.object({ op: v.literal("create"), name: Name, id: ThinId, sizeBytes: v.pipe(Count, v.minValue(512)), fromTransaction: Count }),
  v.object({
    op: v.literal("clone"),
    name: Name,
    id: ThinId,
    sizeBytes: v.pipe(Count, v.minValue(512)),
    origin: Name,
    originId: ThinId,
    fromTransaction: Count,
  }),
  v.object({ op: v.literal("remove"), name: Name, id: ThinId, fromTransaction: Count }),
]);

/**
 * A pool whose data sits on a block device (POOL_DEVICE) rather than data.img. `setting` is
 * POOL_DEVICE as given (a /dev/disk/by-id link stays valid when kernel names change),
 * `path` what it resolved to, `sizeBytes` the device's size when the pool was made.
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
  pending: v.optional(PendingSchema),
  /** Absent: the data is in data.img (every pool made before POOL_DEVICE existed). */
  dataDevice: v.optional(DataDeviceSchema),
});

export type VolumeRecord = v.InferOutput<typeof VolumeSchema>;
export type Pending = v.InferOutput<typeof PendingSchema>;
export type DataDeviceRecord = v.InferOutput<typeof DataDeviceSchema>;

export interface PoolState {
  blockSizeSectors: number;
  dataSizeBytes: number;
  metaSizeBytes: number;
  transactionId: number;
  nextId: number;
  volumes: Map<string, VolumeRecord>;
  pending: Pending | undefined;
  /** Where the data lives: undefined for data.img. */
  dataDevice: DataDeviceRecord | undefined;
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
    pending: s.pending,
    dataDevice: s.dataDevice,
  };
}

export async function saveState(dir: string, state: PoolState): Promise<void> {
  const volumes: Record<string, VolumeRecord> = {};
  for (const [name, vol] of [...state.volumes].sort(([a], [b]) => (a < b ? -1 : 1))) volumes[name] = vol;
  const out = {
    version: 1,
    blockSizeSectors: state.blockSizeSectors,
    dataSizeBytes: state.dataSizeBytes,
    metaSizeBytes: state.metaSizeBytes,
    transactionId: state.transactionId,
    nextId: state.nextId,
    volumes,
    ...(state.pending ? { pending: state.pending } : {}),
    ...(state.dataDevice ? { dataDevice: state.dataDevice } : {}),
  };
  await writeFileAtomic(stateFile(dir), JSON.stringify(out, null, 2) + "\n");
}
