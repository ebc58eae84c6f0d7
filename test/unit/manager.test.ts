import assert from "node:assert/strict";
import { chown, mkdtemp, readdir, rm, stat, writeFile, mkdir } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, test } from "node:test";
import { silentLogger } from "../../src/log.js";
import type { MountEntry } from "../../src/system/mount.js";
import { VolumeManager } from "../../src/volumes/manager.js";
import { RecordStore, type VolumeRecord } from "../../src/volumes/records.js";
import { FakePool } from "../support/fake-pool.js";
import { FakeRunner, commandFailure } from "../support/fake-runner.js";

describe("volume lifecycle", () => {
  let dir: string;
  let pool: FakePool;
  let records: RecordStore;
  let mounts: MountEntry[];
  let runner: FakeRunner;
  /** umount fails this many more times, as it does while a process keeps a file open. */
  let busyUmounts: number;

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
    busyUmounts = 0;
    // mount and umount change the fake mount table; a fresh filesystem has lost+found.
    runner = new FakeRunner(async (cmd, args) => {
      if (cmd === "mount") {
        const target = args[args.length - 1] ?? "";
        mounts.push({ device: "7:0", mountPoint: target, fsType: args[1] ?? "", source: args[args.length - 2] ?? "" });
        await mkdir(join(target, "lost+found"), { recursive: true });
      }
      if (cmd === "umount") {
        const target = args[args.length - 1] ?? "";
        if (busyUmounts > 0) {
          busyUmounts--;
          return commandFailure(`umount: ${target}: target is busy.`, 32);
        }
        mounts = mounts.filter((m) => m.mountPoint !== target);
      }
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

  test("a create the pool refuses for space gives the pool's reason and leaves no record", async () => {
    const m = manager(10);
    pool.failNext = 'cannot create volume "db": the loop pool has 5.0% free (5 GiB of 100 GiB), under MIN_FREE_SPACE=10%';
    await assert.rejects(m.create("db", null), /cannot create volume "db": the loop pool has 5.0% free \(5 GiB of 100 GiB\), under MIN_FREE_SPACE=10%/);
    assert.deepEqual(await records.names(), []);
    assert.deepEqual(await pool.list(), []);
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

  describe("a failure never loses, hides or half-makes a volume", () => {
    const isRoot = process.getuid?.() === 0;

    test("Create of a name the pool already holds is refused, names the orphan, keeps its data and writes nothing", async () => {
      await pool.create("orphan", 1024 ** 3);
      pool.volumes.get("orphan")!.data = "someone's rows";
      const m = manager();
      await assert.rejects(m.create("orphan", null), /cannot create volume "orphan": the loop pool already holds data under that name with no record/);
      assert.equal(pool.volumes.get("orphan")?.data, "someone's rows");
      assert.deepEqual(await records.names(), []);
      assert.equal(runner.lines().filter((l) => l.startsWith("mkfs")).length, 0);
      // A clone under that name is refused the same way.
      await m.create("src", null);
      await assert.rejects(m.create("orphan", { from: "src" }), /already holds data under that name/);
      assert.equal(pool.volumes.get("orphan")?.data, "someone's rows");
      // And the next start keeps it too.
      await manager().recover();
      assert.deepEqual(await pool.list(), ["orphan", "src"]);
    });

    test("a Remove whose unmount is refused (busy) leaves the volume listed, gettable and mountable, also after a restart", async () => {
      const m = manager();
      await m.create("v", null);
      const mp = await m.mount("v", "c1");
      busyUmounts = 1;
      await assert.rejects(m.remove("v"), /cannot remove volume "v": .*target is busy/);
      assert.deepEqual((await m.list()).map((x) => x.name), ["v"]);
      assert.equal((await m.get("v")).mountpoint, mp);
      assert.equal(await m.mount("v", "c2"), mp);
      await m.unmount("v", "c2");
      const again = manager();
      await again.recover();
      assert.deepEqual((await again.list()).map((x) => x.name), ["v"]);
      assert.deepEqual(await pool.list(), ["v"]);
      await again.unmount("v", "c1");
      assert.deepEqual(mounts, [], "c1's reference was kept through the failed remove");
    });

    test("a Remove the pool refuses (busy device) keeps the volume listed and mountable, also after a restart", async () => {
      const m = manager();
      await m.create("v", null);
      pool.volumes.get("v")!.data = "rows";
      await m.mount("v", "c1");
      pool.failRemoveNext = "device /dev/loop9 is busy";
      await assert.rejects(m.remove("v"), /cannot remove volume "v": device \/dev\/loop9 is busy/);
      assert.deepEqual((await m.list()).map((x) => x.name), ["v"]);
      assert.equal((await m.get("v")).status["mounts"], 0, "the forced unmount took the references with it");
      await manager().recover();
      const again = manager();
      assert.deepEqual((await again.list()).map((x) => x.name), ["v"]);
      assert.equal(pool.volumes.get("v")?.data, "rows");
      await again.mount("v", "c2");
      await again.unmount("v", "c2");
      assert.deepEqual(mounts, []);
      await again.remove("v");
      assert.deepEqual(await pool.list(), []);
    });

    test("an interrupted remove that cannot be finished at start-up puts the volume back", async () => {
      await pool.create("going", 1024 ** 3);
      await records.save({
        name: "going", state: "removing", createdAt: "2026-01-01T00:00:00.000Z", sizeBytes: 1024 ** 3, fs: "ext4", mountOptions: [], mounts: new Map(),
      });
      pool.failRemoveNext = "device busy";
      const m = manager();
      await m.recover();
      assert.deepEqual((await m.list()).map((x) => x.name), ["going"]);
      assert.equal((await records.get("going"))?.state, "ready");
    });

    test("an Unmount whose teardown fails still drops the reference, so a later Unmount unmounts", async () => {
      const m = manager();
      await m.create("v", null);
      const mp = await m.mount("v", "c1");
      busyUmounts = 1;
      await assert.rejects(m.unmount("v", "c1"), /cannot unmount volume "v": .*target is busy/);
      assert.equal((await m.get("v")).status["mounts"], 0);
      await m.mount("v", "c2");
      await m.unmount("v", "c2");
      assert.equal(await m.path("v"), undefined, `${mp} is still mounted`);
      assert.deepEqual(pool.active(), []);
    });

    test("mount IDs named like Object.prototype's members are counted like any other, also across a restart", async () => {
      const m = manager();
      await m.create("v", null);
      const ids = ["__proto__", "toString", "constructor", "hasOwnProperty"];
      for (const id of ids) await m.mount("v", id);
      await m.mount("v", "toString");
      assert.equal((await m.get("v")).status["mounts"], 5);
      const again = manager();
      await again.recover();
      assert.equal((await again.get("v")).status["mounts"], 5);
      for (const id of ids) await again.unmount("v", id);
      assert.ok(await again.path("v"), "toString mounted twice and still holds one reference");
      await again.unmount("v", "toString");
      assert.equal(await again.path("v"), undefined);
      assert.deepEqual(pool.active(), []);
    });

    test("a record written as version 1 (mount IDs as object keys) still loads and its references count", async () => {
      await pool.create("old", 1024 ** 3);
      await pool.activate("old");
      const mp = join(dir, "mnt", "old");
      mounts.push({ device: "7:0", mountPoint: mp, fsType: "ext4", source: "/dev/fake/old" });
      await writeFile(
        join(dir, "volumes", "old.json"),
        JSON.stringify({
          version: 1, name: "old", state: "ready", createdAt: "2026-01-01T00:00:00.000Z", sizeBytes: 1024 ** 3, fs: "ext4",
          mountOptions: [], mounts: { c1: 2, c2: 1 },
        }),
      );
      const m = manager();
      await m.recover();
      assert.equal((await m.get("old")).status["mounts"], 3);
      await m.unmount("old", "c1");
      await m.unmount("old", "c2");
      assert.equal(await m.path("old"), mp);
      await m.unmount("old", "c1");
      assert.equal(await m.path("old"), undefined);
    });

    test("a clone made with only a uid keeps its origin root's group", { skip: !isRoot && "chown needs root" }, async () => {
      const m = manager();
      await m.create("origin", { uid: "1000", gid: "1001" });
      // The fake pool copies no files: the clone's root is its mountpoint, made here as the clone would bring it.
      const cloneRoot = join(dir, "mnt", "copy");
      await mkdir(cloneRoot, { recursive: true });
      await chown(cloneRoot, 1000, 1001);
      await m.create("copy", { from: "origin", uid: "1002" });
      const s = await stat(cloneRoot);
      assert.deepEqual([s.uid, s.gid], [1002, 1001]);
      await m.create("group-only", { gid: "1003" });
      const g = await stat(join(dir, "mnt", "group-only"));
      assert.deepEqual([g.uid, g.gid], [0, 1003]);
    });

    test("Get shows the host space the pool has reserved and what the host has free", async () => {
      const m = manager();
      await m.create("v", null);
      pool.hostReservedBytes = 3 * 1024 ** 3;
      pool.hostFreeBytes = 512 * 1024 ** 2;
      const status = (await m.get("v")).status;
      assert.equal(status["hostReservedBytes"], 3 * 1024 ** 3);
      assert.equal(status["hostFreeBytes"], 512 * 1024 ** 2);
      assert.match(String(status["pool"]), /3 GiB of host disk reserved, 512 MiB free on the host/);
    });
  });

  describe("recovery at start-up", () => {
    const base = (name: string, state: VolumeRecord["state"], mounts: Record<string, number> = {}): VolumeRecord => ({
      name,
      state,
      createdAt: "2026-01-01T00:00:00.000Z",
      sizeBytes: 1024 ** 3,
      fs: "ext4",
      mountOptions: [],
      mounts: new Map(Object.entries(mounts)),
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
      assert.deepEqual((await records.get("stale"))?.mounts, new Map());
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
      assert.deepEqual((await records.get("busy"))?.mounts, new Map([["c1", 1]]));
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
