/**
 * The dm-thin driver's volume operations on a real kernel, at the Pool level: resize of a
 * mounted ext4 and xfs under a writer that never stops (the filesystem grown online here,
 * as the volume layer would), snapshots of a filesystem under write load, rollback byte for
 * byte, clones of snapshots, pool growth under a mounted volume, and a resize on a full pool.
 * Run as root inside the VM:
 *   npm run vm -- node --import tsx --test --test-reporter=spec test/vm/dmthin-ops.test.ts
 */
import assert from "node:assert/strict";
import { NoSpaceError } from "../../src/errors.js";
import { spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { mkdir, mkdtemp, open, readFile, readdir, rm, statfs } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { after, before, describe, test } from "node:test";
import { ConflictError } from "../../src/errors.js";
import { createLogger } from "../../src/log.js";
import { DmThinPool } from "../../src/pool/dmthin/index.js";
import { deviceSizeBytes } from "../../src/system/blockdev.js";
import { thinPoolStatus } from "../../src/system/dmsetup.js";
import { baseMountOptions, formatFilesystem, type FsType } from "../../src/system/filesystem.js";
import { loopsOf } from "../../src/system/losetup.js";
import { mountDevice, unmount } from "../../src/system/mount.js";
import { ExecaRunner } from "../../src/system/runner.js";
import { loopDevicesUnder, mountsUnder, withMount } from "../support/kernel.js";

const MiB = 1024 ** 2;
const GiB = 1024 ** 3;
/** Every pool of this file has a name starting with this. */
const PREFIX = "tvops";
const real = new ExecaRunner();
const started = Date.now();
const report: string[] = [];
const note = (line: string) => {
  report.push(line);
  console.log(`  # ${line}`);
};
const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

let base: string;

/** A pool of this file: its driver, its directory, and the checks the kernel can answer. */
class TestPool {
  readonly logs: string[] = [];
  private current: DmThinPool | undefined;

  constructor(
    readonly name: string,
    readonly dataSizeBytes: number,
  ) {}

  /** The driver open() made (the scratch dir exists only once the suite's `before` ran). */
  get pool(): DmThinPool {
    if (!this.current) throw new Error(`pool ${this.name} was never opened`);
    return this.current;
  }

  set pool(p: DmThinPool) {
    this.current = p;
  }

  get dir(): string {
    return join(base, this.name);
  }

  get poolDev(): string {
    return `${this.name}-pool`;
  }

  driver(dataSizeBytes: number): DmThinPool {
    const log = createLogger("debug", (line) => this.logs.push(line));
    return new DmThinPool({ runner: real, dir: this.dir, dataSizeBytes, log, name: this.name });
  }

  async open(): Promise<void> {
    await mkdir(this.dir, { recursive: true });
    this.current = this.driver(this.dataSizeBytes);
    await this.current.open();
  }

  async mountpoint(volume: string): Promise<string> {
    const m = join(base, `${this.name}.mnt`, volume);
    await mkdir(m, { recursive: true });
    return m;
  }

  /** Thin ids in the metadata (through a metadata snapshot while the pool runs) = the volumes' and snapshots' in the state file. */
  async assertConsistent(): Promise<void> {
    const s = JSON.parse(await readFile(join(this.dir, "dmthin-state.json"), "utf8")) as {
      transactionId: number;
      volumes: Record<string, { id: number }>;
      snapshots?: Record<string, { id: number }>;
      pending?: unknown;
    };
    assert.equal(s.pending, undefined, "nothing pending");
    const known = [...Object.values(s.volumes), ...Object.values(s.snapshots ?? {})].map((v) => v.id).sort((a, b) => a - b);
    const [meta] = await loopsOf(real, join(this.dir, "meta.img"));
    assert.ok(meta);
    await real.run("dmsetup", ["message", this.poolDev, "0", "reserve_metadata_snap"]);
    try {
      const { stdout } = await real.run("thin_dump", ["--skip-mappings", "-m", meta]);
      const ids = [...stdout.matchAll(/<device dev_id="(\d+)"/g)].map((m) => Number(m[1])).sort((a, b) => a - b);
      assert.deepEqual(ids, known, "thin ids in the pool metadata = those of the state's volumes and snapshots");
    } finally {
      await real.run("dmsetup", ["message", this.poolDev, "0", "release_metadata_snap"]);
    }
    assert.equal((await thinPoolStatus(real, this.poolDev)).transactionId, s.transactionId);
    const suspended = (await real.run("dmsetup", ["info", "-c", "--noheadings", "-o", "name,suspended"])).stdout.split("\n").filter((l) => l.startsWith(this.name) && /Suspended/.test(l));
    assert.deepEqual(suspended, [], "nothing left suspended");
  }

  /** What a reboot does, then the files go: the data file is allocated, and on the VM's tmpfs that is RAM. */
  async discard(): Promise<void> {
    for (const m of (await mountsUnder(join(base, `${this.name}.mnt`))).reverse()) await unmount(real, m);
    const { stdout } = await real.run("dmsetup", ["ls"]);
    const names = stdout.split("\n").map((l) => l.split(/\s+/)[0] ?? "").filter((n) => n.startsWith(`${this.name}-`));
    for (const n of [...names.filter((n) => n !== this.poolDev), ...names.filter((n) => n === this.poolDev)]) await real.run("dmsetup", ["remove", "--noudevsync", "--retry", n]);
    for (const file of ["data.img", "meta.img"]) for (const dev of await loopsOf(real, join(this.dir, file))) await real.run("losetup", ["--detach", dev]);
    await rm(this.dir, { recursive: true, force: true });
  }
}

/** Writer file `i`: 16 to 48 KiB that depend on `i` only. Runs in the writer process too (from its source). */
function expectedContent(i: number): Buffer {
  const size = 16 * 1024 + ((i * 7919) % 33) * 1024 + (i % 13) * 37;
  const b = Buffer.allocUnsafe(size);
  for (let k = 0; k < size; k++) b[k] = (i * 131 + k * 7 + (k >> 12)) & 255;
  return b;
}

/** A process that writes files w0, w1, ... into `dir`, each fsync'd, without end; it stops at the first failing write and says so. */
function startWriter(dir: string) {
  const script = `
    const fs = require("fs"), path = require("path");
    const expectedContent = ${expectedContent.toString()};
    for (let i = 0; ; i++) {
      const data = expectedContent(i);
      try {
        const fd = fs.openSync(path.join(process.argv[1], "w" + i), "w");
        for (let off = 0; off < data.length; off += 8192) fs.writeSync(fd, data, off, Math.min(8192, data.length - off));
        fs.fsyncSync(fd);
        fs.closeSync(fd);
      } catch (e) {
        fs.writeSync(1, "error w" + i + ": " + e.message + "\\n");
        process.exit(2);
      }
      fs.writeSync(1, "done " + i + "\\n");
    }
  `;
  const child = spawn(process.execPath, ["-e", script, dir], { stdio: ["ignore", "pipe", "inherit"] });
  let done = -1;
  let error: string | undefined;
  const waiters: { n: number; resolve: () => void; reject: (e: Error) => void }[] = [];
  createInterface({ input: child.stdout }).on("line", (line) => {
    const m = /^done (\d+)$/.exec(line);
    if (m) done = Number(m[1]);
    else error = line;
    for (const w of waiters.splice(0)) {
      if (error) w.reject(new Error(`the writer failed: ${error}`));
      else if (done >= w.n) w.resolve();
      else waiters.push(w);
    }
  });
  const exited = new Promise<void>((resolve) => child.on("exit", () => resolve()));
  return {
    get done() {
      return done;
    },
    get error() {
      return error;
    },
    /** Resolves once file `n` is complete. */
    until(n: number): Promise<void> {
      return new Promise((resolve, reject) => {
        if (error) return reject(new Error(`the writer failed: ${error}`));
        if (done >= n) return resolve();
        waiters.push({ n, resolve, reject });
      });
    },
    async stop(): Promise<void> {
      child.kill("SIGKILL");
      await exited;
    },
  };
}

/** Every writer file in `mnt` is a prefix of what was written; files 0..completeUpTo are whole. */
async function checkWriterFiles(mnt: string, completeUpTo: number): Promise<number> {
  const names = (await readdir(mnt)).filter((n) => /^w\d+$/.test(n));
  for (const n of names) {
    const have = await readFile(join(mnt, n));
    const want = expectedContent(Number(n.slice(1)));
    assert.ok(have.length <= want.length && have.equals(want.subarray(0, have.length)), `${n} (${have.length} bytes) is not a prefix of what was written`);
  }
  for (let i = 0; i <= completeUpTo; i++) assert.equal((await readFile(join(mnt, `w${i}`))).length, expectedContent(i).length, `w${i} is whole`);
  return names.length;
}

function mountVolume<T>(device: string, fs: FsType, work: (mnt: string) => Promise<T>): Promise<T> {
  return withMount(device, base, work, { fs, options: baseMountOptions(fs) });
}

/** e2fsck -fn / xfs_repair -n of an unmounted device; an xfs taken while mounted gets its log replayed first (mount, unmount). */
async function assertClean(device: string, fs: FsType, what: string): Promise<void> {
  if (fs === "xfs") await mountVolume(device, fs, async () => undefined);
  const check = fs === "ext4" ? await real.run("e2fsck", ["-f", "-n", device], { okExitCodes: [1, 2, 4, 8] }) : await real.run("xfs_repair", ["-n", device], { okExitCodes: [1, 2] });
  assert.equal(check.exitCode, 0, `${what}: ${fs === "ext4" ? "e2fsck -f -n" : "xfs_repair -n"}: ${check.stdout}\n${check.stderr}`);
}

/** The checksum of a whole device, read past any cached copy of its blocks. */
async function deviceSha(device: string): Promise<string> {
  await real.run("blockdev", ["--flushbufs", device]);
  return sha(await readFile(device));
}

async function fsBytes(mnt: string): Promise<{ size: number; free: number }> {
  const s = await statfs(mnt);
  return { size: s.blocks * s.bsize, free: s.bavail * s.bsize };
}

async function writeSynced(path: string, data: Buffer): Promise<void> {
  const fd = await open(path, "w");
  try {
    await fd.write(data);
    await fd.sync();
  } finally {
    await fd.close();
  }
}

describe("dm-thin volume operations on a real kernel", () => {
  const P = new TestPool(`${PREFIX}-a`, 3 * GiB);

  before(async () => {
    base = await mkdtemp(join(process.env["THINVOL_TEST_TMP"] ?? tmpdir(), "thinvol-dmthin-ops-"));
    await P.open();
  });

  after(async () => {
    await P.pool.close().catch(() => undefined);
    await P.discard().catch((err: unknown) => console.log(`cleanup of ${P.name}: ${String(err)}`));
    assert.deepEqual(await loopDevicesUnder(base), [], "no loop device left");
    await rm(base, { recursive: true, force: true });
    console.log(`\nfindings:\n  ${report.join("\n  ")}\nwhole file: ${Math.round((Date.now() - started) / 1000)} s`);
  });

  const sizes: Record<FsType, [number, number]> = { ext4: [96 * MiB, 192 * MiB], xfs: [320 * MiB, 448 * MiB] };
  for (const fs of ["ext4", "xfs"] as const) {
    test(`${fs}: resize under a writer that never stops, the filesystem grown online; a snapshot under load, cloned, is clean and holds the data`, async () => {
      const [from, to] = sizes[fs];
      const v = `busy-${fs}`;
      await P.pool.create(v, from);
      const dev = await P.pool.activate(v);
      await formatFilesystem(real, dev, fs, v);
      const mnt = await P.mountpoint(v);
      await mountDevice(real, dev, mnt, fs, baseMountOptions(fs));
      // Nearly full before the resize (fallocate writes nothing to the device): whatever is written past 40 MiB needs the new space.
      const ballast = (await fsBytes(mnt)).free - 40 * MiB;
      await real.run("fallocate", ["-l", String(ballast), join(mnt, "ballast")]);
      const writer = startWriter(mnt);
      let newSpace: Buffer;
      let completeBeforeSnapshot: number;
      try {
        await writer.until(20);
        let t = Date.now();
        await P.pool.resize(v, to);
        const resizeMs = Date.now() - t;
        assert.equal(await deviceSizeBytes(real, dev), to, "the mounted device has its new size at once");
        const before = await fsBytes(mnt);
        t = Date.now();
        if (fs === "ext4") await real.run("resize2fs", [dev]);
        else await real.run("xfs_growfs", [mnt]);
        const growMs = Date.now() - t;
        const grown = await fsBytes(mnt);
        assert.ok(grown.size >= before.size + (to - from) * 0.8, `the filesystem grew: ${before.size} → ${grown.size} bytes`);
        // 64 MiB where only 40 MiB (less what the writer took) were free before: the new space, usable at once.
        newSpace = randomBytes(64 * MiB);
        await writeSynced(join(mnt, "new-space"), newSpace);
        await writer.until(writer.done + 20);
        completeBeforeSnapshot = writer.done;
        t = Date.now();
        await P.pool.snapshot(v, "busy");
        const snapMs = Date.now() - t;
        await writer.until(writer.done + 20); // the volume keeps taking writes after the snapshot
        note(`${fs}: resize ${from / MiB}→${to / MiB} MiB ${resizeMs} ms, ${fs === "ext4" ? "resize2fs" : "xfs_growfs"} ${growMs} ms, snapshot under load ${snapMs} ms; writer at file ${writer.done}, no write failed`);
      } finally {
        await writer.stop();
      }
      assert.equal(writer.error, undefined, "no write failed");
      const files = await checkWriterFiles(mnt, writer.done);
      assert.equal(sha(await readFile(join(mnt, "new-space"))), sha(newSpace));
      assert.equal(await P.pool.snapshotSizeOf(v, "busy"), to);

      // The snapshot, cloned to a volume: a clean filesystem with everything written before it.
      const copy = `${v}-copy`;
      await P.pool.clone(copy, v, { snapshot: "busy" });
      assert.equal(await P.pool.sizeOf(copy), to);
      const cdev = await P.pool.activate(copy);
      assert.equal(await deviceSizeBytes(real, cdev), to);
      await assertClean(cdev, fs, "the snapshot of a filesystem under write load");
      const inCopy = await mountVolume(cdev, fs, async (m) => {
        assert.equal(sha(await readFile(join(m, "new-space"))), sha(newSpace), "the data written into the new space is in the snapshot");
        return checkWriterFiles(m, completeBeforeSnapshot);
      });
      note(`${fs}: ${files} writer files on the volume, ${inCopy} in its snapshot; snapshot allocation ${Math.round((await P.pool.snapshotAllocatedBytes(v, "busy")) / MiB)} MiB`);
      await unmount(real, mnt);
      await assertClean(dev, fs, "the resized volume");
      for (const name of [copy, v]) await P.pool.deactivate(name);
      await P.pool.remove(copy);
      await P.pool.removeSnapshot(v, "busy");
      await P.pool.remove(v);
      await P.assertConsistent();
    });
  }

  test("snapshot, write, resize, rollback: the device holds the snapshot's bytes again, byte for byte, at the snapshot's size", async () => {
    const v = "rb";
    await P.pool.create(v, 64 * MiB);
    const dev = await P.pool.activate(v);
    await formatFilesystem(real, dev, "ext4", v);
    const original = randomBytes(8 * MiB);
    await mountVolume(dev, "ext4", (m) => writeSynced(join(m, "data"), original));
    const deviceSum = await deviceSha(dev);
    const usedBefore = (await P.pool.usage()).dataUsedBytes;
    await P.pool.snapshot(v, "before");
    await mountVolume(dev, "ext4", async (m) => {
      await writeSynced(join(m, "data"), randomBytes(8 * MiB));
      await writeSynced(join(m, "more"), randomBytes(8 * MiB));
    });
    await P.pool.resize(v, 96 * MiB);
    assert.notEqual(await deviceSha(dev), deviceSum);
    await assert.rejects(P.pool.rollback(v, "before"), (e: Error) => e instanceof ConflictError && /deactivate the volume first/.test(e.message));
    await P.pool.deactivate(v);
    const t = Date.now();
    await P.pool.rollback(v, "before");
    const rollbackMs = Date.now() - t;
    assert.equal(await P.pool.sizeOf(v), 64 * MiB);
    const back = await P.pool.activate(v);
    assert.equal(await deviceSizeBytes(real, back), 64 * MiB, "the snapshot's size");
    assert.equal(await deviceSha(back), deviceSum, "the snapshot's bytes, the whole device");
    await mountVolume(back, "ext4", async (m) => {
      assert.equal(sha(await readFile(join(m, "data"))), sha(original));
      assert.deepEqual((await readdir(m)).filter((n) => n !== "lost+found").sort(), ["data"]);
    });
    await assertClean(back, "ext4", "the rolled-back volume");
    const usedAfter = (await P.pool.usage()).dataUsedBytes;
    note(`rollback ${rollbackMs} ms; pool data used ${Math.round(usedBefore / MiB)} MiB before the snapshot, ${Math.round(usedAfter / MiB)} MiB after the rollback (the data written since is freed)`);
    assert.ok(usedAfter < usedBefore + 4 * MiB, "what was written after the snapshot is freed");
    assert.deepEqual((await P.pool.snapshots()).get(v), ["before"], "the snapshot stays");
    await P.pool.deactivate(v);
    await P.pool.removeSnapshot(v, "before");
    await P.pool.remove(v);
    await P.assertConsistent();
  });

  test("the pool grows at run time under a mounted volume being written, and keeps its new size after a restart with the old POOL_SIZE", async () => {
    const v = "grow";
    await P.pool.create(v, 64 * MiB);
    const dev = await P.pool.activate(v);
    await formatFilesystem(real, dev, "ext4", v);
    const mnt = await P.mountpoint(v);
    await mountDevice(real, dev, mnt, "ext4", baseMountOptions("ext4"));
    const writer = startWriter(mnt);
    try {
      await writer.until(10);
      const t = Date.now();
      await P.pool.grow(6 * GiB);
      note(`pool grow 3→6 GiB under a mounted volume being written: ${Date.now() - t} ms`);
      await writer.until(writer.done + 20);
    } finally {
      await writer.stop();
    }
    assert.equal(writer.error, undefined, "no write failed");
    assert.equal((await P.pool.usage()).dataTotalBytes, 6 * GiB);
    assert.equal((await thinPoolStatus(real, P.poolDev)).mode, "rw");
    await checkWriterFiles(mnt, writer.done);
    await P.pool.close();
    P.pool = P.driver(3 * GiB);
    await P.pool.open();
    assert.equal((await P.pool.usage()).dataTotalBytes, 6 * GiB, "a restart with the old POOL_SIZE keeps the grown size");
    assert.ok(P.logs.some((l) => / warn POOL_SIZE is smaller than the size the pool was grown to/.test(l)));
    await unmount(real, mnt);
    await P.pool.deactivate(v);
    await P.pool.remove(v);
    await P.assertConsistent();
  });

  test("a full pool refuses a resize, changing nothing; once the pool grows, the resize works and the new space takes writes", async () => {
    const F = new TestPool(`${PREFIX}-full`, 64 * MiB);
    await F.open();
    try {
      await F.pool.create("v", 128 * MiB);
      const dev = await F.pool.activate("v");
      const fill = await real.run("dd", ["if=/dev/zero", `of=${dev}`, "bs=1M", "count=96", "oflag=direct"], { okExitCodes: [1] });
      assert.equal(fill.exitCode, 1, "filling the pool fails");
      note(`filling a 64 MiB pool: ${fill.stderr.split("\n")[0] ?? ""}`);
      assert.equal((await thinPoolStatus(real, F.poolDev)).mode, "out_of_data_space");
      await assert.rejects(F.pool.resize("v", 256 * MiB), (err: Error) => {
        assert.ok(err instanceof NoSpaceError, String(err));
        assert.match(err.message, /cannot resize thin volume "v"/);
        return true;
      });
      assert.equal(await deviceSizeBytes(real, dev), 128 * MiB, "the device keeps its size");
      await F.pool.grow(256 * MiB);
      await F.pool.resize("v", 256 * MiB);
      assert.equal(await deviceSizeBytes(real, dev), 256 * MiB);
      const t = Date.now();
      await real.run("dd", ["if=/dev/zero", `of=${dev}`, "bs=1M", "count=1", "seek=200", "oflag=direct"]);
      note(`after growing the full pool, a write into the volume's new space took ${Date.now() - t} ms`);
      await F.pool.deactivate("v");
      await F.assertConsistent();
    } finally {
      await F.pool.close().catch(() => undefined);
      await F.discard();
    }
  });
});
