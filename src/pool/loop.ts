import { mkdir, open, readdir, rm, stat, statfs } from "node:fs/promises";
import { join } from "node:path";
import * as v from "valibot";
import { ConflictError, ThinvolError, errorMessage } from "../errors.js";
import type { Logger } from "../log.js";
import { formatSize } from "../size.js";
import { readJsonFile, writeFileAtomic } from "../system/atomic-file.js";
import { freezeFilesystem, thawFilesystem } from "../system/filesystem.js";
import { attachOrReuseLoop, detachLoop, detachLoopsOf, loopsOf, refreshLoopSize } from "../system/losetup.js";
import { mountDevice, readMounts, unmount } from "../system/mount.js";
import type { Runner } from "../system/runner.js";
import type { CloneOptions, Pool, PoolUsage } from "./types.js";

export interface LoopPoolOptions {
  runner: Runner;
  /** A directory the driver owns: the pool file, its state and its mount point. */
  dir: string;
  dataSizeBytes: number;
  log: Logger;
}

const StateSchema = v.object({ version: v.literal(1), sizeBytes: v.number() });

const IMAGE_SUFFIX = ".img";
/** Well inside Docker's one-minute limit for Unmount and Remove. */
const DETACH_WAIT_MS = 20_000;

/**
 * For kernels without dm-thin: one sparse file formatted XFS with reflink,
 * mounted privately; each volume is a sparse image in it on its own loop
 * device. A clone is a reflink copy, so it shares every block until written.
 */
export class LoopPool implements Pool {
  readonly driver = "loop" as const;
  private readonly poolFile: string;
  private readonly stateFile: string;
  private readonly mnt: string;
  private readonly volumesDir: string;

  constructor(private readonly o: LoopPoolOptions) {
    this.poolFile = join(o.dir, "pool.img");
    this.stateFile = join(o.dir, "pool.json");
    this.mnt = join(o.dir, "mnt");
    this.volumesDir = join(this.mnt, "volumes");
  }

  private image(name: string): string {
    return join(this.volumesDir, name + IMAGE_SUFFIX);
  }

  async open(): Promise<void> {
    const { runner, log } = this.o;
    await mkdir(this.mnt, { recursive: true, mode: 0o700 });
    const raw = await readJsonFile(this.stateFile);
    const state = raw === undefined ? undefined : v.parse(StateSchema, raw);
    if (state === undefined) {
      // No state means the pool was never formatted completely: whatever is there holds no volume.
      log.info("creating the loop pool", { file: this.poolFile, size: formatSize(this.o.dataSizeBytes) });
      await this.ensureSparseFile(this.poolFile, this.o.dataSizeBytes);
      const dev = await this.poolDevice();
      await runner.run("mkfs.xfs", ["-q", "-f", "-K", "-m", "reflink=1", "-L", "thinvol-pool", dev], { timeoutMs: 120_000 });
      await writeFileAtomic(this.stateFile, JSON.stringify({ version: 1, sizeBytes: this.o.dataSizeBytes }) + "\n");
    }
    const dev = await this.poolDevice();
    if (!(await this.isPoolMounted())) {
      // discard: deleting an image punches holes in the pool file, so the host gets the space back.
      await mountDevice(runner, dev, this.mnt, "xfs", ["discard", "noatime"]);
    }
    await mkdir(this.volumesDir, { recursive: true, mode: 0o700 });
    if (state !== undefined && this.o.dataSizeBytes > state.sizeBytes) await this.grow(dev, state.sizeBytes);
    else if (state !== undefined && this.o.dataSizeBytes < state.sizeBytes) {
      log.warn("POOL_SIZE is smaller than the pool; a pool never shrinks", { pool: formatSize(state.sizeBytes), setting: formatSize(this.o.dataSizeBytes) });
    }
    log.info("loop pool ready", { file: this.poolFile, device: dev });
  }

  private async grow(dev: string, from: number): Promise<void> {
    this.o.log.info("growing the loop pool", { from: formatSize(from), to: formatSize(this.o.dataSizeBytes) });
    await this.ensureSparseFile(this.poolFile, this.o.dataSizeBytes);
    await refreshLoopSize(this.o.runner, dev);
    await this.o.runner.run("xfs_growfs", [this.mnt]);
    await writeFileAtomic(this.stateFile, JSON.stringify({ version: 1, sizeBytes: this.o.dataSizeBytes }) + "\n");
  }

  private async ensureSparseFile(path: string, sizeBytes: number): Promise<void> {
    const handle = await open(path, "a");
    try {
      const { size } = await handle.stat();
      if (size < sizeBytes) await handle.truncate(sizeBytes);
      await handle.sync();
    } finally {
      await handle.close();
    }
  }

  /** The pool file's loop device, reusing one that is still attached after a restart. */
  private poolDevice(): Promise<string> {
    return attachOrReuseLoop(this.o.runner, this.poolFile, this.o.log);
  }

  private async isPoolMounted(): Promise<boolean> {
    return (await readMounts()).some((m) => m.mountPoint === this.mnt);
  }

  async close(): Promise<void> {
    // An idle pool is taken down, so a disabled or removed plugin leaves no device on the
    // host; the next open() sets it up again. Attached volumes keep it up.
    const images = (await this.list()).map((n) => this.image(n));
    for (const image of images) {
      if ((await loopsOf(this.o.runner, image)).length > 0) {
        this.o.log.info("loop pool left up: volumes are attached", { file: this.poolFile });
        return;
      }
    }
    if (await this.isPoolMounted()) await unmount(this.o.runner, this.mnt);
    for (const dev of await loopsOf(this.o.runner, this.poolFile)) await detachLoop(this.o.runner, dev);
    this.o.log.info("loop pool taken down: no volume is attached", { file: this.poolFile });
  }

  async list(): Promise<string[]> {
    const files = await readdir(this.volumesDir);
    return files.filter((f) => f.endsWith(IMAGE_SUFFIX)).map((f) => f.slice(0, -IMAGE_SUFFIX.length)).sort();
  }

  async create(name: string, sizeBytes: number): Promise<void> {
    let handle;
    try {
      handle = await open(this.image(name), "wx", 0o600);
    } catch (err) {
      throw new ThinvolError(`cannot create the image of volume "${name}": ${errorMessage(err)}`, { cause: err });
    }
    try {
      await handle.truncate(sizeBytes);
      await handle.sync();
    } finally {
      await handle.close();
    }
  }

  async clone(name: string, origin: string, options: CloneOptions = {}): Promise<void> {
    const source = this.image(origin);
    const target = this.image(name);
    // Claim the name first, so an existing volume is never overwritten.
    await this.create(name, 0);
    const frozen = options.originMountpoint;
    try {
      if (frozen !== undefined) await freezeFilesystem(this.o.runner, frozen);
    } catch (err) {
      await rm(target, { force: true });
      throw new ThinvolError(`cannot clone volume "${origin}" to "${name}": ${errorMessage(err)}`, { cause: err });
    }
    try {
      await this.o.runner.run("cp", ["--reflink=always", source, target]);
    } catch (err) {
      await rm(target, { force: true });
      throw new ThinvolError(`cannot clone volume "${origin}" to "${name}": ${errorMessage(err)}`, { cause: err });
    } finally {
      if (frozen !== undefined) await thawFilesystem(this.o.runner, frozen);
    }
  }

  async sizeOf(name: string): Promise<number> {
    return (await stat(this.image(name))).size;
  }

  activate(name: string): Promise<string> {
    return attachOrReuseLoop(this.o.runner, this.image(name), this.o.log);
  }

  async deactivate(name: string): Promise<void> {
    const image = this.image(name);
    try {
      await stat(image);
    } catch {
      return;
    }
    // Until the kernel lets go of the image, the image's space cannot be freed.
    if (!(await detachLoopsOf(this.o.runner, image, DETACH_WAIT_MS))) {
      throw new ConflictError(`the loop device of volume "${name}" is still busy ${DETACH_WAIT_MS / 1000} s after it was detached; try again`);
    }
  }

  async remove(name: string): Promise<void> {
    await this.deactivate(name);
    await rm(this.image(name), { force: true });
    // xfs frees a deleted file's blocks and discards them in the background; a sync and a trim
    // make the space show at once, in the pool and in the pool file on the host.
    await this.o.runner.run("sync", ["--file-system", this.mnt]);
    await this.o.runner.run("fstrim", [this.mnt]).catch((err: unknown) => {
      this.o.log.warn("could not trim the pool; the host gets the space back later", { error: errorMessage(err) });
    });
  }

  async usage(): Promise<PoolUsage> {
    const s = await statfs(this.mnt);
    return { driver: "loop", dataTotalBytes: s.blocks * s.bsize, dataUsedBytes: (s.blocks - s.bfree) * s.bsize };
  }

  async allocatedBytes(name: string): Promise<number> {
    return (await stat(this.image(name))).blocks * 512;
  }
}
