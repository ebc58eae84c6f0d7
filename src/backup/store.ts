import { fileURLToPath } from "node:url";
import { InvalidRequestError, quote } from "../errors.js";
import { DirectoryStore } from "./directory-store.js";
import type { StoreSettings } from "./s3-settings.js";
import { LazyS3Store } from "./s3-lazy.js";

/**
 * Where backups are kept: a flat space of objects named by keys such as
 * `blocks/ab/cd/<sha256>` or `backups/<volume>/<id>.json`. Only what an object store
 * (S3) offers too: whole-object put, get, existence, listing by prefix, delete. No
 * renames, appends or locks: DirectoryStore and S3Store both implement it as it stands.
 */
export interface BackupStore {
  /** The target as the user wrote it (`file:///srv/backups`), for messages. */
  readonly url: string;
  /** Stores `data` under `key`. Atomic: a reader sees the whole object or none, never a torn one. */
  put(key: string, data: Uint8Array): Promise<void>;
  /** The object's bytes, or undefined when there is none. */
  get(key: string): Promise<Uint8Array | undefined>;
  has(key: string): Promise<boolean>;
  /** Every key under `prefix` ("" or ending in "/"), at any depth, sorted. */
  list(prefix: string): Promise<string[]>;
  /** Removes the object. Absent is fine. */
  delete(key: string): Promise<void>;
  /**
   * Removes what writers that died left half-written (a directory's temporary files; S3 has
   * none: an upload is whole or absent). Called only while nothing else writes. Returns how many.
   */
  removeLeftovers?(): Promise<number>;
}

/**
 * One segment of a key: what volume names and backup ids allow, and sha256 digests. It
 * starts with a letter or digit, so neither `.` nor `..` nor a hidden temporary name can
 * be a segment: a key never leaves the store's directory nor names a file in flight.
 */
const SEGMENT = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;
const KEY_MAX_CHARS = 1024;

/** Whether `key` is segments joined by "/" (no leading, trailing or double "/"). */
export function isKey(key: string): boolean {
  return key.length <= KEY_MAX_CHARS && key.split("/").every((s) => SEGMENT.test(s));
}

/** Throws unless `key` is segments joined by "/" (no leading, trailing or double "/"). */
export function checkKey(key: string): string[] {
  const segments = key.split("/");
  if (!isKey(key)) {
    throw new InvalidRequestError(`invalid backup store key ${quote(key)}: use segments of letters, digits, '_', '.' or '-' joined by '/'`);
  }
  return segments;
}

/** Throws unless `prefix` is "" or a key followed by "/". */
export function checkPrefix(prefix: string): string[] {
  if (prefix === "") return [];
  if (!prefix.endsWith("/")) throw new InvalidRequestError(`invalid backup store prefix ${quote(prefix)}: it must end with '/'`);
  return checkKey(prefix.slice(0, -1));
}

/**
 * Opens the store a `--to` URL names: `file:///path` or `s3://bucket/prefix`. `settings.s3`
 * says how to reach S3 (see s3SettingsFromEnv); what it leaves out the AWS SDK looks up itself.
 */
export function openStore(url: string, settings: StoreSettings = {}): BackupStore {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch (err) {
    throw new InvalidRequestError(`invalid backup target ${quote(url)}: use file:///path or s3://bucket/prefix`, { cause: err });
  }
  if (parsed.protocol === "file:") {
    if (parsed.host !== "") throw new InvalidRequestError(`invalid backup target ${quote(url)}: a file URL has no host (file:///path)`);
    return new DirectoryStore(fileURLToPath(parsed), url);
  }
  if (parsed.protocol === "s3:") return new LazyS3Store(url, settings.s3 ?? {});
  throw new InvalidRequestError(`backup target ${quote(url)} is not supported: use file:///path or s3://bucket/prefix`);
}
