import { mkdir, readdir } from "node:fs/promises";
import { join } from "node:path";
import * as v from "valibot";
import { readJsonFile, removeFileDurably, writeFileAtomic } from "../system/atomic-file.js";
import { VOLUME_NAME_PATTERN } from "./options.js";

const RecordSchema = v.object({
  version: v.literal(1),
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
  /** Docker mount ID → how many times that ID has mounted the volume. */
  mounts: v.record(v.string(), v.number()),
});

export type VolumeRecord = v.InferOutput<typeof RecordSchema>;

const SUFFIX = ".json";

/**
 * One JSON file per volume, each replaced atomically. The directory listing is
 * the list of volumes; nothing else holds state that a crash could tear.
 */
export class RecordStore {
  constructor(private readonly dir: string) {}

  async init(): Promise<void> {
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
  }

  private path(name: string): string {
    return join(this.dir, name + SUFFIX);
  }

  async get(name: string): Promise<VolumeRecord | undefined> {
    const raw = await readJsonFile(this.path(name));
    if (raw === undefined) return undefined;
    const parsed = v.safeParse(RecordSchema, raw);
    if (!parsed.success) {
      throw new Error(`the record of volume "${name}" at ${this.path(name)} is damaged: ${parsed.issues.map((i) => i.message).join("; ")}`);
    }
    return parsed.output;
  }

  async save(record: VolumeRecord): Promise<void> {
    await writeFileAtomic(this.path(record.name), JSON.stringify(record, null, 2) + "\n");
  }

  async delete(name: string): Promise<void> {
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
