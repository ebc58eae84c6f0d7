import * as v from "valibot";
import { quote } from "./errors.js";
import { parseSize } from "./size.js";

const sizeSetting = (name: string) =>
  v.pipe(
    v.string(),
    v.transform((s) => parseSize(s)),
    v.number(`${name} must be a size such as 512M, 20G or 1T`),
    v.minValue(1, `${name} must be larger than 0`),
  );

/** PATH_MAX: longer is no path the kernel would open. */
const MAX_PATH_LENGTH = 4096;

function absolutePathOrEmpty(name: string) {
  return v.pipe(
    v.string(),
    v.check((s) => s === "" || s.startsWith("/"), `${name} must be an absolute path`),
    v.maxLength(MAX_PATH_LENGTH, `${name} must be at most ${MAX_PATH_LENGTH} characters`),
    v.regex(/^[^\x00-\x1f\x7f]*$/, `${name} must not contain control characters`),
  );
}
const SettingsFields = v.object({
  SOCKET_PATH: v.optional(v.pipe(v.string(), v.startsWith("/", "SOCKET_PATH must be an absolute path")), "/run/docker/plugins/thinvol.sock"),
  STATE_DIR: v.optional(v.pipe(v.string(), v.startsWith("/", "STATE_DIR must be an absolute path")), "/var/lib/thinvol"),
  MOUNT_DIR: v.optional(v.pipe(v.string(), v.startsWith("/", "MOUNT_DIR must be an absolute path")), "/mnt/thinvol"),
  POOL_DRIVER: v.optional(v.picklist(["auto", "dm-thin", "loop"], "POOL_DRIVER must be auto, dm-thin or loop"), "auto"),
  POOL_SIZE: v.optional(sizeSetting("POOL_SIZE"), "100G"),
  POOL_DEVICE: v.optional(
    v.pipe(
      v.string(),
      // Empty is the default: the pool's data stays in a file.
      v.check((s) => s === "" || s.startsWith("/"), "POOL_DEVICE must be an absolute path to a block device, such as /dev/disk/by-id/..."),
      v.maxLength(MAX_PATH_LENGTH, `POOL_DEVICE must be at most ${MAX_PATH_LENGTH} characters`),
      v.regex(/^[^\x00-\x1f\x7f]*$/, "POOL_DEVICE must not contain control characters"),
    ),
    "",
  ),
  DEFAULT_SIZE: v.optional(sizeSetting("DEFAULT_SIZE"), "10G"),
  DEFAULT_FS: v.optional(v.picklist(["ext4", "xfs"], "DEFAULT_FS must be ext4 or xfs"), "ext4"),
  MIN_FREE_SPACE: v.optional(
    v.pipe(
      v.string(),
      v.transform((s) => (/^\d+(\.\d+)?%?$/.test(s.trim()) ? Number.parseFloat(s) : Number.NaN)),
      v.number("MIN_FREE_SPACE must be a percentage from 0 to 100"),
      v.minValue(0, "MIN_FREE_SPACE must be a percentage from 0 to 100"),
      v.maxValue(100, "MIN_FREE_SPACE must be a percentage from 0 to 100"),
    ),
    "10",
  ),
  LOG_LEVEL: v.optional(v.picklist(["debug", "info", "warn", "error"], "LOG_LEVEL must be debug, info, warn or error"), "info"),
  /**
   * Where the `backups` mount is inside the plugin. Empty (outside the plugin): a
   * `file:///path` backup target is that path as it stands.
   */
  BACKUPS_DIR: v.optional(absolutePathOrEmpty("BACKUPS_DIR"), ""),
  /**
   * The host directory behind BACKUPS_DIR (what `docker plugin set thinvol backups.source=`
   * named). Empty: found from the mount table, which knows it when the directory is not
   * itself the root of a filesystem.
   */
  BACKUPS_SOURCE: v.optional(absolutePathOrEmpty("BACKUPS_SOURCE"), ""),
});

/** A data device is a dm-thin pool's: the loop driver keeps its pool in a file. */
const SettingsSchema = v.pipe(
  SettingsFields,
  v.forward(
    v.check((s) => s.POOL_DEVICE === "" || s.POOL_DRIVER !== "loop", "POOL_DEVICE needs the dm-thin driver: set POOL_DRIVER=dm-thin or auto, or unset POOL_DEVICE"),
    ["POOL_DEVICE"],
  ),
);

export type Settings = v.InferOutput<typeof SettingsSchema>;

export class SettingsError extends Error {
  override name = "SettingsError";
}

/** Empty values count as unset, so `docker plugin set thinvol POOL_SIZE=` restores the default. */
export function loadSettings(env: Readonly<Record<string, string | undefined>> = process.env): Settings {
  const picked: Record<string, string> = {};
  for (const key of Object.keys(SettingsFields.entries)) {
    const value = env[key];
    if (value !== undefined && value.trim() !== "") picked[key] = value.trim();
  }
  const result = v.safeParse(SettingsSchema, picked);
  if (!result.success) {
    const problems = result.issues.map((i) => {
      const key = i.path?.[0]?.key;
      return `${typeof key === "string" ? `${key}=${quote(picked[key] ?? "")}: ` : ""}${i.message}`;
    });
    throw new SettingsError(`invalid settings: ${problems.join("; ")}`);
  }
  return result.output;
}
