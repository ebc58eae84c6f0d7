/**
 * The dm-thin driver on a real kernel. Run as root inside the VM:
 *   npm run vm -- node --import tsx --test test/vm/dmthin-smoke.test.ts
 */
import assert from "node:assert/strict";
import { mkdir, mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { createLogger } from "../../src/log.js";
import { DmThinPool, dmThinAvailable } from "../../src/pool/dmthin/index.js";
import { deviceSizeBytes } from "../../src/system/blockdev.js";
import { formatFilesystem } from "../../src/system/filesystem.js";
import { mountDevice, unmount } from "../../src/system/mount.js";
import { ExecaRunner } from "../../src/system/runner.js";
import { withMount } from "../support/kernel.js";

const MiB = 1024 ** 2;
const GiB = 1024 ** 3;
const NAME = "tvsmoke";
const runner = new ExecaRunner();
const log = createLogger(process.env["LOG_LEVEL"] === "debug" ? "debug" : "warn");

let base: string;
let dir: string;
let pool: DmThinPool;

const timings: string[] = [];
async function timed<T>(what: string, work: () => Promise<T>): Promise<T> {
  const t = Date.now();
  const r = await work();
  timings.push(`${what}: ${Date.now() - t} ms`);
  return r;
}

const makePool = () => new DmThinPool({ runner, dir, dataSizeBytes: GiB, log, name: NAME });

/** dm devices and loop devices that belong to this test's pool. */
async function leftovers(): Promise<string[]> {
  const dm = (await runner.run("dmsetup", ["ls"])).stdout
    .split("\n")
    .map((l) => l.split(/\s+/)[0] ?? "")
    .filter((n) => n.startsWith(`${NAME}-`));
  const loops = (await runner.run("losetup", ["--list", "--noheadings", "--raw", "--output", "NAME,BACK-FILE"])).stdout
    .split("\n")
    .filter((l) => l.includes(dir));
  return [...dm, ...loops];
}

/** What a host reboot does: every dm device of the pool and its loop devices go away. */
async function tearDownKernelSide(): Promise<void> {
  const names = (await runner.run("dmsetup", ["ls"])).stdout
    .split("\n")
    .map((l) => l.split(/\s+/)[0] ?? "")
    .filter((n) => n.startsWith(`${NAME}-`));
  // Volumes before the pool they live in.
  for (const n of names.filter((n) => n !== `${NAME}-pool`)) await runner.run("dmsetup", ["remove", "--noudevsync", n]);
  if (names.includes(`${NAME}-pool`)) await runner.run("dmsetup", ["remove", "--noudevsync", `${NAME}-pool`]);
  for (const file of ["data.img", "meta.img"]) {
    const { stdout } = await runner.run("losetup", ["--list", "--noheadings", "--output", "NAME", "--associated", join(dir, file)]);
    for (const dev of stdout.split("\n").map((l) => l.trim()).filter(Boolean)) await runner.run("losetup", ["--detach", dev]);
  }
}

function withMountHere<T>(device: string, work: (mnt: string) => Promise<T>): Promise<T> {
  return withMount(device, base, work);
}

describe("dm-thin on a real kernel", () => {
  before(async () => {
    base = await mkdtemp(join(process.env["THINVOL_TEST_TMP"] ?? tmpdir(), "thinvol-dmthin-smoke-"));
    dir = join(base, "pool");
    await mkdir(dir);
  });

  after(async () => {
    await tearDownKernelSide().catch(() => undefined);
    await rm(base, { recursive: true, force: true });
    console.log(`timings:\n  ${timings.join("\n  ")}`);
  });

  test("the kernel has dm-thin", async () => {
    assert.equal(await timed("dmThinAvailable", () => dmThinAvailable(runner, log, base)), true);
  });

  test("open makes the pool with its headroom reserved on the host, not all of POOL_SIZE", async () => {
    pool = makePool();
    await timed("open (new pool)", () => pool.open());
    const u = await pool.usage();
    assert.equal(u.dataTotalBytes, GiB);
    assert.equal(u.dataUsedBytes, 0);
    // A 1 GiB pool's headroom is 512 MiB; a new pool reserves twice that, capped by its size.
    const reserved = (await stat(join(dir, "data.img"))).blocks * 512;
    assert.ok(reserved >= 512 * MiB && reserved <= GiB, `the data file holds ${reserved} bytes on the host`);
    assert.equal(u.hostReservedBytes, reserved + (await stat(join(dir, "meta.img"))).blocks * 512);
  });

  test("create, activate, mkfs, mount, write", async () => {
    await timed("create", () => pool.create("db", 256 * MiB));
    const dev = await timed("activate", () => pool.activate("db"));
    assert.equal(dev, `/dev/mapper/${NAME}-db`);
    assert.ok((await stat(dev)).isBlockDevice());
    assert.equal(await deviceSizeBytes(runner, dev), 256 * MiB);
    await timed("mkfs.ext4", () => formatFilesystem(runner, dev, "ext4", "db"));
    await withMountHere(dev, (m) => writeFile(join(m, "hello.txt"), "from db\n".repeat(1000)));
    const mnt = join(base, "db-mnt");
    await mkdir(mnt);
    await mountDevice(runner, dev, mnt, "ext4", []);
    await writeFile(join(mnt, "blob"), Buffer.alloc(16 * MiB, 9));
    await runner.run("sync", []);
    assert.ok((await pool.allocatedBytes("db")) >= 16 * MiB);
  });

  test("clone of the mounted volume has its data; the origin stays writable", async () => {
    const mnt = join(base, "db-mnt");
    const usedBefore = (await pool.usage()).dataUsedBytes;
    await timed("clone (origin mounted)", () => pool.clone("copy", "db"));
    const usedAfter = (await pool.usage()).dataUsedBytes;
    assert.ok(usedAfter - usedBefore < 4 * MiB, `the clone shares its blocks: ${usedBefore} → ${usedAfter} bytes used`);
    await writeFile(join(mnt, "after-clone.txt"), "only in db");
    await unmount(runner, mnt);
    const dev = await pool.activate("copy");
    const check = await runner.run("e2fsck", ["-f", "-n", dev], { okExitCodes: [1, 4] });
    assert.equal(check.exitCode, 0, `fsck of the clone: ${check.stdout}${check.stderr}`);
    await withMountHere(dev, async (m) => {
      assert.equal(await readFile(join(m, "hello.txt"), "utf8"), "from db\n".repeat(1000));
      assert.equal((await stat(join(m, "blob"))).size, 16 * MiB);
      await assert.rejects(stat(join(m, "after-clone.txt")));
    });
  });

  test("after a reboot-like teardown, a new driver finds both volumes and their data", async () => {
    await pool.close();
    await tearDownKernelSide();
    assert.deepEqual(await leftovers(), []);
    pool = makePool();
    await timed("open (after teardown: losetup, thin_check, create pool)", () => pool.open());
    assert.deepEqual(await pool.list(), ["copy", "db"]);
    const dev = await pool.activate("db");
    await withMountHere(dev, async (m) => assert.equal(await readFile(join(m, "after-clone.txt"), "utf8"), "only in db"));
    // A restart with the pool still live reuses it.
    await pool.close();
    pool = makePool();
    await timed("open (pool live)", () => pool.open());
    assert.deepEqual(await pool.list(), ["copy", "db"]);
  });

  test("the pool grows when asked", async () => {
    await pool.close();
    pool = new DmThinPool({ runner, dir, dataSizeBytes: 2 * GiB, log, name: NAME });
    await timed("open (grow 1 → 2 GiB, live)", () => pool.open());
    assert.equal((await pool.usage()).dataTotalBytes, 2 * GiB);
    assert.equal(await deviceSizeBytes(runner, `/dev/mapper/${NAME}-db`), 256 * MiB);
  });

  test("remove returns the space to the pool, keeps the host space reserved for it, and leaves nothing behind", async () => {
    const fileBefore = (await stat(join(dir, "data.img"))).blocks * 512;
    assert.ok((await pool.usage()).dataUsedBytes >= 16 * MiB, "the volumes hold data before they are removed");
    await timed("remove db (active)", () => pool.remove("db"));
    await timed("remove copy (active)", () => pool.remove("copy"));
    await pool.remove("copy");
    assert.deepEqual(await pool.list(), []);
    const u = await pool.usage();
    assert.equal(u.dataUsedBytes, 0);
    const fileAfter = (await stat(join(dir, "data.img"))).blocks * 512;
    assert.equal(fileAfter, fileBefore, "the data file keeps its reservation (no_discard_passdown)");
    const dmLeft = (await runner.run("dmsetup", ["ls"])).stdout.split("\n").filter((l) => l.startsWith(`${NAME}-`) && !l.startsWith(`${NAME}-pool`));
    assert.deepEqual(dmLeft, []);
    await pool.close();
    await tearDownKernelSide();
    assert.deepEqual(await leftovers(), []);
  });
});
