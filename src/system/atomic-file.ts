import { open, readFile, rename, rm } from "node:fs/promises";
import { basename, dirname, join } from "node:path";

/** Makes a file's data, or a directory's entries, durable. */
export async function fsyncPath(path: string): Promise<void> {
  const handle = await open(path, "r");
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/**
 * Replaces `path` with `data` so that a crash at any instant leaves either the
 * old file or the new one, never a torn or empty one: write a temporary file,
 * fsync it, rename it over the target, fsync the directory. `tmp` is the temporary
 * file's path, in the same directory.
 */
export async function writeFileAtomic(path: string, data: string | Uint8Array, tmp = join(dirname(path), `.${basename(path)}.${process.pid}.${Date.now()}.tmp`)): Promise<void> {
  const handle = await open(tmp, "w", 0o600);
  try {
    await handle.writeFile(data);
    await handle.sync();
  } finally {
    await handle.close();
  }
  try {
    await rename(tmp, path);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
  await fsyncPath(dirname(path));
}

/** Deletes `path` and makes the deletion durable. Absent is fine. */
export async function removeFileDurably(path: string): Promise<void> {
  await rm(path, { force: true });
  await fsyncPath(dirname(path));
}

/** Reads and parses a JSON file; undefined when it does not exist. */
export async function readJsonFile(path: string): Promise<unknown> {
  try {
    return JSON.parse(await readFile(path, "utf8")) as unknown;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw err;
  }
}
