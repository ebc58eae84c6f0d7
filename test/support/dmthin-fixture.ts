import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createLogger } from "../../src/log.js";
import { DmThinPool, type DmThinOptions } from "../../src/pool/dmthin/index.js";
import { FakeDmKernel } from "./fake-dm-kernel.js";

export const MiB = 1024 ** 2;
export const GiB = 1024 ** 3;
/** The default block size: 128 sectors. */
export const BLOCK = 64 * 1024;

const dirs: string[] = [];

/** Removes every directory the fixtures made (call from an `after` hook). */
export async function cleanupFixtures(): Promise<void> {
  await Promise.all(dirs.splice(0).map((d) => rm(d, { recursive: true, force: true })));
}

export interface StateOnDisk {
  transactionId: number;
  blockSizeSectors: number;
  dataSizeBytes: number;
  metaSizeBytes: number;
  volumes: Record<string, { id: number; sizeBytes: number; allocatedBytes?: number }>;
  /** By `VOLUME@SNAPSHOT`. */
  snapshots?: Record<string, { id: number; sizeBytes: number; allocatedBytes?: number }>;
  pending?: { op: string; name: string };
  maxDataBytes?: number;
}

export class DmThinFixture {
  readonly logs: string[] = [];
  readonly log = createLogger("debug", (l) => this.logs.push(l));
  pool: DmThinPool;

  constructor(
    readonly dir: string,
    readonly kernel: FakeDmKernel,
    private readonly defaults: Partial<DmThinOptions>,
  ) {
    this.pool = this.newPool();
  }

  get metaFile(): string {
    return join(this.dir, "meta.img");
  }

  get dataFile(): string {
    return join(this.dir, "data.img");
  }

  /** The disk the pool keeps its data on (POOL_DEVICE), if it has one. */
  get disk(): string | undefined {
    return this.defaults.dataDevice;
  }

  /** A fresh driver on the same directory and kernel, as after a plugin restart. */
  newPool(opts: Partial<DmThinOptions> = {}): DmThinPool {
    // No timer: tests call growIfNeeded() where the timer would have run.
    this.pool = new DmThinPool({ runner: this.kernel.runner, dir: this.dir, dataSizeBytes: GiB, log: this.log, host: this.kernel.hostSpace, growthIntervalMs: 0, ...this.defaults, ...opts });
    return this.pool;
  }

  async reopen(opts: Partial<DmThinOptions> = {}): Promise<DmThinPool> {
    const pool = this.newPool(opts);
    await pool.open();
    return pool;
  }

  async state(): Promise<StateOnDisk> {
    return JSON.parse(await readFile(join(this.dir, "dmthin-state.json"), "utf8")) as StateOnDisk;
  }

  /** Thin ids the pool's metadata holds, and the ids the state file knows (volumes and snapshots): equal when nothing leaked or got lost. */
  async ids(): Promise<{ kernel: number[]; state: number[] }> {
    const s = await this.state();
    return {
      kernel: this.kernel.thinIds(this.metaFile),
      state: [...Object.values(s.volumes), ...Object.values(s.snapshots ?? {})].map((v) => v.id).sort((a, b) => a - b),
    };
  }

  /** The data blocks a volume (or `VOLUME@SNAPSHOT`) maps, by the thin id the state file records: equal lists are the same data. */
  async blocksOf(name: string): Promise<number[]> {
    const s = await this.state();
    const rec = name.includes("@") ? s.snapshots?.[name] : s.volumes[name];
    if (!rec) throw new Error(`the state file has no ${name}`);
    return this.kernel.mappedDataBlocks(this.metaFile, rec.id);
  }

  /** Commands run since `from` (an index into kernel.log). */
  commandsSince(from: number): string[] {
    return this.kernel.log.slice(from);
  }
}

/** Where a pool keeps its data: data.img (the default), or a simulated disk (POOL_DEVICE) of this size, holding what blkid would find. */
export type Backing = { disk: number; signature?: Record<string, string> } | "file";

export async function dmThinFixture(opts: Partial<DmThinOptions> & { open?: boolean; kernel?: FakeDmKernel; backing?: Backing } = {}): Promise<DmThinFixture> {
  const dir = await mkdtemp(join(tmpdir(), "thinvol-dmthin-"));
  dirs.push(dir);
  const { open = true, kernel = new FakeDmKernel(), backing = "file", ...defaults } = opts;
  if (backing !== "file") {
    const disk = kernel.addDisk(join(dir, "disk"), backing.disk, backing.signature);
    Object.assign(defaults, { dataDevice: disk, blockDevices: kernel.blockDevices });
  }
  const f = new DmThinFixture(join(dir, "pool"), kernel, defaults);
  if (open) await f.pool.open();
  return f;
}
