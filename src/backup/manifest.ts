import { randomBytes } from "node:crypto";
import * as v from "valibot";
import { InvalidRequestError, NotFoundError, quote } from "../errors.js";
import { BACKUP_ID_PATTERN, VOLUME_NAME_PATTERN } from "../volumes/options.js";
import { blockCount, COMPRESSION, DIGEST_PATTERN, MAX_BLOCK_SIZE_BYTES, MIN_BLOCK_SIZE_BYTES } from "./blocks.js";
import { BackupDamagedError } from "./errors.js";
import type { BackupStore } from "./store.js";

/** The record format this version writes and the only one it reads. */
export const MANIFEST_FORMAT = 1;

const SECTOR_BYTES = 512;

/** [block index, SHA-256 of its content]. */
export type BlockEntry = readonly [index: number, digest: string];

/**
 * One backup, complete on its own: restore needs this record and the blocks it names, not
 * the backups before it. A block index not listed reads as zeros (never written, or
 * unallocated). Entries are sorted by index: the record is a plain list, about 75 bytes
 * per 2 MiB of data, instead of one entry per block of the whole volume.
 */
export interface Manifest {
  format: typeof MANIFEST_FORMAT;
  id: string;
  volume: string;
  /** The pool snapshot the blocks were read from. */
  snapshot: string;
  createdAt: string;
  sizeBytes: number;
  blockSizeBytes: number;
  compression: typeof COMPRESSION;
  /** The volume's filesystem: a restored volume gets it. Absent in records of a backup library used on its own. */
  fs?: "ext4" | "xfs";
  /** The backup this one was made incrementally to: for information only. */
  previous?: string;
  blocks: BlockEntry[];
}

export { BACKUP_ID_PATTERN };

export function newBackupId(now: Date): string {
  const stamp = now.toISOString().replace(/[-:.]/g, "");
  return `${stamp}-${randomBytes(4).toString("hex")}`;
}

export function manifestKey(volume: string, id: string): string {
  return `backups/${volume}/${id}.json`;
}

/** The volume and id a manifest key names, or undefined for any other key. */
export function parseManifestKey(key: string): { volume: string; id: string } | undefined {
  const m = /^backups\/([^/]+)\/([^/]+)\.json$/.exec(key);
  if (!m || !VOLUME_NAME_PATTERN.test(m[1] ?? "") || !BACKUP_ID_PATTERN.test(m[2] ?? "")) return undefined;
  return { volume: m[1] as string, id: m[2] as string };
}

const Index = v.pipe(v.number(), v.safeInteger("a block index must be an integer"), v.minValue(0, "a block index must not be negative"));
const Digest = v.pipe(v.string(), v.regex(DIGEST_PATTERN, (i) => `${quote(String(i.input), 80)} is not a SHA-256 digest (64 lowercase hex digits)`));

const ManifestSchema = v.object({
  format: v.literal(MANIFEST_FORMAT),
  id: v.pipe(v.string(), v.regex(BACKUP_ID_PATTERN, "invalid backup id")),
  volume: v.pipe(v.string(), v.regex(VOLUME_NAME_PATTERN, "invalid volume name")),
  snapshot: v.pipe(v.string(), v.regex(VOLUME_NAME_PATTERN, "invalid snapshot name")),
  createdAt: v.pipe(v.string(), v.isoTimestamp("createdAt is not a timestamp")),
  sizeBytes: v.pipe(
    v.number(),
    v.safeInteger("sizeBytes must be an integer"),
    v.minValue(SECTOR_BYTES, "sizeBytes is too small"),
    v.check((n) => n % SECTOR_BYTES === 0, "sizeBytes must be a multiple of 512"),
  ),
  blockSizeBytes: v.pipe(
    v.number(),
    v.safeInteger(),
    v.minValue(MIN_BLOCK_SIZE_BYTES),
    v.maxValue(MAX_BLOCK_SIZE_BYTES),
    v.check((n) => (n & (n - 1)) === 0, "blockSizeBytes must be a power of two"),
  ),
  compression: v.literal(COMPRESSION),
  fs: v.optional(v.picklist(["ext4", "xfs"], "fs must be ext4 or xfs")),
  previous: v.optional(v.pipe(v.string(), v.regex(BACKUP_ID_PATTERN, "invalid previous backup id"))),
  blocks: v.array(v.tuple([Index, Digest])),
});

/** What the record is expected to be, from where it was found: a record filed under another name is refused. */
export interface ManifestWhere {
  volume: string;
  id: string;
}

/**
 * Parses a stored record, refusing anything this version cannot restore exactly: another
 * format, a malformed digest, an index past the volume's end, indices out of order.
 */
export function parseManifest(data: Uint8Array | string, where: ManifestWhere): Manifest {
  const what = `backup ${quote(where.id)} of volume ${quote(where.volume)}`;
  const refuse = (why: string, cause?: unknown): never => {
    throw new BackupDamagedError(`${what} has an invalid record: ${why}`, { cause });
  };
  let raw: unknown;
  try {
    raw = JSON.parse(typeof data === "string" ? data : Buffer.from(data).toString("utf8"));
  } catch (err) {
    return refuse("it is not JSON", err);
  }
  // The version first: a newer record deserves "upgrade", not a list of fields it does not match.
  const format = typeof raw === "object" && raw !== null ? (raw as { format?: unknown }).format : undefined;
  if (format !== MANIFEST_FORMAT) {
    const shown = typeof format === "number" ? String(format) : quote(String(format), 20);
    throw new BackupDamagedError(`${what} has record format ${shown}; this thinvol reads format ${MANIFEST_FORMAT} only (a newer thinvol may read it)`);
  }
  const result = v.safeParse(ManifestSchema, raw);
  if (!result.success) {
    const issue = result.issues[0];
    const path = issue?.path?.map((p) => String(p.key)).join(".") ?? "";
    return refuse(`${path ? `${path}: ` : ""}${issue?.message ?? "invalid"}`);
  }
  const m = result.output;
  if (m.volume !== where.volume || m.id !== where.id) refuse(`it is filed as ${what} but says backup ${quote(m.id)} of volume ${quote(m.volume)}`);
  const count = blockCount(m.sizeBytes, m.blockSizeBytes);
  let last = -1;
  for (const [i, [index]] of m.blocks.entries()) {
    if (index >= count) refuse(`blocks.${i}: index ${index} is past the volume's end (${count} blocks of ${m.blockSizeBytes} bytes)`);
    if (index <= last) refuse(`blocks.${i}: index ${index} is not after ${last} (indices must be sorted and unique)`);
    last = index;
  }
  const { previous, fs, ...rest } = m;
  return { ...rest, ...(fs !== undefined ? { fs } : {}), ...(previous !== undefined ? { previous } : {}) };
}

export function serializeManifest(m: Manifest): string {
  return JSON.stringify(m);
}

/** Reads one backup's record; NotFoundError when there is none. */
export async function readManifest(store: BackupStore, volume: string, id: string): Promise<Manifest> {
  const data = await store.get(manifestKey(volume, id));
  if (data === undefined) throw new NotFoundError(`backup ${quote(id)} of volume ${quote(volume)} is not at ${store.url}`);
  return parseManifest(data, { volume, id });
}

/** The backups at the target (of one volume, or all), oldest first, without reading them. */
export async function listBackups(store: BackupStore, volume?: string): Promise<ManifestWhere[]> {
  const keys = await store.list(volume === undefined ? "backups/" : `backups/${volume}/`);
  const found = keys.map(parseManifestKey).filter((k): k is ManifestWhere => k !== undefined);
  return found.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : a.volume < b.volume ? -1 : 1));
}

/** A backup found by its id alone (ids are unique at a target). */
export async function findManifest(store: BackupStore, id: string): Promise<Manifest> {
  if (typeof id !== "string" || !BACKUP_ID_PATTERN.test(id)) throw new InvalidRequestError(`invalid backup id ${quote(String(id), 80)}: thinvol backup ls shows the ids`);
  const found = (await listBackups(store)).find((b) => b.id === id);
  if (!found) throw new NotFoundError(`backup ${quote(id)} is not at ${store.url} (thinvol backup ls --to ${store.url} shows what is there)`);
  return readManifest(store, found.volume, found.id);
}
