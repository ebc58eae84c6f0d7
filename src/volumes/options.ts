import * as v from "valibot";
import { InvalidRequestError, quote, quoteList } from "../errors.js";
import { formatSize, parseSize } from "../size.js";
import type { FsType } from "../system/filesystem.js";

/**
 * Docker's local driver allows `[a-zA-Z0-9][a-zA-Z0-9_.-]+`; thinvol also caps
 * the length so that a name always fits in a device-mapper name with its prefix.
 */
export const VOLUME_NAME_PATTERN = /^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,95}$/;

/** A name of `what` (a volume, a snapshot): a string matching VOLUME_NAME_PATTERN. */
function nameSchema(what: string) {
  return v.pipe(
    v.string(`the ${what} name must be a string`),
    v.regex(
      VOLUME_NAME_PATTERN,
      (issue) =>
        `invalid ${what} name ${quote(String(issue.input))}: use 1 to 96 letters, digits, '_', '.' or '-', starting with a letter or digit`,
    ),
  );
}

export const VolumeNameSchema = nameSchema("volume");

/** Snapshot names follow the volume name rules. */
export const SnapshotNameSchema = nameSchema("snapshot");

export function checkSnapshotName(name: unknown): string {
  return checkName(SnapshotNameSchema, name);
}

/** Validates a name (or any string a request names, such as a backup target) with `schema`; its first message becomes an InvalidRequestError. */
export function checkName(schema: v.GenericSchema<unknown, string>, name: unknown): string {
  const result = v.safeParse(schema, name);
  if (!result.success) throw new InvalidRequestError(result.issues[0]?.message ?? "invalid name");
  return result.output;
}

/**
 * Backup ids: sortable by time to the millisecond (a volume's backups list in the order they
 * were taken, even two in one second), unique without coordination, and valid key segments.
 */
export const BACKUP_ID_PATTERN = /^\d{8}T\d{9}Z-[0-9a-f]{8}$/;

/** `backup=URL#ID`: the target's URL, then the backup's id. */
const BACKUP_OPTION_PATTERN = /^((?:file|s3):\/\/[^#\s]+)#(\d{8}T\d{9}Z-[0-9a-f]{8})$/;

/** `from=VOLUME` or `from=VOLUME@SNAPSHOT`, each name as VOLUME_NAME_PATTERN has it. */
const NAME = VOLUME_NAME_PATTERN.source.slice(1, -1);
const FROM_PATTERN = new RegExp(`^(${NAME})(?:@(${NAME}))?$`);

export function checkVolumeName(name: unknown): string {
  return checkName(VolumeNameSchema, name);
}

export const ALLOWED_OPTIONS = ["size", "fs", "from", "backup", "uid", "gid", "mode", "mountopts"] as const;

/**
 * Every allowed value fits easily (all mount options together are about 100
 * characters); longer ones are refused before any parsing, so no pattern ever
 * runs over megabytes of input.
 */
export const MAX_OPTION_VALUE_CHARS = 256;

/** Mount options a volume may ask for: none of them can reach outside the volume. */
export const ALLOWED_MOUNT_OPTIONS = [
  "noatime",
  "relatime",
  "strictatime",
  "nodiratime",
  "lazytime",
  "discard",
  "nodiscard",
  "nosuid",
  "nodev",
  "noexec",
  "sync",
  "dirsync",
  "ro",
] as const;

/** ext4 needs a few MiB for its journal; xfs refuses filesystems under 300 MiB. */
export const MIN_SIZE: Record<FsType, number> = { ext4: 16 * 1024 ** 2, xfs: 300 * 1024 ** 2 };
export const MAX_SIZE = 64 * 1024 ** 4;

export interface CreateOptions {
  /** Absent for a clone: a clone has its origin's size. */
  sizeBytes?: number;
  fs?: FsType;
  from?: string;
  /** With `from=VOLUME@SNAPSHOT`: the volume's snapshot to copy. */
  fromSnapshot?: string;
  /** `backup=URL#ID`: restore that backup into the new volume. */
  backup?: { url: string; id: string };
  uid?: number;
  gid?: number;
  mode?: number;
  mountOptions: string[];
}

const idSchema = (what: string) =>
  v.pipe(
    v.string(`${what} must be a string`),
    v.regex(/^\d{1,10}$/, `${what} must be a whole number from 0 to 4294967294`),
    v.transform(Number),
    v.maxValue(4294967294, `${what} must be a whole number from 0 to 4294967294`),
  );

// Unknown keys are refused before this schema runs, with the list of allowed ones.
const OptionsSchema = v.object(
  {
    size: v.optional(
      v.pipe(
        v.string(),
        v.rawTransform(({ dataset, addIssue, NEVER }) => {
          const bytes = parseSize(dataset.value);
          if (bytes === undefined) {
            addIssue({ message: `size ${quote(dataset.value)} is not a size: use a number with an optional unit, such as 64M, 20G or 1T` });
            return NEVER;
          }
          return bytes;
        }),
        v.maxValue(MAX_SIZE, `size must be at most ${formatSize(MAX_SIZE)}`),
      ),
    ),
    fs: v.optional(v.picklist(["ext4", "xfs"], (i) => `fs ${quote(String(i.input))} is not supported: use ext4 or xfs`)),
    from: v.optional(
      v.pipe(
        v.string(),
        v.regex(FROM_PATTERN, (i) => `from ${quote(String(i.input))} is not a valid volume name, nor VOLUME@SNAPSHOT`),
      ),
    ),
    backup: v.optional(
      v.pipe(
        v.string(),
        v.regex(BACKUP_OPTION_PATTERN, (i) => `backup ${quote(String(i.input))} is not URL#ID, such as s3://bucket/prefix#20261129T101500123Z-1a2b3c4d or file:///mnt/backup#ID (thinvol backup ls shows the ids)`),
      ),
    ),
    uid: v.optional(idSchema("uid")),
    gid: v.optional(idSchema("gid")),
    mode: v.optional(
      v.pipe(
        v.string(),
        v.regex(/^0?[0-7]{3,4}$/, (i) => `mode ${quote(String(i.input))} must be octal permissions such as 755, 0700 or 1777`),
        v.transform((s) => Number.parseInt(s, 8)),
      ),
    ),
    mountopts: v.optional(
      v.pipe(
        v.string(),
        // Duplicates are harmless to mount(8) but would be stored and passed on every mount.
        v.transform((s) => [...new Set(s.split(",").map((o) => o.trim()).filter((o) => o !== ""))]),
        v.check(
          (list) => list.every((o) => (ALLOWED_MOUNT_OPTIONS as readonly string[]).includes(o)),
          (i) => {
            const bad = (i.input as string[]).filter((o) => !(ALLOWED_MOUNT_OPTIONS as readonly string[]).includes(o));
            return `mount option ${quoteList(bad)} is not allowed: allowed are ${ALLOWED_MOUNT_OPTIONS.join(", ")}`;
          },
        ),
      ),
    ),
  },
);

/**
 * Validates `docker volume create -o` options. Every problem is reported at
 * once, each naming the option, before anything is created.
 */
export function parseCreateOptions(volume: string, raw: Readonly<Record<string, string>> | null | undefined): CreateOptions {
  const input = raw ?? {};
  const what = `cannot create volume ${quote(volume)}`;
  // Own keys, `__proto__` and `constructor` included: an option nobody reads must be refused, not dropped.
  const unknown = Object.keys(input).filter((k) => !(ALLOWED_OPTIONS as readonly string[]).includes(k));
  if (unknown.length > 0) {
    throw new InvalidRequestError(`${what}: unknown option ${quoteList(unknown)}; allowed options are ${ALLOWED_OPTIONS.join(", ")}`);
  }
  const problems: string[] = [];
  for (const [key, value] of Object.entries(input)) {
    if (typeof value !== "string") problems.push(`option ${key} must be a string`);
    else if (value.length > MAX_OPTION_VALUE_CHARS) problems.push(`option ${key} is ${value.length} characters long; the most is ${MAX_OPTION_VALUE_CHARS}`);
  }
  if (problems.length > 0) throw new InvalidRequestError(`${what}: ${problems.join("; ")}`);
  const result = v.safeParse(OptionsSchema, input);
  if (!result.success) {
    throw new InvalidRequestError(`${what}: ${result.issues.map((i) => i.message).join("; ")}`);
  }
  const o = result.output;
  const options: CreateOptions = { mountOptions: o.mountopts ?? [] };
  if (o.size !== undefined) options.sizeBytes = o.size;
  if (o.fs !== undefined) options.fs = o.fs;
  if (o.from !== undefined) {
    const [, from, snapshot] = FROM_PATTERN.exec(o.from) ?? [];
    if (from !== undefined) options.from = from;
    if (snapshot !== undefined) options.fromSnapshot = snapshot;
  }
  if (o.backup !== undefined) {
    const [, url = "", id = ""] = BACKUP_OPTION_PATTERN.exec(o.backup) ?? [];
    options.backup = { url, id };
    const conflicting = (["from", "size", "fs"] as const).filter((k) => o[k] !== undefined);
    if (conflicting.length > 0) {
      throw new InvalidRequestError(`${what}: a volume restored from a backup has the backup's size and filesystem; leave out ${conflicting.join(" and ")} (grow it afterwards with thinvol resize)`);
    }
  }
  if (o.uid !== undefined) options.uid = o.uid;
  if (o.gid !== undefined) options.gid = o.gid;
  if (o.mode !== undefined) options.mode = o.mode;
  if (options.from === volume && options.fromSnapshot === undefined) {
    throw new InvalidRequestError(`${what}: a volume cannot be a clone of itself`);
  }
  return options;
}

/** Checks a size against the filesystem's limits; returns it rounded up to whole 4 KiB blocks. */
export function checkSize(volume: string, sizeBytes: number, fs: FsType, what = "create"): number {
  if (sizeBytes < MIN_SIZE[fs]) {
    throw new InvalidRequestError(
      `cannot ${what} volume ${quote(volume)}: size ${formatSize(sizeBytes)} is too small for ${fs}; the minimum is ${formatSize(MIN_SIZE[fs])}`,
    );
  }
  if (sizeBytes > MAX_SIZE) {
    throw new InvalidRequestError(`cannot ${what} volume ${quote(volume)}: size ${formatSize(sizeBytes)} is over the maximum of ${formatSize(MAX_SIZE)}`);
  }
  return Math.ceil(sizeBytes / 4096) * 4096;
}
