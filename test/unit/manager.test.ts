import assert from "node:assert/strict";
import { mkdtemp, readdir, rm, stat, writeFile, mkdir } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, test } from "node:test";
import { silentLogger } from "../../src/log.js";
import type { MountEntry } from "../../src/system/mount.js";
import { VolumeManager } from "../../src/volumes/manager.js";
import { RecordStore, type VolumeRecord } from "../../src/volumes/records.js";
import { FakePool } from "../support/fake-pool.js";
import { FakeRunner } from "../support/fake-runner.js";

describe("volume lifecycle", () => {
  let dir: string;
  let pool: FakePool;
  let records: RecordStore;
  let mounts: MountEntry[];
  let runner: FakeRunner;

  const manager = (minFreePercent = 10) =>
    new VolumeManager({
      pool,
      records,
      runner,
      log: silentLogger,
      mountDir: join(dir, "mnt"),
      defaultSizeBytes: 1024 ** 3,
      defaultFs: "ext4",
      minFreePercent,
      readMounts: async () => mounts,
    });

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), "thinvol-manager-"));
    pool = new FakePool();
    records = new RecordStore(join(dir, "volumes"));
    await records.init();
    mounts = [];
    // mount and umount change the fake mount table; a fresh filesystem has lost+found.
    runner = new FakeRunner(async (cmd, args) => {
      if (cmd === "mount") {
        const target = args[args.length - 1] ?? "";
        mounts.push({ device: "7:0", mountPoint: target, fsType: args[1] ?? "", source: args[args.length - 2] ?? "" });
        await mkdir(join(target, "lost+found"), { recursive: true });
      }
      if (cmd === "umount") mounts = mounts.filter((m) => m.mountPoint !== args[0]);
      return "";
    });
  });
  afterEach(() => rm(dir, { recursive: true, force: true }));

  test("create makes a filesystem of the default size, leaves the root empty and unmounted", async () => {
    const m = manager();
    await m.create("db", null);
    assert.equal(await pool.sizeOf("db"), 1024 ** 3);
    assert.ok(runner.lines().some((l) => l.startsWith("mkfs.ext4") && l.endsWith("/dev/fake/db")));
    assert.deepEqual(await readdir(join(dir, "mnt", "db")), []);
    assert.deepEqual(mounts, []);
    assert.deepEqual(pool.active(), []);
    const info = await m.get("db");
    assert.equal(info.status["size"], "1 GiB");
    assert.equal(info.status["filesystem"], "ext4");
    assert.match(info.createdAt, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/);
    assert.equal(info.mountpoint, undefined);
  });

  test("create is idempotent", async () => {
    const m = manager();
    await m.create("db", { size: "64M" });
    await m.create("db", { size: "64M" });
    assert.equal(runner.lines().filter((l) => l.startsWith("mkfs")).length, 1);
  });

  test("uid, gid and mode are applied to the volume's root", async () => {
    const m = manager();
    await m.create("owned", { mode: "0750", uid: String(process.getuid?.() ?? 0) });
    assert.equal((await stat(join(dir, "mnt", "owned"))).mode & 0o7777, 0o750);
  });

  test("a failed pool create leaves no record, and the error names the volume and the cause", async () => {
    const m = manager();
    pool.failNext = "dmsetup message failed: No space left on device";
    await assert.rejects(m.create("db", null), /cannot create volume "db": dmsetup message failed: No space left on device/);
    assert.deepEqual(await records.names(), []);
    assert.deepEqual(await pool.list(), []);
  });

  test("a clone of a missing volume is refused and creates nothing", async () => {
    const m = manager();
    await assert.rejects(m.create("copy", { from: "ghost" }), /cannot create volume "copy" as a clone of "ghost": volume "ghost" does not exist/);
    assert.deepEqual(await records.names(), []);
  });

  test("a clone keeps its origin's size and filesystem and records its origin", async () => {
    const m = manager();
    await m.create("origin", { size: "512M", fs: "xfs" });
    await m.create("copy", { from: "origin" });
    assert.equal(await pool.sizeOf("copy"), 512 * 1024 ** 2);
    const info = await m.get("copy");
    assert.equal(info.status["origin"], "origin");
    assert.equal(info.status["filesystem"], "xfs");
    assert.equal(runner.lines().filter((l) => l.startsWith("mkfs")).length, 1, "a clone is not formatted");
    await assert.rejects(m.create("copy2", { from: "origin", size: "1G" }), /a clone has its origin's size \(512 MiB\)/);
  });

  test("a clone of a mounted volume tells the pool where it is mounted, so it can be frozen", async () => {
    const m = manager();
    await m.create("origin", null);
    const mp = await m.mount("origin", "c1");
    await m.create("copy", { from: "origin" });
    assert.deepEqual(pool.clones[0]?.options, { originMountpoint: mp });
  });

  test("creates are refused when the pool is short of space, naming the figures", async () => {
    const m = manager(10);
    pool.dataUsedBytes = pool.dataTotalBytes * 0.95;
    await assert.rejects(m.create("db", null), /cannot create volume "db": the loop pool has 5.0% free \(5 GiB of 100 GiB\), under MIN_FREE_SPACE=10%/);
    assert.deepEqual(await records.names(), []);
  });

  test("one mount ID twice and a second ID share one mount; the last unmount tears it down", async () => {
    const m = manager();
    await m.create("v", null);
    const a = await m.mount("v", "c1");
    const b = await m.mount("v", "c1");
    const c = await m.mount("v", "c2");
    assert.equal(a, b);
    assert.equal(a, c);
    assert.equal(runner.lines().filter((l) => l.startsWith("mount") && l.endsWith(a)).length, 2, "one mount at create, one now");
    await m.unmount("v", "c1");
    await m.unmount("v", "c2");
    assert.equal(await m.path("v"), a, "c1 still holds one reference");
    await m.unmount("v", "c1");
    assert.equal(await m.path("v"), undefined);
    assert.deepEqual(pool.active(), []);
  });

  test("mount options from the volume are used on every mount", async () => {
    const m = manager();
    await m.create("v", { mountopts: "noatime,nodev" });
    await m.mount("v", "c1");
    assert.ok(runner.lines().some((l) => l === `mount -t ext4 -o noinit_itable,noatime,nodev /dev/fake/v ${join(dir, "mnt", "v")}`));
  });

  test("remove forces the unmount, deletes the pool volume and the record, and is idempotent", async () => {
    const m = manager();
    await m.create("v", null);
    await m.mount("v", "c1");
    await m.remove("v");
    assert.deepEqual(mounts, []);
    assert.deepEqual(await pool.list(), []);
    assert.deepEqual(await records.names(), []);
    await m.remove("v");
    await assert.rejects(m.get("v"), /volume "v" does not exist/);
  });

  test("list shows ready volumes with their mountpoint when mounted", async () => {
    const m = manager();
    await m.create("a", null);
    await m.create("b", null);
    const mp = await m.mount("b", "x");
    assert.deepEqual(await m.list(), [
      { name: "a", createdAt: (await records.get("a"))?.createdAt },
      { name: "b", createdAt: (await records.get("b"))?.createdAt, mountpoint: mp },
    ]);
  });

  describe("recovery at start-up", () => {
    const base = (name: string, state: VolumeRecord["state"], mounts: Record<string, number> = {}): VolumeRecord => ({
      version: 1,
      name,
      state,
      createdAt: "2026-01-01T00:00:00.000Z",
      sizeBytes: 1024 ** 3,
      fs: "ext4",
      mountOptions: [],
      mounts,
    });

    test("an interrupted create is undone: no pool volume, no record", async () => {
      await pool.create("half", 1024 ** 3);
      await records.save(base("half", "creating"));
      await manager().recover();
      assert.deepEqual(await pool.list(), []);
      assert.deepEqual(await records.names(), []);
    });

    test("an interrupted remove is finished", async () => {
      await pool.create("going", 1024 ** 3);
      await records.save(base("going", "removing"));
      await manager().recover();
      assert.deepEqual(await pool.list(), []);
      assert.deepEqual(await records.names(), []);
    });

    test("references whose mount is gone (a daemon restart) are dropped and the device released", async () => {
      await pool.create("stale", 1024 ** 3);
      await pool.activate("stale");
      await records.save(base("stale", "ready", { c1: 2 }));
      const m = manager();
      await m.recover();
      assert.deepEqual((await records.get("stale"))?.mounts, {});
      assert.deepEqual(pool.active(), []);
      // And the volume mounts normally afterwards.
      await m.mount("stale", "c2");
      await m.unmount("stale", "c2");
      assert.deepEqual(mounts, []);
    });

    test("a volume still mounted with references (a plugin crash) is kept as it is", async () => {
      await pool.create("busy", 1024 ** 3);
      await pool.activate("busy");
      await records.save(base("busy", "ready", { c1: 1 }));
      mounts.push({ device: "7:0", mountPoint: join(dir, "mnt", "busy"), fsType: "ext4", source: "/dev/fake/busy" });
      const m = manager();
      await m.recover();
      assert.deepEqual((await records.get("busy"))?.mounts, { c1: 1 });
      assert.equal(await m.path("busy"), join(dir, "mnt", "busy"));
      await m.unmount("busy", "c1");
      assert.deepEqual(mounts, []);
    });

    test("a mount that no reference explains is unmounted", async () => {
      await pool.create("loose", 1024 ** 3);
      await records.save(base("loose", "ready"));
      mounts.push({ device: "7:0", mountPoint: join(dir, "mnt", "loose"), fsType: "ext4", source: "/dev/fake/loose" });
      await manager().recover();
      assert.deepEqual(mounts, []);
    });

    test("a volume in the pool without a record is kept, never deleted", async () => {
      await pool.create("orphan", 1024 ** 3);
      await manager().recover();
      assert.deepEqual(await pool.list(), ["orphan"]);
    });

    test("a damaged record stops nothing else and is reported by name", async () => {
      await pool.create("good", 1024 ** 3);
      await records.save(base("good", "ready"));
      await writeFile(join(dir, "volumes", "bad.json"), "{");
      const m = manager();
      await m.recover();
      assert.deepEqual((await m.list()).map((v) => v.name), ["good"]);
    });
  });
});
