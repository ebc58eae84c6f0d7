/**
 * dm-thin behaviours the product promises, proved on a real kernel: restart (pool
 * live or torn down), crashes in the middle of create / clone / remove, a pool
 * filled to its limit, and clones of filesystems under write load.
 * Run as root inside the VM:
 *   npm run vm -- node --import tsx --test --test-reporter=spec test/vm/dmthin-specifics.test.ts
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { mkdir, mkdtemp, open, readFile, readdir, rm, statfs, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { after, before, describe, test } from "node:test";
import { createLogger, type Logger } from "../../src/log.js";
import { DmThinPool } from "../../src/pool/dmthin/index.js";
import { thinPoolStatus } from "../../src/system/dmsetup.js";
import { baseMountOptions, formatFilesystem, type FsType } from "../../src/system/filesystem.js";
import { loopsOf } from "../../src/system/losetup.js";
import { mountDevice, unmount } from "../../src/system/mount.js";
import { ExecaRunner, formatCommand, type RunOptions, type RunResult, type Runner } from "../../src/system/runner.js";
import { loopDevicesUnder, mountsUnder, withMount } from "../support/kernel.js";

const MiB = 1024 ** 2;
const GiB = 1024 ** 3;
/** Every pool of this file has a name starting with this, so leftovers are easy to find. */
const PREFIX = "tvspec";
const real = new ExecaRunner();
const echo = process.env["LOG_LEVEL"] === "debug";

let base: string;
const report: string[] = [];
const note = (line: string) => {
  report.push(line);
  console.log(`  # ${line}`);
};

/**
 * Runs real commands and records them. `crashAfter` makes it play a process that
 * dies right after a given command ran: that command's effect stays in the
 * kernel, the state file is captured as it was at that instant (a dead process
 * writes nothing more), and every later command fails.
 */
class CrashingRunner implements Runner {
  readonly commands: string[] = [];
  private crashWhen: ((command: string, args: readonly string[]) => boolean) | undefined;
  private stateDir = "";
  dead = false;
  /** The state file's text at the moment of the crash. */
  stateAtCrash: string | undefined;

  crashAfter(stateDir: string, when: (command: string, args: readonly string[]) => boolean): void {
    this.stateDir = stateDir;
    this.crashWhen = when;
  }

  async run(command: string, args: readonly string[], options?: RunOptions): Promise<RunResult> {
    const shown = formatCommand(command, args);
    if (this.dead) throw new Error(`simulated crash: the process is gone, ${shown} never ran`);
    this.commands.push(shown);
    const result = await real.run(command, args, options);
    if (this.crashWhen?.(command, args)) {
      this.crashWhen = undefined;
      this.dead = true;
      this.stateAtCrash = readFileSync(join(this.stateDir, "dmthin-state.json"), "utf8");
      throw new Error(`simulated crash right after ${shown}`);
    }
    return result;
  }
}

/** A driver with a log and a runner the test can read. */
interface Driver {
  pool: DmThinPool;
  runner: CrashingRunner;
  logs: string[];
}

class PoolUnderTest {
  constructor(
    readonly name: string,
    readonly dataSizeBytes: number,
    /** The directory the pool's directory goes in; the scratch dir by default. */
    private readonly parent: () => string = () => base,
  ) {}

  /** Under the scratch dir, which exists once the outer `before` ran. */
  get dir(): string {
    return join(this.parent(), this.name);
  }

  /** A mountpoint for one of this pool's volumes; teardown unmounts whatever is left there. */
  async mountpoint(name: string): Promise<string> {
    const m = join(base, `${this.name}.mnt`, name);
    await mkdir(m, { recursive: true });
    return m;
  }

  get poolDev(): string {
    return `${this.name}-pool`;
  }

  driver(): Driver {
    const runner = new CrashingRunner();
    const logs: string[] = [];
    const log: Logger = createLogger("debug", (line) => {
      logs.push(line);
      if (echo) console.log(line);
    });
    return { pool: new DmThinPool({ runner, dir: this.dir, dataSizeBytes: this.dataSizeBytes, log, name: this.name }), runner, logs };
  }

  async open(): Promise<Driver> {
    const d = this.driver();
    await d.pool.open();
    return d;
  }

  async state(): Promise<{ transactionId: number; volumes: Record<string, { id: number }>; pending?: unknown }> {
    return JSON.parse(await readFile(join(this.dir, "dmthin-state.json"), "utf8")) as never;
  }

  async rawStatus(): Promise<string> {
    return (await real.run("dmsetup", ["status", this.poolDev])).stdout.trim();
  }

  /** Thin ids in the pool's metadata, read through a metadata snapshot while the pool runs. */
  async kernelThinIds(): Promise<number[]> {
    const [meta] = await loopsOf(real, join(this.dir, "meta.img"));
    assert.ok(meta, "the metadata file has a loop device");
    await real.run("dmsetup", ["message", this.poolDev, "0", "reserve_metadata_snap"]);
    try {
      const { stdout } = await real.run("thin_dump", ["--skip-mappings", "-m", meta]);
      return [...stdout.matchAll(/<device dev_id="(\d+)"/g)].map((m) => Number(m[1])).sort((a, b) => a - b);
    } finally {
      await real.run("dmsetup", ["message", this.poolDev, "0", "release_metadata_snap"]);
    }
  }

  /** The kernel holds exactly the thin ids the state file knows, nothing is pending, transactions agree. */
  async assertConsistent(): Promise<void> {
    const s = await this.state();
    assert.equal(s.pending, undefined, "no operation left pending in the state file");
    const known = Object.values(s.volumes)
      .map((v) => v.id)
      .sort((a, b) => a - b);
    assert.deepEqual(await this.kernelThinIds(), known, "thin ids in the pool metadata = thin ids of known volumes");
    assert.equal((await thinPoolStatus(real, this.poolDev)).transactionId, s.transactionId, "pool transaction id = state file's");
  }

  /**
   * Takes the pool down and deletes its files: its data file is allocated, and on the VM's
   * tmpfs every reserved byte is RAM.
   */
  async discard(): Promise<void> {
    await this.tearDownKernelSide();
    await rm(this.dir, { recursive: true, force: true });
  }

  async dmDevices(): Promise<string[]> {
    return (await dmNames()).filter((n) => n.startsWith(`${this.name}-`));
  }

  /** What a host reboot does: the pool's dm devices (volumes first) and its loop devices go away. */
  async tearDownKernelSide(): Promise<void> {
    for (const m of (await mountsUnder(join(base, `${this.name}.mnt`))).reverse()) await unmount(real, m);
    const names = await this.dmDevices();
    for (const n of names.filter((n) => n !== this.poolDev)) await real.run("dmsetup", ["remove", "--noudevsync", "--retry", n]);
    if (names.includes(this.poolDev)) await real.run("dmsetup", ["remove", "--noudevsync", "--retry", this.poolDev]);
    for (const file of ["data.img", "meta.img"]) {
      for (const dev of await loopsOf(real, join(this.dir, file))) await real.run("losetup", ["--detach", dev]);
    }
  }
}

async function dmNames(): Promise<string[]> {
  const { stdout } = await real.run("dmsetup", ["ls"]);
  return stdout
    .split("\n")
    .map((l) => l.split(/\s+/)[0] ?? "")
    .filter((n) => n !== "" && n !== "No");
}

async function mountOptions(mnt: string): Promise<string> {
  const line = (await readFile("/proc/self/mounts", "utf8")).split("\n").find((l) => l.split(" ")[1] === mnt);
  return line?.split(" ")[3] ?? "(not mounted)";
}

/** The kernel's latest messages matching `re`, collapsing runs of "Buffer I/O error" lines. */
async function kernelLines(re: RegExp, max = 10): Promise<string[]> {
  const lines = (await real.run("dmesg", [])).stdout.split("\n").filter((l) => re.test(l) || /Buffer I\/O error/.test(l));
  const out: string[] = [];
  for (const l of lines) {
    const prev = out.at(-1) ?? "";
    if (/Buffer I\/O error/.test(l) && /Buffer I\/O error/.test(prev)) out[out.length - 1] = prev.replace(/( \(\+\d+ more\))?$/, (m) => ` (+${Number(/\d+/.exec(m)?.[0] ?? 0) + 1} more)`);
    else out.push(l);
  }
  return out.slice(-max);
}

const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

/** Mounts `device` under the test's base dir for the duration of `work`. */
function mountVolume<T>(device: string, fs: FsType, work: (mnt: string) => Promise<T>, extra: string[] = []): Promise<T> {
  return withMount(device, base, work, { fs, options: [...baseMountOptions(fs), ...extra] });
}

/** Content of writer file `i`: a size and bytes that depend on `i` only. Runs in the writer process too (from its source). */
function expectedContent(i: number): Buffer {
  const size = 48 * 1024 + ((i * 7919) % 97) * 1024 + (i % 13) * 37;
  const b = Buffer.allocUnsafe(size);
  for (let k = 0; k < size; k++) b[k] = (i * 131 + k * 7 + (k >> 12)) & 255;
  return b;
}

/**
 * A child process that writes files w<i> into `dir` in 8 KiB pieces, fsyncs each,
 * and prints "done <i>" once a file is complete, until killed.
 */
function startWriter(dir: string) {
  const script = `
    const fs = require("fs"), path = require("path");
    const expectedContent = ${expectedContent.toString()};
    const dir = process.argv[1];
    for (let i = 0; i < 4000; i++) {
      const data = expectedContent(i);
      const fd = fs.openSync(path.join(dir, "w" + i), "w");
      for (let off = 0; off < data.length; off += 8192) fs.writeSync(fd, data, off, Math.min(8192, data.length - off));
      fs.fsyncSync(fd);
      fs.closeSync(fd);
      fs.writeSync(1, "done " + i + "\\n");
    }
  `;
  const child = spawn(process.execPath, ["-e", script, dir], { stdio: ["ignore", "pipe", "inherit"] });
  let done = -1;
  const waiters: Array<{ n: number; resolve: () => void }> = [];
  createInterface({ input: child.stdout }).on("line", (line) => {
    const m = /^done (\d+)$/.exec(line);
    if (!m) return;
    done = Number(m[1]);
    for (const w of waiters.splice(0)) {
      if (done >= w.n) w.resolve();
      else waiters.push(w);
    }
  });
  const exited = new Promise<void>((resolve) => child.on("exit", () => resolve()));
  return {
    get done() {
      return done;
    },
    /** Resolves once file `n` is complete. */
    until(n: number): Promise<void> {
      return new Promise((resolve, reject) => {
        if (done >= n) return resolve();
        waiters.push({ n, resolve });
        child.once("exit", (code) => reject(new Error(`writer exited (${code}) before file ${n}`)));
      });
    },
    async stop(): Promise<void> {
      child.kill("SIGKILL");
      await exited;
    },
  };
}

/** Every writer file in `mnt` is a prefix of what it should hold; files 0..completeUpTo are whole. */
async function checkWriterFiles(mnt: string, completeUpTo: number): Promise<{ files: number; whole: number; partial: number }> {
  const names = (await readdir(mnt)).filter((n) => /^w\d+$/.test(n));
  let whole = 0;
  let partial = 0;
  for (const n of names) {
    const i = Number(n.slice(1));
    const have = await readFile(join(mnt, n));
    const want = expectedContent(i);
    assert.ok(have.length <= want.length, `${n} is longer than written: ${have.length} > ${want.length}`);
    assert.ok(have.equals(want.subarray(0, have.length)), `${n} (${have.length} bytes) is not a prefix of what was written`);
    if (have.length === want.length) whole++;
    else partial++;
  }
  for (let i = 0; i <= completeUpTo; i++) {
    assert.ok(names.includes(`w${i}`), `w${i}, complete before the clone, is in the clone`);
    assert.equal((await readFile(join(mnt, `w${i}`))).length, expectedContent(i).length, `w${i} is whole in the clone`);
  }
  return { files: names.length, whole, partial };
}

const pools: PoolUnderTest[] = [];
const started = Date.now();

describe("dm-thin specifics on a real kernel", () => {
  before(async () => {
    base = await mkdtemp(join(process.env["THINVOL_TEST_TMP"] ?? tmpdir(), "thinvol-dmthin-specifics-"));
    const fsType = (await real.run("stat", ["-f", "-c", "%T", base])).stdout.trim();
    note(`scratch dir ${base} is on ${fsType}`);
  });

  after(async () => {
    for (const p of pools) await p.tearDownKernelSide().catch((err: unknown) => console.log(`cleanup of ${p.name}: ${String(err)}`));
    await rm(base, { recursive: true, force: true });
    console.log(`\nfindings:\n  ${report.join("\n  ")}\nwhole file: ${Math.round((Date.now() - started) / 1000)} s`);
  });

  // ------------------------------------------------------------------ 1. restart
  describe("restart", () => {
    const P = new PoolUnderTest(`${PREFIX}-rs`, 1 * GiB);
    after(() => P.discard());
    let a: Driver;
    const sums = new Map<string, string>();
    let mnt: string;

    before(async () => {
      pools.push(P);
      await mkdir(P.dir, { recursive: true });
      a = await P.open();
      await a.pool.create("db", 256 * MiB);
      const dev = await a.pool.activate("db");
      await formatFilesystem(real, dev, "ext4", "db");
      await mountVolume(dev, "ext4", async (m) => {
        const blob = Buffer.alloc(8 * MiB);
        for (let i = 0; i < blob.length; i += 4096) blob.writeUInt32LE(i * 2654435761 >>> 0, i);
        await writeFile(join(m, "blob"), blob);
        sums.set("db/blob", sha(blob));
      });
      await a.pool.clone("db-copy", "db");
      await a.pool.create("empty", 64 * MiB);
      // db stays mounted through the live restart.
      mnt = await P.mountpoint("db");
      await mountDevice(real, dev, mnt, "ext4", baseMountOptions("ext4"));
    });

    test("with the pool still active: reused as is, no thin_check, a mounted volume keeps working", async () => {
      await a.pool.close();
      const t = Date.now();
      const b = await P.open();
      note(`restart with the pool live: open took ${Date.now() - t} ms`);
      assert.ok(!b.runner.commands.some((c) => c.startsWith("thin_check")), `no thin_check on a live pool: ${b.runner.commands.join("; ")}`);
      assert.ok(!b.runner.commands.some((c) => c.startsWith("dmsetup create")), "the live pool is not re-created");
      assert.ok(b.logs.some((l) => / info dm-thin pool open .*volumes=3 reused=true/.test(l)), b.logs.join("\n"));
      assert.deepEqual(await b.pool.list(), ["db", "db-copy", "empty"]);
      await writeFile(join(mnt, "after-restart"), "still writable");
      await real.run("sync", []);
      assert.equal(await readFile(join(mnt, "after-restart"), "utf8"), "still writable");
      await P.assertConsistent();
      await unmount(real, mnt);
      a = b;
    });

    test("after a reboot-like teardown: re-created from its files after thin_check, every volume and its data there", async () => {
      await a.pool.close();
      await P.tearDownKernelSide();
      assert.deepEqual(await P.dmDevices(), []);
      assert.deepEqual(await loopDevicesUnder(P.dir), []);
      const t = Date.now();
      const b = await P.open();
      note(`restart after teardown: open took ${Date.now() - t} ms (losetup, thin_check, dmsetup create)`);
      const [meta] = await loopsOf(real, join(P.dir, "meta.img"));
      const checks = b.runner.commands.filter((c) => c.startsWith("thin_check"));
      assert.deepEqual(checks, [`thin_check ${meta}`], `thin_check ran once on the metadata loop device; ran: ${b.runner.commands.join("; ")}`);
      const createIdx = b.runner.commands.findIndex((c) => c.startsWith(`dmsetup create ${P.poolDev}`));
      assert.ok(createIdx > b.runner.commands.indexOf(checks[0] ?? ""), "thin_check ran before the pool was created");
      assert.ok(b.logs.some((l) => / info dm-thin pool open .*volumes=3 reused=false/.test(l)), b.logs.join("\n"));
      assert.deepEqual(await b.pool.list(), ["db", "db-copy", "empty"]);
      assert.equal(await b.pool.sizeOf("db"), 256 * MiB);
      assert.equal(await b.pool.sizeOf("empty"), 64 * MiB);
      await P.assertConsistent();
      for (const v of ["db", "db-copy"]) {
        const dev = await b.pool.activate(v);
        const fsck = await real.run("e2fsck", ["-f", "-n", dev], { okExitCodes: [1, 2, 4, 8] });
        assert.equal(fsck.exitCode, 0, `${v}: ${fsck.stdout}`);
        await mountVolume(dev, "ext4", async (m) => {
          assert.equal(sha(await readFile(join(m, "blob"))), sums.get("db/blob"), `${v}/blob has its data`);
          if (v === "db") assert.equal(await readFile(join(m, "after-restart"), "utf8"), "still writable");
          else await assert.rejects(readFile(join(m, "after-restart")), { code: "ENOENT" }, "the clone predates the file");
        });
        await b.pool.deactivate(v);
      }
      for (const v of await b.pool.list()) await b.pool.remove(v);
      assert.equal((await b.pool.usage()).dataUsedBytes, 0);
      await P.assertConsistent();
      await b.pool.close();
      await P.tearDownKernelSide();
    });
  });

  // ------------------------------------------------------------------ 2. crashes
  describe("a crash in the middle of an operation", () => {
    const P = new PoolUnderTest(`${PREFIX}-cr`, 1 * GiB);
    after(() => P.discard());
    let d: Driver;
    let fresh: { data: number; meta: number };
    let keepSum: string;
    let keepMnt: string;

    /** Crashes `work` right after the matching command ran, then opens a fresh driver on the same dir. */
    async function crashThenReopen(what: string, when: (command: string, args: readonly string[]) => boolean, work: (p: DmThinPool) => Promise<unknown>) {
      d.runner.crashAfter(P.dir, when);
      await assert.rejects(work(d.pool), (err: Error) => /simulated crash/.test(err.message), `${what}: the operation died in the crash`);
      assert.ok(d.runner.dead, `${what}: the crash point was reached`);
      // The dead process wrote nothing after the crash: put its state file back as it was then.
      await writeFile(join(P.dir, "dmthin-state.json"), d.runner.stateAtCrash ?? "");
      const journal = JSON.parse(d.runner.stateAtCrash ?? "{}") as { pending?: { op: string; id: number } };
      const t = Date.now();
      d = await P.open();
      const recovered = d.logs.filter((l) => / warn (rolled back|completed) an interrupted/.test(l));
      note(`crash ${what}: journal ${JSON.stringify(journal.pending)}; reopen took ${Date.now() - t} ms; ${recovered.map((l) => l.replace(/^\S+ warn /, "")).join("; ")}`);
      await P.assertConsistent();
      return { journal, recovered };
    }

    async function assertKeepIntact(): Promise<void> {
      assert.deepEqual((await d.pool.list()).includes("keep"), true);
      const dev = await d.pool.activate("keep");
      await mountVolume(dev, "ext4", async (m) => assert.equal(sha(await readFile(join(m, "data"))), keepSum));
    }

    before(async () => {
      pools.push(P);
      await mkdir(P.dir, { recursive: true });
      d = await P.open();
      const u = await d.pool.usage();
      fresh = { data: u.dataUsedBytes, meta: u.metaUsedBytes ?? 0 };
      note(`fresh pool ${P.name}: data used ${fresh.data} B, metadata used ${fresh.meta} B`);
      await d.pool.create("keep", 128 * MiB);
      const dev = await d.pool.activate("keep");
      await formatFilesystem(real, dev, "ext4", "keep");
      const data = Buffer.alloc(4 * MiB);
      for (let i = 0; i < data.length; i += 512) data.writeUInt32LE(i ^ 0x5a5a5a5a, i);
      keepSum = sha(data);
      await mountVolume(dev, "ext4", (m) => writeFile(join(m, "data"), data));
      await d.pool.deactivate("keep");
    });

    test("between create_thin and the state save: rolled back, the thin id is free again", async () => {
      const { journal } = await crashThenReopen("after create_thin", (c, a) => c === "dmsetup" && a[0] === "message" && /^create_thin /.test(a[3] ?? ""), (p) => p.create("lost", 64 * MiB));
      assert.equal(journal.pending?.op, "create");
      assert.deepEqual(await d.pool.list(), ["keep"]);
      // The id the dead process made is gone from the kernel: making it again succeeds.
      const id = journal.pending?.id ?? -1;
      await real.run("dmsetup", ["message", P.poolDev, "0", `create_thin ${id}`]);
      await real.run("dmsetup", ["message", P.poolDev, "0", `delete ${id}`]);
      await P.assertConsistent();
      await assertKeepIntact();
      // The name is free.
      await d.pool.create("lost", 64 * MiB);
      await d.pool.remove("lost");
    });

    test("between set_transaction_id and the state save of a create: rolled forward, the volume is usable", async () => {
      await crashThenReopen("after create's set_transaction_id", (c, a) => c === "dmsetup" && a[0] === "message" && /^set_transaction_id /.test(a[3] ?? ""), (p) => p.create("made", 64 * MiB));
      assert.deepEqual(await d.pool.list(), ["keep", "made"]);
      const dev = await d.pool.activate("made");
      await formatFilesystem(real, dev, "ext4", "made");
      await mountVolume(dev, "ext4", (m) => writeFile(join(m, "x"), "x"));
      await d.pool.deactivate("made");
      await assertKeepIntact();
    });

    test("between create_snap and the state save, origin mounted: rolled back, the origin resumed and writable", async () => {
      const dev = await d.pool.activate("keep");
      keepMnt = await P.mountpoint("keep");
      await mountDevice(real, dev, keepMnt, "ext4", baseMountOptions("ext4"));
      const { journal } = await crashThenReopen("after create_snap (origin mounted)", (c, a) => c === "dmsetup" && a[0] === "message" && /^create_snap /.test(a[3] ?? ""), (p) => p.clone("snap", "keep"));
      assert.equal(journal.pending?.op, "clone");
      assert.deepEqual(await d.pool.list(), ["keep", "made"]);
      const info = (await real.run("dmsetup", ["info", `${P.name}-keep`])).stdout;
      assert.match(info, /State:\s+ACTIVE/, "the origin is no longer suspended");
      await writeFile(join(keepMnt, "after-crash"), "the origin's filesystem is thawed");
      await real.run("sync", ["-f", keepMnt]);
      await unmount(real, keepMnt);
      const id = journal.pending?.id ?? -1;
      await real.run("dmsetup", ["message", P.poolDev, "0", `create_thin ${id}`]);
      await real.run("dmsetup", ["message", P.poolDev, "0", `delete ${id}`]);
      await assertKeepIntact();
      // A clone works afterwards.
      await d.pool.clone("snap", "keep");
      await P.assertConsistent();
    });

    test("during a remove, after the thin id was deleted: the remove completes, nothing leaks", async () => {
      const { journal } = await crashThenReopen("after delete", (c, a) => c === "dmsetup" && a[0] === "message" && /^delete /.test(a[3] ?? ""), (p) => p.remove("made"));
      assert.equal(journal.pending?.op, "remove");
      assert.deepEqual(await d.pool.list(), ["keep", "snap"]);
      assert.ok(!(await P.dmDevices()).includes(`${P.name}-made`));
      await assertKeepIntact();
    });

    test("during a remove, after its device was taken away: the remove completes, the clone's origin is untouched", async () => {
      await d.pool.activate("snap");
      await crashThenReopen("after dmsetup remove", (c, a) => c === "dmsetup" && a[0] === "remove" && a.at(-1) === `${P.name}-snap`, (p) => p.remove("snap"));
      assert.deepEqual(await d.pool.list(), ["keep"]);
      await assertKeepIntact();
    });

    test("removing every volume gives the pool back its fresh figures", async () => {
      await d.pool.deactivate("keep");
      await d.pool.remove("keep");
      await P.assertConsistent();
      assert.deepEqual(await P.kernelThinIds(), []);
      const u = await d.pool.usage();
      note(`after removing everything: data used ${u.dataUsedBytes} B (fresh ${fresh.data}), metadata used ${u.metaUsedBytes} B (fresh ${fresh.meta})`);
      assert.equal(u.dataUsedBytes, fresh.data);
      assert.equal(u.metaUsedBytes, fresh.meta);
      await d.pool.close();
      await P.tearDownKernelSide();
    });
  });

  // ------------------------------------------------------------------ 3. pool full
  // Seen on Debian's kernel: the failing write gets EIO within a fraction of a second
  // (error_if_no_space), the pool turns out_of_data_space and goes back to rw by itself once
  // blocks are free, its metadata stays clean. The volume that hit the limit stays writable and
  // can free space from inside, because its journal is backed by real blocks (mkfs writes it
  // out in full); with a lazily initialised journal the commit of the rm aborted the journal
  // and the volume turned read-only.
  describe("a pool filled to its limit", () => {
    const P = new PoolUnderTest(`${PREFIX}-full`, 256 * MiB);
    after(() => P.discard());
    let d: Driver;
    let smallSum: string;
    let bigMnt: string;

    before(async () => {
      pools.push(P);
      await mkdir(P.dir, { recursive: true });
      d = await P.open();
      await d.pool.create("small", 64 * MiB);
      const sdev = await d.pool.activate("small");
      await formatFilesystem(real, sdev, "ext4", "small");
      const data = Buffer.alloc(8 * MiB, 0x33);
      smallSum = sha(data);
      await mountVolume(sdev, "ext4", (m) => writeFile(join(m, "data"), data));
      await d.pool.deactivate("small");
      await d.pool.create("big", 1 * GiB);
      const bdev = await d.pool.activate("big");
      await formatFilesystem(real, bdev, "ext4", "big");
      bigMnt = await P.mountpoint("big");
      await mountDevice(real, bdev, bigMnt, "ext4", baseMountOptions("ext4"));
    });

    test("writing past the pool's size fails fast, the pool says out_of_data_space, another volume stays readable; freeing space brings writes back", async () => {
      // A child fills the 1 GiB filesystem in 4 MiB writes, each followed by fsync, and
      // reports each step; a step that takes over 30 s counts as a hang.
      const script = `
        const fs = require("fs");
        const fd = fs.openSync(process.argv[1], "w");
        const chunk = Buffer.alloc(4 << 20, 0xab);
        let total = 0;
        for (;;) {
          const t = Date.now();
          try {
            fs.writeSync(fd, chunk);
            fs.fsyncSync(fd);
          } catch (e) {
            fs.writeSync(1, "err " + e.code + " " + (Date.now() - t) + " " + total + "\\n");
            process.exit(0);
          }
          total += chunk.length;
          fs.writeSync(1, "ok " + total + " " + (Date.now() - t) + "\\n");
        }
      `;
      const fillStart = Date.now();
      const child = spawn(process.execPath, ["-e", script, join(bigMnt, "fill")], { stdio: ["ignore", "pipe", "inherit"] });
      const lines: string[] = [];
      let hung = false;
      let watchdog = setTimeout(() => undefined, 0);
      const arm = () => {
        clearTimeout(watchdog);
        watchdog = setTimeout(() => {
          hung = true;
          child.kill("SIGKILL");
        }, 30_000);
      };
      arm();
      createInterface({ input: child.stdout }).on("line", (l) => {
        lines.push(l);
        arm();
      });
      await new Promise<void>((resolve) => child.on("exit", () => resolve()));
      clearTimeout(watchdog);
      const last = lines.at(-1) ?? "";
      const statusFull = await P.rawStatus();
      note(`pool full: filler ran ${Date.now() - fillStart} ms, ${lines.length} steps; last: "${last}"; status: ${statusFull}`);
      assert.ok(!hung, `a write hung for over 30 s (pool status: ${statusFull}); steps: ${lines.slice(-3).join(" | ")}`);
      const m = /^err (\S+) (\d+) (\d+)$/.exec(last);
      assert.ok(m, `the filler ended with a write error, not: ${last}`);
      const [, code, ms, written] = m;
      note(`failing write+fsync: ${code} after ${ms} ms, ${Number(written) / MiB} MiB written before it`);
      assert.ok(code === "ENOSPC" || code === "EIO", `the failing write says ENOSPC or EIO, not ${code}`);
      assert.ok(Number(written) >= 128 * MiB, "most of the pool was filled before the error");
      const full = await thinPoolStatus(real, P.poolDev);
      note(`pool mode when full: ${full.mode}${full.needsCheck ? " needs_check" : ""}; data ${full.dataUsedBlocks}/${full.dataTotalBlocks} blocks`);
      assert.notEqual(full.needsCheck, true, "the pool's metadata is not flagged needs_check");
      assert.notEqual(full.mode, "ro", "the pool did not go read-only");
      assert.equal(full.mode, "out_of_data_space");
      const dmesg = await kernelLines(/thin|EXT4-fs|JBD2|I\/O error/i);
      note(`kernel said:\n    ${dmesg.join("\n    ")}`);
      // A new volume is refused with a clear reason.
      await assert.rejects(d.pool.create("refused", 16 * MiB), /out of data space|data space is free/);

      // Another volume of the same pool: readable, and mountable.
      const sdev = await d.pool.activate("small");
      await mountVolume(sdev, "ext4", async (m2) => assert.equal(sha(await readFile(join(m2, "data"))), smallSum), ["ro"]);
      await mountVolume(sdev, "ext4", async (m2) => assert.equal(sha(await readFile(join(m2, "data"))), smallSum));
      note("the other volume read back and mounted (ro and rw) while the pool was full");

      // Free the space from inside the full filesystem: rm, commit (ext4 trims freed blocks
      // only once the transaction that freed them is on disk), fstrim.
      note(`the full filesystem's mount options after the error: ${await mountOptions(bigMnt)}`);
      await rm(join(bigMnt, "fill"));
      // syncfs reports a writeback error of the filesystem once, to whoever asks first: the
      // filler's lost write. A second sync shows whether the filesystem itself still works.
      const first = await real.run("sync", ["-f", bigMnt], { okExitCodes: [1] });
      if (first.exitCode !== 0) note(`the first sync -f after the rm reported the earlier lost write: ${first.stderr.trim()}`);
      await real.run("sync", ["-f", bigMnt]);
      const trim = await real.run("fstrim", ["-v", bigMnt]);
      const freedBy = `rm + sync + fstrim (${trim.stdout.trim()})`;
      assert.match(await mountOptions(bigMnt), /^rw/, `the volume that hit the full pool is still writable; kernel:\n${(await kernelLines(/EXT4-fs|JBD2|jbd2|Aborting/)).join("\n")}`);
      const u = await d.pool.usage();
      const after = await thinPoolStatus(real, P.poolDev);
      note(`after ${freedBy}: data used ${Math.round(u.dataUsedBytes / MiB)} of ${u.dataTotalBytes / MiB} MiB, pool mode ${after.mode}; status ${await P.rawStatus()}`);
      assert.ok(u.dataUsedBytes < u.dataTotalBytes / 2, `space came back: ${u.dataUsedBytes} of ${u.dataTotalBytes} bytes used`);
      assert.equal(after.mode, "rw", "the pool is writable again");

      // Writes work again: in the volume that hit the limit, and in a new volume.
      const bdev = `/dev/mapper/${P.name}-big`;
      await writeFile(join(bigMnt, "again"), Buffer.alloc(16 * MiB, 1));
      await real.run("sync", ["-f", bigMnt]);
      note("the volume that hit the full pool takes writes again once space is back");
      await unmount(real, bigMnt);
      const fsck = await real.run("e2fsck", ["-f", "-n", bdev], { okExitCodes: [1, 2, 4, 8] });
      assert.equal(fsck.exitCode, 0, `the volume that hit the full pool is a clean filesystem: ${fsck.stdout}`);
      await d.pool.create("again", 64 * MiB);
      const adev = await d.pool.activate("again");
      await formatFilesystem(real, adev, "ext4", "again");
      await mountVolume(adev, "ext4", async (m2) => {
        await writeFile(join(m2, "f"), Buffer.alloc(8 * MiB, 2));
        await real.run("sync", ["-f", m2]);
      });
      for (const v of await d.pool.list()) {
        await d.pool.deactivate(v);
        await d.pool.remove(v);
      }
      await P.assertConsistent();
      await d.pool.close();
      await P.tearDownKernelSide();
    });
  });

  // ------------------------------------------------------------------ 3b. host filesystem full
  // The pool's directory on a 1 GiB ext4 of its own: the pool (4 GiB) can promise more than
  // the host holds, so it reserves host space ahead of use and stops where the host ends.
  describe("a host filesystem smaller than the pool", () => {
    let hostDir: string;
    let hostLoop = "";
    const P = new PoolUnderTest(`${PREFIX}-host`, 4 * GiB, () => hostDir);
    let d: Driver;
    let aMnt: string;
    let bMnt: string;

    const hostFree = async () => {
      const st = await statfs(hostDir);
      return st.bavail * st.bsize;
    };
    const allocated = async (f: string) => Number((await real.run("stat", ["-c", "%b", f])).stdout.trim()) * 512;

    before(async () => {
      pools.push(P);
      hostDir = join(base, "hostfs");
      await mkdir(hostDir, { recursive: true });
      const img = join(base, "hostfs.img");
      await real.run("truncate", ["-s", "1G", img]);
      await real.run("mkfs.ext4", ["-q", "-F", img]);
      hostLoop = (await real.run("losetup", ["--find", "--show", img])).stdout.trim();
      await mountDevice(real, hostLoop, hostDir, "ext4", []);
      await mkdir(P.dir, { recursive: true });
      const free0 = await hostFree();
      d = await P.open();
      const u = await d.pool.usage();
      note(`host fs: ${Math.round(free0 / MiB)} MiB free before the pool; pool reserved ${Math.round((u.hostReservedBytes ?? 0) / MiB)} MiB, host free after ${Math.round((u.hostFreeBytes ?? 0) / MiB)} MiB`);
      for (const [v, size] of [["a", GiB], ["b", 256 * MiB]] as const) {
        await d.pool.create(v, size);
        const dev = await d.pool.activate(v);
        await formatFilesystem(real, dev, "ext4", v);
      }
      aMnt = await P.mountpoint("a");
      bMnt = await P.mountpoint("b");
      await mountDevice(real, "/dev/mapper/" + P.name + "-a", aMnt, "ext4", baseMountOptions("ext4"));
      await mountDevice(real, "/dev/mapper/" + P.name + "-b", bMnt, "ext4", baseMountOptions("ext4"));
      await writeFile(join(bMnt, "keep"), Buffer.alloc(MiB, 7));
      await real.run("sync", ["-f", bMnt]);
    });

    after(async () => {
      for (const m of [aMnt, bMnt]) if (m && (await mountOptions(m)) !== "(not mounted)") await unmount(real, m).catch(() => undefined);
      await d?.pool.close().catch(() => undefined);
      await P.tearDownKernelSide().catch(() => undefined);
      if ((await mountOptions(hostDir)) !== "(not mounted)") await unmount(real, hostDir);
      if (hostLoop) await real.run("losetup", ["--detach", hostLoop]).catch(() => undefined);
      await rm(join(base, "hostfs.img"), { force: true });
    });

    test("the pool reserves host space: usage says how much, and how much the host has left", async () => {
      const u = await d.pool.usage();
      const files = (await allocated(join(P.dir, "data.img"))) + (await allocated(join(P.dir, "meta.img")));
      note(`usage: reserved ${u.hostReservedBytes} B (files hold ${files} B), host free ${u.hostFreeBytes} B, data ${u.dataUsedBytes}/${u.dataTotalBytes} B`);
      assert.equal(u.hostReservedBytes, files);
      assert.ok((u.hostReservedBytes ?? 0) > 512 * MiB, "more than the headroom is reserved");
      assert.ok((u.hostFreeBytes ?? Infinity) < 400 * MiB, "the host keeps only about its floor free");
      assert.equal(u.dataTotalBytes, 4 * GiB);
    });

    test("one volume fills the pool: its writes fail, the other volume keeps working, both stay read-write; freeing space brings writes back without a remount", async () => {
      const script = `
        const fs = require("fs");
        const fd = fs.openSync(process.argv[1], "w");
        const chunk = Buffer.alloc(4 << 20, 0xcd);
        let total = 0;
        for (;;) {
          try {
            fs.writeSync(fd, chunk);
            fs.fsyncSync(fd);
          } catch (e) {
            fs.writeSync(1, "err " + e.code + " " + total + "\\n");
            process.exit(0);
          }
          total += chunk.length;
          fs.writeSync(1, "ok " + total + "\\n");
        }
      `;
      const logsBefore = d.logs.length;
      const child = spawn(process.execPath, ["-e", script, join(aMnt, "fill")], { stdio: ["ignore", "pipe", "inherit"] });
      const lines: string[] = [];
      let hung = false;
      let watchdog = setTimeout(() => undefined, 0);
      const arm = () => {
        clearTimeout(watchdog);
        watchdog = setTimeout(() => {
          hung = true;
          child.kill("SIGKILL");
        }, 30_000);
      };
      arm();
      createInterface({ input: child.stdout }).on("line", (l) => {
        lines.push(l);
        arm();
      });
      await new Promise<void>((resolve) => child.on("exit", () => resolve()));
      clearTimeout(watchdog);
      const last = lines.at(-1) ?? "";
      note(`host-limited pool: filler stopped with "${last}"; pool status ${await P.rawStatus()}; host free ${Math.round((await hostFree()) / MiB)} MiB`);
      assert.ok(!hung, `a write hung for over 30 s; steps: ${lines.slice(-3).join(" | ")}`);
      const m = /^err (\S+) (\d+)$/.exec(last);
      assert.ok(m, `the filler ended with a write error, not: ${last}`);
      assert.ok(m[1] === "ENOSPC" || m[1] === "EIO", `the failing write says ENOSPC or EIO, not ${m[1]}`);
      note(`the failing write: ${m[1]} after ${Number(m[2]) / MiB} MiB`);
      assert.equal((await thinPoolStatus(real, P.poolDev)).mode, "out_of_data_space");
      const warnings = d.logs.slice(logsBefore).filter((l) => / warn dm-thin pool cannot reserve more host space/.test(l));
      note(`driver warnings while filling: ${warnings.length}: ${warnings[0] ?? ""}`);
      assert.ok(warnings.length <= 1, "warned at most once while the host stayed low");

      // The other volume: an existing file is rewritten in place (its blocks are already in the pool) and synced.
      const fd = await open(join(bMnt, "keep"), "r+");
      try {
        await fd.write(Buffer.alloc(MiB, 9), 0, MiB, 0);
        await fd.sync();
      } finally {
        await fd.close();
      }
      assert.deepEqual(await readFile(join(bMnt, "keep")), Buffer.alloc(MiB, 9));
      assert.match(await mountOptions(bMnt), /^rw/, "the other volume is still read-write");
      assert.match(await mountOptions(aMnt), /^rw/, `the full volume is still read-write; kernel:\n${(await kernelLines(/EXT4-fs|JBD2|Aborting/)).join("\n")}`);

      // Free space inside the full volume: no remount. Until the trim reaches the pool, writeback
      // of the rm's own metadata can still fail once more; syncfs reports each such error once.
      await rm(join(aMnt, "fill"));
      for (let i = 0; i < 2; i++) {
        const r = await real.run("sync", ["-f", aMnt], { okExitCodes: [1] });
        if (r.exitCode !== 0) note(`sync -f #${i + 1} after the rm reported an earlier lost write: ${r.stderr.trim()}`);
        await real.run("fstrim", [aMnt]);
      }
      await writeFile(join(aMnt, "again"), Buffer.alloc(16 * MiB, 1));
      await real.run("sync", ["-f", aMnt]);
      assert.match(await mountOptions(aMnt), /^rw/);
      assert.equal((await thinPoolStatus(real, P.poolDev)).mode, "rw");
      const aborted = (await kernelLines(/Aborting journal|Remounting filesystem read-only/)).filter((l) => !/Buffer I\/O/.test(l));
      assert.deepEqual(aborted, [], "no journal aborted");
      note("the full volume takes writes again after rm + fstrim, without a remount");
    });

    test("with the host filled from outside, creates are refused naming the host's free space; freeing the host lets them through", async () => {
      // Use most of the reservation, so the pool is below its headroom and needs the host.
      const u0 = await d.pool.usage();
      const spare = u0.dataTotalBytes > 0 ? (u0.hostReservedBytes ?? 0) - u0.dataUsedBytes - 400 * MiB : 0;
      if (spare > 0) {
        await writeFile(join(aMnt, "use"), Buffer.alloc(Math.floor(spare / MiB) * MiB, 5));
        await real.run("sync", ["-f", aMnt]);
      }
      const outside = join(hostDir, "outside");
      const free = await hostFree();
      await real.run("fallocate", ["--length", String(Math.max(MiB, free - 8 * MiB)), outside]);
      await assert.rejects(d.pool.create("refused", 64 * MiB), (err: Error) => {
        note(`create refused: ${err.message}`);
        assert.match(err.message, /host filesystem under .* has only .* free/);
        return true;
      });
      const u = await d.pool.usage();
      note(`with the host full: reserved ${Math.round((u.hostReservedBytes ?? 0) / MiB)} MiB, host free ${Math.round((u.hostFreeBytes ?? 0) / MiB)} MiB`);
      assert.ok((u.hostFreeBytes ?? Infinity) < 16 * MiB);
      await rm(outside);
      // The host is back at the pool's floor: the pool grows again only once its own data shrinks.
      await rm(join(aMnt, "use"), { force: true });
      await real.run("sync", ["-f", aMnt]);
      await real.run("fstrim", [aMnt]);
      await d.pool.create("later", 64 * MiB);
      assert.ok((await d.pool.list()).includes("later"));
      for (const mnt of [aMnt, bMnt]) await unmount(real, mnt);
      for (const v of ["a", "b"]) {
        const fsck = await real.run("e2fsck", ["-f", "-n", `/dev/mapper/${P.name}-${v}`], { okExitCodes: [1, 2, 4, 8] });
        assert.equal(fsck.exitCode, 0, `${v} is a clean filesystem: ${fsck.stdout}`);
      }
      for (const v of await d.pool.list()) {
        await d.pool.deactivate(v);
        await d.pool.remove(v);
      }
      await P.assertConsistent();
    });
  });

  // ------------------------------------------------------------------ 4. clones under write load
  describe("a clone of a mounted filesystem under write load", () => {
    const P = new PoolUnderTest(`${PREFIX}-load`, 2 * GiB);
    let d: Driver;

    before(async () => {
      pools.push(P);
      await mkdir(P.dir, { recursive: true });
      d = await P.open();
    });

    for (const fs of ["ext4", "xfs"] as const) {
      test(`${fs}: the clone is a clean filesystem and every file in it is a prefix of what was written`, async () => {
        const origin = `busy-${fs}`;
        const copy = `copy-${fs}`;
        await d.pool.create(origin, 1 * GiB);
        const dev = await d.pool.activate(origin);
        await formatFilesystem(real, dev, fs, origin);
        const mnt = await P.mountpoint(origin);
        await mountDevice(real, dev, mnt, fs, baseMountOptions(fs));
        const writer = startWriter(mnt);
        let completeBefore: number;
        try {
          await writer.until(30);
          completeBefore = writer.done;
          const t = Date.now();
          await d.pool.clone(copy, origin);
          const cloneMs = Date.now() - t;
          const doneAfter = writer.done;
          await writer.until(doneAfter + 10); // the origin keeps taking writes after the clone
          note(`${fs}: clone under load took ${cloneMs} ms; writer had finished ${completeBefore + 1} files before, ${writer.done + 1} by the end`);
        } finally {
          await writer.stop();
        }
        const cdev = await d.pool.activate(copy);
        if (fs === "xfs") {
          // A frozen xfs has a covered but not an unmounted log: xfs_repair -n stops at it. Only
          // a dirty log (and the lazy free-block counter it carries) may be reported before replay.
          const raw = await real.run("xfs_repair", ["-n", cdev], { okExitCodes: [1, 2] });
          const complaints = `${raw.stdout}\n${raw.stderr}`.split("\n").filter((l) => /^(ALERT|ERROR|sb_|agf_|agi_|bad|would|disconnected|entry|inode \d)/i.test(l.trim()));
          note(`xfs: xfs_repair -n of the clone before log replay: exit ${raw.exitCode}: ${complaints.join(" / ")}`);
          assert.ok(
            complaints.every((l) => /valuable metadata changes in a log|^sb_fdblocks \d+, counted \d+$|^sb_ifree \d+, counted \d+$|^sb_icount \d+, counted \d+$/.test(l.trim())),
            `before log replay xfs_repair -n finds only a dirty log: ${raw.stdout}\n${raw.stderr}`,
          );
          // Mounting replays the log (beside the mounted origin: needs nouuid), unmounting leaves it clean.
          await mountVolume(cdev, fs, async () => undefined);
        }
        const check =
          fs === "ext4"
            ? await real.run("e2fsck", ["-f", "-n", cdev], { okExitCodes: [1, 2, 4, 8] })
            : await real.run("xfs_repair", ["-n", cdev], { okExitCodes: [1, 2] });
        assert.equal(check.exitCode, 0, `${fs === "ext4" ? "e2fsck -f -n" : "xfs_repair -n"} of the clone: ${check.stdout}\n${check.stderr}`);
        // Mounted beside its origin; xfs volumes mount with nouuid since a clone carries its origin's UUID.
        const counts = await mountVolume(cdev, fs, (m) => checkWriterFiles(m, completeBefore));
        note(`${fs}: clone holds ${counts.files} files, ${counts.whole} whole, ${counts.partial} partial (prefixes)`);
        await unmount(real, mnt);
        await d.pool.deactivate(copy);
        await d.pool.deactivate(origin);
        await d.pool.remove(copy);
        await d.pool.remove(origin);
        await P.assertConsistent();
      });
    }

    after(async () => {
      await d.pool.close();
      await P.discard();
    });
  });

  // ------------------------------------------------------------------ cleanup
  test("nothing is left behind: no dm devices, no loop devices, no mounts", async () => {
    for (const p of pools) await p.tearDownKernelSide();
    assert.deepEqual((await dmNames()).filter((n) => n.startsWith(PREFIX)), []);
    assert.deepEqual(await loopDevicesUnder(base), []);
    assert.deepEqual(await mountsUnder(base), []);
  });
});
