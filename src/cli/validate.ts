import * as v from "valibot";
import { quote } from "../errors.js";
import { parseSize } from "../size.js";
import { BACKUP_ID_PATTERN, SnapshotNameSchema, VolumeNameSchema } from "../volumes/options.js";

/** Validators for what the user types: each message names the argument and says what is allowed. */
export type ArgSchema = v.GenericSchema<string, string>;

/** The plugin's own name rules and messages, checked here before any request. */
export const VolumeName: ArgSchema = VolumeNameSchema;
/** Snapshot names follow the volume name rules (docs/admin-api.md). */
export const SnapshotName: ArgSchema = SnapshotNameSchema;

/**
 * A size as the API takes it (`20G`, `512M`, a number of bytes). Checked here so a typo
 * is a usage error before any request; sent on as typed, so the plugin's own messages
 * quote what the user wrote.
 */
export const Size: ArgSchema = v.pipe(
  v.string(),
  v.check(
    (s) => (parseSize(s) ?? 0) > 0,
    (i) => `invalid size ${quote(String(i.input))}: use a number larger than 0 with an optional unit, such as 512M, 20G or 1T`,
  ),
);

/**
 * A Docker plugin reference (`thinvol`, `user/thinvol:1.2`, `registry:5000/thinvol`).
 * It becomes part of an Engine API path, so characters that would change the path
 * (`?`, `#`, `%`, spaces) are refused.
 */
export const PluginName: ArgSchema = v.pipe(
  v.string(),
  v.regex(
    /^[a-zA-Z0-9][a-zA-Z0-9._\-/:@]{0,254}$/,
    (i) => `invalid plugin name ${quote(String(i.input))}: use a plugin reference such as thinvol or user/thinvol:1.0`,
  ),
  v.check((s) => !s.split("/").includes(".."), (i) => `invalid plugin name ${quote(String(i.input))}`),
);

/** `--to` / `--from`: a backup target. The plugin checks the rest (bucket names, the backups mount). */
export const BackupTarget: ArgSchema = v.pipe(
  v.string(),
  v.regex(/^(file:\/\/\/|s3:\/\/[^/\s])\S*$/, (i) => `invalid backup target ${quote(String(i.input))}: use file:///path (a directory on this host) or s3://bucket/prefix`),
  v.maxLength(1024, "a backup target is at most 1024 characters"),
);

/** A backup's id, as `thinvol backup ls` shows it. */
export const BackupId: ArgSchema = v.pipe(
  v.string(),
  v.regex(BACKUP_ID_PATTERN, (i) => `invalid backup id ${quote(String(i.input))}: ids look like 20261129T101500123Z-1a2b3c4d (thinvol backup ls shows them)`),
);

export const SocketPath: ArgSchema = v.pipe(v.string(), v.nonEmpty("--socket needs the path of the admin socket"));

/** The value, or the first problem's message. */
export function check(schema: ArgSchema, value: string): { ok: true; value: string } | { ok: false; message: string } {
  const result = v.safeParse(schema, value);
  return result.success ? { ok: true, value: result.output } : { ok: false, message: result.issues[0]?.message ?? `invalid value ${quote(value)}` };
}
