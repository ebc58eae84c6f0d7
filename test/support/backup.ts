import { createHash, randomBytes } from "node:crypto";
import { mkdtemp, open, readFile, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { BackupStore } from "../../src/backup/store.js";

export async function withTempDir<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), "thinvol-backup-"));
  try {
    return await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** A sparse file of `sizeBytes` standing in for a volume's device, with `blocks` (index → data) written in. */
export async function makeDevice(path: string, sizeBytes: number, blockSize: number, blocks: ReadonlyMap<number, Buffer>): Promise<void> {
  const handle = await open(path, "w");
  try {
    await handle.truncate(sizeBytes);
    for (const [index, data] of blocks) await handle.write(data, 0, data.byteLength, index * blockSize);
  } finally {
    await handle.close();
  }
}

/** Writes `data` at block `index` of an existing device file. */
export async function writeBlock(path: string, blockSize: number, index: number, data: Buffer): Promise<void> {
  const handle = await open(path, "r+");
  try {
    await handle.write(data, 0, data.byteLength, index * blockSize);
  } finally {
    await handle.close();
  }
}

/** Data that is unique, not all zeros, and compresses about as well as real data (half random). */
export function blockData(size: number): Buffer {
  const data = Buffer.alloc(size, 0x61);
  randomBytes(size / 2).copy(data);
  return data;
}

export async function sha256File(path: string): Promise<string> {
  return createHash("sha256").update(await readFile(path)).digest("hex");
}

/** Bytes the file really takes on disk. */
export async function allocatedBytes(path: string): Promise<number> {
  return (await stat(path)).blocks * 512;
}

/**
 * A store in front of another that counts block uploads and can fail or pause on one: for
 * interrupted and concurrent backups.
 */
export class ScriptedStore implements BackupStore {
  blockPuts = 0;
  /** Throw on block upload number `failAt` (1-based). */
  failAt: number | undefined;
  /** Hold block upload number `pauseAt` until `resume()`; `paused` resolves when it is held. */
  pauseAt: number | undefined;
  private release: (() => void) | undefined;
  private reached: (() => void) | undefined;
  readonly paused = new Promise<void>((r) => (this.reached = r));

  constructor(readonly inner: BackupStore) {}

  get url(): string {
    return this.inner.url;
  }

  resume(): void {
    this.release?.();
  }

  async put(key: string, data: Uint8Array): Promise<void> {
    if (key.startsWith("blocks/")) {
      const n = ++this.blockPuts;
      if (n === this.failAt) throw new Error("connection reset by peer");
      if (n === this.pauseAt) {
        const gate = new Promise<void>((r) => (this.release = r));
        this.reached?.();
        await gate;
      }
    }
    await this.inner.put(key, data);
  }

  get(key: string): Promise<Uint8Array | undefined> {
    return this.inner.get(key);
  }
  has(key: string): Promise<boolean> {
    return this.inner.has(key);
  }
  list(prefix: string): Promise<string[]> {
    return this.inner.list(prefix);
  }
  delete(key: string): Promise<void> {
    return this.inner.delete(key);
  }
}
