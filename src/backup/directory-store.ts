import { randomBytes } from "node:crypto";
import { mkdir, readdir, readFile, rm, stat } from "node:fs/promises";
import { dirname, join, relative, resolve, sep } from "node:path";
import { fsyncPath, writeFileAtomic } from "../system/atomic-file.js";
import { checkKey, checkPrefix, type BackupStore } from "./store.js";

/** Temporary names start with "." so that no key (see checkKey) can name one, and list() skips them. */
const TEMP_PREFIX = ".";

/**
 * A store in a local directory (or a mounted NFS share): one file per key. A put writes a
 * temporary file, fsyncs it, renames it over the key and fsyncs the directory, so a crash
 * leaves the old object or the new one, and an object that exists is whole.
 */
export class DirectoryStore implements BackupStore {
  readonly root: string;

  constructor(root: string, readonly url = `file://${root}`) {
    this.root = resolve(root);
  }

  /** The file for a key; checkKey already rules out `..`, and the check here makes sure of it. */
  private pathOf(segments: readonly string[]): string {
    const path = join(this.root, ...segments);
    if (path !== this.root && !path.startsWith(this.root + sep)) throw new Error(`key escapes ${this.root}: ${segments.join("/")}`);
    return path;
  }

  async put(key: string, data: Uint8Array): Promise<void> {
    const path = this.pathOf(checkKey(key));
    const dir = dirname(path);
    const created = await mkdir(dir, { recursive: true });
    await writeFileAtomic(path, data, join(dir, `${TEMP_PREFIX}${randomBytes(6).toString("hex")}.tmp`));
    // New directories must be durable too, or a crash could lose the entry of a stored block.
    if (created !== undefined) for (let d = dirname(dir); d.length >= dirname(created).length && d !== dirname(d); d = dirname(d)) await fsyncPath(d);
  }

  async get(key: string): Promise<Uint8Array | undefined> {
    try {
      return await readFile(this.pathOf(checkKey(key)));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw err;
    }
  }

  async has(key: string): Promise<boolean> {
    try {
      return (await stat(this.pathOf(checkKey(key)))).isFile();
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return false;
      throw err;
    }
  }

  async list(prefix: string): Promise<string[]> {
    const base = this.pathOf(checkPrefix(prefix));
    let entries;
    try {
      entries = await readdir(base, { recursive: true, withFileTypes: true });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
      throw err;
    }
    const keys: string[] = [];
    for (const e of entries) {
      if (!e.isFile() || e.name.startsWith(TEMP_PREFIX)) continue;
      keys.push(relative(this.root, join(e.parentPath, e.name)).split(sep).join("/"));
    }
    return keys.sort();
  }

  async removeLeftovers(): Promise<number> {
    let removed = 0;
    let entries;
    try {
      entries = await readdir(this.root, { recursive: true, withFileTypes: true });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return 0;
      throw err;
    }
    for (const e of entries) {
      if (!e.isFile() || !e.name.startsWith(TEMP_PREFIX) || !e.name.endsWith(".tmp")) continue;
      await rm(join(e.parentPath, e.name), { force: true });
      removed++;
    }
    return removed;
  }

  async delete(key: string): Promise<void> {
    const path = this.pathOf(checkKey(key));
    await rm(path, { force: true });
    await fsyncPath(dirname(path)).catch((err: NodeJS.ErrnoException) => {
      if (err.code !== "ENOENT") throw err;
    });
  }
}
