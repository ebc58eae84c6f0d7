/**
 * POOL_DEVICE on a real kernel: the server bundle keeps its dm-thin pool's data on a block
 * device. A loop device over a file on a tmpfs stands in for the disk. Run as root inside
 * the VM (build the bundle first):
 *   npm run vm -- node --import tsx --test test/vm/dmthin-device.test.ts
 */
import assert from "node:assert/strict";
import { mkdir, mkdtemp, open, readFile, readdir, rm, stat, truncate, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, join } from "node:path";
import { after, before, describe, test } from "node:test";
import { ExecaRunner } from "../../src/system/runner.js";
import { dmDevicesNamed, loopDevicesUnder, mountsUnder, tearDownPool } from "../support/kernel.js";
import { BUNDLE, callOk, startServer, stopServer, serverEnv, type ServerProcess } from "../support/plugin-client.js";

const MiB = 1024 ** 2;
const DISK_BYTES = 1024 * MiB;
/** The server's dm devices: `thinvol-pool`, `thinvol-<volume>`. */
const DM_PREFIX = "thinvol-";
const runner = new ExecaRunner();

let base: string;
let dir: string;
let disks: string;
/** The disk stand-in the pool takes: a loop device the test attached. */
let disk: string;
let env: Record<string, string>;
let sock: string;
let server: ServerProcess | undefined;
const attached: string[] = [];

/** A file on the tmpfs, on a loop device the test owns, as a disk would be. */
async function makeDisk(name: string): Promise<string> {
  const file = join(disks, name);
  await writeFile(file, "");
  await truncate(file, DISK_BYTES);
  const dev = (await runner.run("losetup", ["--find", "--show", file])).stdout.trim();
  attached.push(dev);
  return dev;
}

const create = (Name: string, Opts: Record<string, string> | null = null) => callOk(sock, "VolumeDriver.Create", { Name, Opts });
const mount = async (Name: string, ID: string) => String((await callOk(sock, "VolumeDriver.Mount", { Name, ID }))["Mountpoint"]);
const unmount = (Name: string, ID: string) => callOk(sock, "VolumeDriver.Unmount", { Name, ID });

/** Written and fdatasync'd, as a database would. */
async function writeSynced(path: string, text: string): Promise<void> {
  const h = await open(path, "w");
  try {
    await h.writeFile(text);
    await h.datasync();
  } finally {
    await h.close();
  }
}

/** `major:minor` of a block device, as sysfs and dm tables show it. */
async function numberOf(dev: string): Promise<string> {
  return (await readFile(`/sys/class/block/${basename(dev)}/dev`, "utf8")).trim();
}

describe("dm-thin pool on a block device (POOL_DEVICE) through the server", () => {
  before(async () => {
    base = await mkdtemp(join(process.env["THINVOL_TEST_TMP"] ?? tmpdir(), "thinvol-dmdev-"));
    dir = join(base, "plugin");
    disks = join(base, "disks");
    await mkdir(dir);
    await mkdir(disks);
    await runner.run("mount", ["-t", "tmpfs", "-o", "size=3g", "tmpfs", disks]);
    disk = await makeDisk("disk.img");
    sock = join(dir, "thinvol.sock");
    // POOL_SIZE far beyond the device: it must be ignored.
    env = serverEnv(dir, { POOL_DRIVER: "dm-thin", POOL_DEVICE: disk, POOL_SIZE: "50G" });
  });

  after(async () => {
    if (server) await stopServer(server, "SIGKILL");
    for (const m of (await mountsUnder(join(dir, "volumes"))).reverse()) await runner.run("umount", [m]).catch(() => undefined);
    await tearDownPool(dir, DM_PREFIX).catch(() => undefined);
    for (const d of attached) await runner.run("losetup", ["--detach", d]).catch(() => undefined);
    await runner.run("umount", [disks]).catch(() => undefined);
    await rm(base, { recursive: true, force: true });
  });

  test("the pool takes the device whole, its data is on no loop device of a file, and POOL_SIZE is ignored", async () => {
    server = await startServer(BUNDLE, env);
    assert.match(server.output(), /POOL_SIZE is ignored/);
    await create("db", { size: "256M" });
    const status = ((await callOk(sock, "VolumeDriver.Get", { Name: "db" }))["Volume"] as { Status: Record<string, unknown> }).Status;
    assert.equal(status["poolSizeBytes"], DISK_BYTES, "the pool is as long as the device");
    assert.equal(status["hostReservedBytes"], undefined, "nothing is reserved on the host for data");
    const table = (await runner.run("dmsetup", ["table", `${DM_PREFIX}pool`])).stdout.trim().split(/\s+/);
    assert.equal(table[2], "thin-pool");
    assert.equal(table[4], await numberOf(disk), `the pool's data device is ${disk}: ${table.join(" ")}`);
    const poolDir = join(dir, "state", "pool-dm-thin");
    assert.deepEqual((await readdir(poolDir)).filter((f) => f.endsWith(".img")), ["meta.img"], "no data file");
    assert.equal((await loopDevicesUnder(poolDir)).length, 1, "one loop device: the metadata's");
    const state = JSON.parse(await readFile(join(poolDir, "dmthin-state.json"), "utf8")) as { dataDevice?: { path: string; sizeBytes: number; ids: string[] } };
    assert.deepEqual(state.dataDevice, { setting: disk, path: disk, sizeBytes: DISK_BYTES, ids: [] });
  });

  test("data written and fsync'd survives a clean restart and a killed server", async () => {
    const mp = await mount("db", "c1");
    await writeSynced(join(mp, "row"), "committed\n".repeat(1000));
    assert.ok(server);
    assert.equal(await stopServer(server, "SIGTERM"), 0);
    server = await startServer(BUNDLE, env);
    assert.equal((await callOk(sock, "VolumeDriver.Path", { Name: "db" }))["Mountpoint"], mp, "still mounted after a clean restart");
    assert.equal(await readFile(join(mp, "row"), "utf8"), "committed\n".repeat(1000));
    await writeSynced(join(mp, "row2"), "second");
    await stopServer(server, "SIGKILL");
    server = await startServer(BUNDLE, env);
    assert.equal(await readFile(join(mp, "row2"), "utf8"), "second");
    await unmount("db", "c1");
    // Unmounted and brought back from the device after a restart.
    await stopServer(server, "SIGKILL");
    server = await startServer(BUNDLE, env);
    const again = await mount("db", "c1");
    assert.equal(await readFile(join(again, "row"), "utf8"), "committed\n".repeat(1000));
    await unmount("db", "c1");
  });

  test("a clone holds the origin's data and diverges; remove returns the space", async () => {
    const omp = await mount("db", "c1");
    await create("copy", { from: "db" });
    await writeFile(join(omp, "row"), "changed in db");
    const cmp = await mount("copy", "c2");
    assert.equal(await readFile(join(cmp, "row"), "utf8"), "committed\n".repeat(1000));
    await unmount("copy", "c2");
    await unmount("db", "c1");
    await callOk(sock, "VolumeDriver.Remove", { Name: "copy" });
    await callOk(sock, "VolumeDriver.Remove", { Name: "db" });
    assert.deepEqual((await callOk(sock, "VolumeDriver.List"))["Volumes"], []);
  });

  test("a clean stop takes the pool down and leaves the device attached only by the test, held by nothing", async () => {
    await create("left");
    assert.ok(server);
    assert.equal(await stopServer(server, "SIGTERM"), 0);
    server = undefined;
    assert.deepEqual(await dmDevicesNamed(DM_PREFIX), []);
    assert.deepEqual(await loopDevicesUnder(join(dir, "state")), [], "the metadata's loop device is detached");
    assert.deepEqual(await readdir(`/sys/class/block/${basename(disk)}/holders`), [], `${disk} is held by nothing`);
    const backing = (await runner.run("losetup", ["--list", "--noheadings", "--output", "NAME", "--associated", join(disks, "disk.img")])).stdout.trim();
    assert.equal(backing, disk, "the test's own loop device is still there, and no other");
    // And it comes back with its volume.
    server = await startServer(BUNDLE, env);
    assert.deepEqual(((await callOk(sock, "VolumeDriver.List"))["Volumes"] as { Name: string }[]).map((v) => v.Name), ["left"]);
    await stopServer(server, "SIGTERM");
    server = undefined;
  });

  test("a device holding an ext4 filesystem is refused, naming it, and is left as it was", async () => {
    const full = await makeDisk("ext4.img");
    await runner.run("mkfs.ext4", ["-q", "-L", "precious", full]);
    const other = join(base, "other");
    await mkdir(other);
    const otherEnv = serverEnv(other, { POOL_DRIVER: "dm-thin", POOL_DEVICE: full });
    await assert.rejects(startServer(BUNDLE, otherEnv), (err: Error) => {
      assert.ok(err.message.includes(`POOL_DEVICE ${full} is not empty`), err.message);
      assert.match(err.message, /ext4 filesystem/);
      assert.ok(err.message.includes(`wipefs -a ${full}`), err.message);
      return true;
    });
    assert.deepEqual(await dmDevicesNamed(DM_PREFIX), [], "no pool was made");
    await assert.rejects(stat(join(other, "state", "pool-dm-thin", "dmthin-state.json")), "no state was written");
    const probe = await runner.run("blkid", ["-p", "-o", "export", full]);
    assert.match(probe.stdout, /TYPE=ext4/);
    assert.match(probe.stdout, /LABEL=precious/);
  });
});
