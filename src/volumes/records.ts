import { mkdir, readdir } from "node:fs/promises";
import { join } from "node:path";
import * as v from "valibot";
import { readJsonFile, removeFileDurably, writeFileAtomic } from "../system/atomic-file.js";
import { VOLUME_NAME_PATTERN } from "./options.js";

const CountSchema = v.pipe(v.number(), v.integer(), v.minValue(0));

/**
 * Version 1 kept mount IDs as keys of a plain object, where IDs such as "__proto__" or
 * "toString" collide with Object.prototype. Its files still load: the keys are read as
 * the JSON parser made them (own properties), never through a lookup.
 */
const MountsV1Schema = v.pipe(
  v.custom<Record<string, number>>(
    (x) => typeof x === "object" && x !== null && !Array.isArray(x) && Object.values(x).every((n) => v.is(CountSchema, n)),
    "mounts must map mount IDs to reference counts",
  ),
  v.transform((o) => new Map(Object.entries(o))),
);

/** Version 2 keeps them as a list, which no ID can collide with. */
const MountsV2Schema = v.pipe(
  v.array(v.object({ id: v.string(), count: CountSchema })),
  v.transform((list) => new Map(list.map((m) => [m.id, m.count]))),
);

/** creating and removing are intents, as for a volume: start-up finishes or undoes them. */
const SnapshotSchema = v.object({
  name: v.pipe(v.string(), v.regex(VOLUME_NAME_PATTERN)),
  state: v.picklist(["creating", "ready", "removing"]),
  createdAt: v.string(),
  /** The volume's size when the snapshot was taken: a rollback or a clone gets this size. */
  sizeBytes: v.number(),
  /**
   * Set on a snapshot a backup took: the next backup to the same target finds what changed
   * since it. It is thinvol's own: removed with the volume, or once a newer backup replaces it.
   */
  backup: v.optional(v.object({ target: v.string(), id: v.string() })),
});

const fields = {
  name: v.pipe(v.string(), v.regex(VOLUME_NAME_PATTERN)),
  /** creating and removing are intents: start-up rolls them back or forward. */
  state: v.picklist(["creating", "ready", "removing"]),
  createdAt: v.string(),
  sizeBytes: v.number(),
  fs: v.picklist(["ext4", "xfs"]),
  origin: v.optional(v.string()),
  uid: v.optional(v.number()),
  gid: v.optional(v.number()),
  mode: v.optional(v.number()),
  mountOptions: v.array(v.string()),
  snapshots: v.optional(v.array(SnapshotSchema)),
  /** Intent of a resize in flight: start-up grows the device and the filesystem to this size. */
  resizeTo: v.optional(v.number()),
  /** Intent of a rollback in flight: start-up finishes it. */
  rollbackTo: v.optional(v.pipe(v.string(), v.regex(VOLUME_NAME_PATTERN))),
};

const RecordSchema = v.variant("version", [
  v.object({ version: v.literal(1), ...fields, mounts: MountsV1Schema }),
  v.object({ version: v.literal(2), ...fields, mounts: MountsV2Schema }),
]);

const VERSION = 2;

type Parsed = v.InferOutput<typeof RecordSchema>;
export type SnapshotRecord = v.InferOutput<typeof SnapshotSchema>;

/** A volume's record in memory: the file's version is the store's business. */
export type VolumeRecord = Omit<Parsed, "version" | "mounts"> & {
  /** Docker mount ID → how many times that ID has mounted the volume. */
  mounts: Map<string, number>;
};

const SUFFIX = ".json";

/**
 * One JSON file per volume, each replaced atomically. The directory listing is
 * the list of volumes; nothing else holds state that a crash could tear.
 *
 * Records read or written are kept in memory too, so List does not read and parse every
 * file: this process is the only writer (it holds the state directory's lock). Callers
 * get copies, so a record changed but not saved never reaches the cache.
 */
export class RecordStore {
  private readonly cache = new Map<string, VolumeRecord>();

  constructor(private readonly dir: string) {}

  async init(): Promise<void> {
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
  }

  private path(name: string): string {
    return join(this.dir, name + SUFFIX);
  }

  async get(name: string): Promise<VolumeRecord | undefined> {
    const cached = this.cache.get(name);
    if (cached !== undefined) return structuredClone(cached);
    const raw = await readJsonFile(this.path(name));
    if (raw === undefined) return undefined;
    const parsed = v.safeParse(RecordSchema, raw);
    if (!parsed.success) {
      throw new Error(`the record of volume "${name}" at ${this.path(name)} is damaged: ${parsed.issues.map((i) => i.message).join("; ")}`);
    }
    const { version: _version, ...record } = parsed.output;
    this.cache.set(name, structuredClone(record));
    return record;
  }

  async save(record: VolumeRecord): Promise<void> {
    const mounts = [...record.mounts].map(([id, count]) => ({ id, count }));
    // Forgotten first: if the write fails, the next get reads whatever the file holds.
    this.cache.delete(record.name);
    await writeFileAtomic(this.path(record.name), JSON.stringify({ version: VERSION, ...record, mounts }, null, 2) + "\n");
    this.cache.set(record.name, structuredClone(record));
  }

  async delete(name: string): Promise<void> {
    this.cache.delete(name);
    await removeFileDurably(this.path(name));
  }

  async names(): Promise<string[]> {
    const files = await readdir(this.dir);
    return files
      .filter((f) => f.endsWith(SUFFIX) && !f.startsWith("."))
      .map((f) => f.slice(0, -SUFFIX.length))
      .filter((n) => VOLUME_NAME_PATTERN.test(n))
      .sort();
  }
}
