import { readFile } from "node:fs/promises";
import { posix } from "node:path";
import { fileURLToPath } from "node:url";
import { InvalidRequestError, quote } from "../errors.js";
import { DirectoryStore } from "./directory-store.js";
import { openStore, type BackupStore } from "./store.js";

export interface BackupTargetOptions {
  /** Where the plugin's `backups` mount is; "" outside the plugin (file URLs are used as they are). */
  backupsDir: string;
  /** The host directory behind backupsDir; "" to find it in the mount table. */
  backupsSource: string;
  /** Opens any other URL (s3://): the store module's openStore by default. */
  openOther?: (url: string) => BackupStore;
  /** The text of /proc/self/mountinfo; tests substitute their own. */
  readMountInfo?: () => Promise<string>;
}

/** A path with `.`, `..` and doubled slashes resolved, and no trailing slash (but `/` itself). */
function cleanPath(path: string): string {
  return posix.normalize(path).replace(/(.)\/+$/, "$1");
}

/** Undoes the octal escapes (\040 for a space...) of /proc/self/mountinfo fields. */
function unescapeMountField(field: string): string {
  return field.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(Number.parseInt(octal, 8)));
}

/**
 * The mount at `mountPoint` in mountinfo text: its root, the directory of its filesystem
 * that the mount shows (for a bind mount of a host directory, that directory's path within
 * its filesystem). Undefined when nothing is mounted there.
 */
export function mountRootOf(mountInfo: string, mountPoint: string): string | undefined {
  let root: string | undefined;
  for (const line of mountInfo.split("\n")) {
    const fields = line.split(" ");
    // id parent major:minor root mountpoint ...; the last mount at a point is the one seen.
    if (fields.length > 4 && unescapeMountField(fields[4] ?? "") === mountPoint) root = unescapeMountField(fields[3] ?? "");
  }
  return root;
}

/**
 * Turns the `--to` / `--from` URL a user gives into a store. `file:///path` names a
 * directory on the host as the user sees it; inside the plugin only the host directory
 * behind the `backups` mount can be reached, so the path is mapped into that mount, and a
 * path outside it is refused with the command that points the mount there.
 */
export class BackupTargets {
  private source: string | undefined;
  /** Stores of other kinds (S3) keep a client with its connections: one per URL. */
  private readonly others = new Map<string, BackupStore>();

  constructor(private readonly o: BackupTargetOptions) {}

  async open(url: string): Promise<BackupStore> {
    if (typeof url !== "string" || url === "") throw new InvalidRequestError("a backup target is needed: file:///path or s3://bucket/prefix");
    if (url.length > 1024) throw new InvalidRequestError(`backup target ${quote(url)} is too long (at most 1024 characters)`);
    let parsed: URL;
    try {
      parsed = new URL(url);
    } catch (err) {
      throw new InvalidRequestError(`invalid backup target ${quote(url)}: use file:///path or s3://bucket/prefix`, { cause: err });
    }
    if (parsed.protocol !== "file:") {
      let store = this.others.get(url);
      if (!store) {
        store = (this.o.openOther ?? openStore)(url);
        this.others.set(url, store);
      }
      return store;
    }
    if (parsed.host !== "" || parsed.search !== "" || parsed.hash !== "") {
      throw new InvalidRequestError(`invalid backup target ${quote(url)}: a file URL is file:///path, with no host, query or fragment`);
    }
    const hostPath = cleanPath(fileURLToPath(parsed));
    if (/[\x00-\x1f\x7f]/.test(hostPath)) throw new InvalidRequestError(`invalid backup target ${quote(url)}: control characters in the path`);
    if (this.o.backupsDir === "") return new DirectoryStore(hostPath, url);
    const source = await this.hostSource();
    const inside = hostPath === source || source === "/" || hostPath.startsWith(`${source}/`);
    if (!inside) {
      throw new InvalidRequestError(
        `backup target ${quote(url)} is outside the host directory the plugin can reach (${source}); ` +
          `point the plugin's backups mount at it: docker plugin disable PLUGIN; docker plugin set PLUGIN backups.source=${hostPath} BACKUPS_SOURCE=${hostPath}; docker plugin enable PLUGIN`,
      );
    }
    return new DirectoryStore(posix.join(this.o.backupsDir, posix.relative(source, hostPath)), url);
  }

  /** The host directory behind the backups mount: the setting, or the mount's root in the mount table. */
  private async hostSource(): Promise<string> {
    if (this.source !== undefined) return this.source;
    if (this.o.backupsSource !== "") return (this.source = cleanPath(this.o.backupsSource));
    const text = await (this.o.readMountInfo ?? (() => readFile("/proc/self/mountinfo", "utf8")))();
    const root = mountRootOf(text, this.o.backupsDir);
    if (root === undefined) throw new InvalidRequestError(`file backup targets are unavailable: nothing is mounted at ${this.o.backupsDir} (BACKUPS_DIR) in the plugin`);
    if (root === "/") {
      // The mount shows a whole filesystem (a second disk, an NFS share): its host path is not in this mount table.
      throw new InvalidRequestError(
        `cannot tell which host directory the plugin's backups mount shows (it is the root of a filesystem): ` +
          `set BACKUPS_SOURCE to the same path as backups.source (docker plugin set PLUGIN BACKUPS_SOURCE=/that/path)`,
      );
    }
    return (this.source = root);
  }
}
