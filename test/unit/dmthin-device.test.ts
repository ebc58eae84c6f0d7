import assert from "node:assert/strict";
import { mkdtemp, readFile, readdir, realpath, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { createLogger } from "../../src/log.js";
import { selectPool } from "../../src/pool/select.js";
import { deviceNumberOf } from "../../src/system/blockdev.js";
import { BLOCK, GiB, MiB, cleanupFixtures, dmThinFixture, type Backing, type DmThinFixture } from "../support/dmthin-fixture.js";
import { FakeDmKernel } from "../support/fake-dm-kernel.js";

after(cleanupFixtures);

/** A 10 GiB disk with a few bytes over: the pool takes whole blocks only. */
const DISK = 10 * GiB + 1000;
const onDisk: Backing = { disk: DISK };

const messages = (f: DmThinFixture) => f.kernel.log.filter((l) => l.startsWith("dmsetup message"));
const stateText = (f: DmThinFixture) => readFile(join(f.dir, "dmthin-state.json"), "utf8");

describe("dm-thin pool on a device (POOL_DEVICE)", () => {
  test("a new pool takes the device whole, in whole blocks; only the metadata is a file; POOL_SIZE is ignored", async () => {
    const f = await dmThinFixture({ backing: onDisk, dataSizeBytes: 2 * GiB });
    const pool = f.kernel.device("thinvol-pool");
    assert.ok(pool?.live?.kind === "thin-pool");
    assert.equal(pool.live.length * 512, 10 * GiB);
    assert.match(pool.live.text, /^0 20971520 thin-pool 7:\d+ 8:0 128 /, "data is the disk, by major:minor");
    assert.deepEqual((await readdir(f.dir)).sort(), ["dmthin-state.json", "meta.img"], "no data file");
    const meta = await realpath(f.metaFile);
    assert.deepEqual([...f.kernel.loops.values()].map((l) => l.file), [meta]);
    // 48 bytes × (10 GiB / 64 KiB) = 7.5 MiB → 8 MiB
    assert.equal(f.kernel.allocated.get(meta), 8 * MiB);
    assert.ok(f.logs.some((l) => /POOL_SIZE is ignored/.test(l)));
    const state = await f.state();
    assert.deepEqual((state as unknown as { dataDevice: unknown }).dataDevice, { setting: f.disk, path: f.disk, sizeBytes: DISK, ids: [] });
    assert.equal(state.dataSizeBytes, 10 * GiB);
    const u = await f.pool.usage();
    assert.equal(u.dataTotalBytes, 10 * GiB);
    assert.equal(u.hostReservedBytes, undefined, "nothing is reserved on the host for data");
    assert.equal(u.hostFreeBytes, undefined);
    assert.ok(!f.kernel.log.some((l) => l.startsWith("fallocate") && l.includes("data.img")));
  });

  test("create, clone, remove and restarts send the same dm messages as on files, and never run losetup for data", async () => {
    const run = async (backing: Backing) => {
      const f = await dmThinFixture({ backing, dataSizeBytes: DISK - 1000 });
      await f.pool.create("a", GiB);
      await f.pool.activate("a");
      f.kernel.write("thinvol-a", 0, 4 * BLOCK);
      await f.pool.clone("b", "a");
      await f.reopen(); // restart with the pool live
      await f.pool.close();
      f.kernel.reboot();
      await f.reopen(); // after a reboot: rebuilt from the metadata
      await f.pool.activate("a");
      assert.equal(await f.pool.allocatedBytes("a"), 4 * BLOCK, "the data is still there");
      await f.pool.remove("a");
      await f.pool.create("c", GiB);
      assert.deepEqual(await f.pool.list(), ["b", "c"]);
      return f;
    };
    const files = await run("file");
    const disk = await run(onDisk);
    assert.deepEqual(messages(disk), messages(files));
    assert.ok(messages(disk).length >= 8, messages(disk).join("\n"));
    const losetup = disk.kernel.log.filter((l) => l.startsWith("losetup"));
    assert.ok(!losetup.some((l) => l.includes("data.img") || l.includes(disk.disk ?? "?")), losetup.join("\n"));
    assert.equal(losetup.filter((l) => l.startsWith("losetup --find")).length, 2, "the metadata's loop device, before and after the reboot");
  });

  test("close takes the pool down and detaches only the metadata's loop device; the disk is released", async () => {
    const f = await dmThinFixture({ backing: onDisk });
    await f.pool.create("db", GiB);
    const from = f.kernel.log.length;
    await f.pool.close();
    assert.equal(f.kernel.device("thinvol-pool"), undefined);
    assert.equal(f.kernel.loops.size, 0);
    assert.equal(f.kernel.disk(f.disk ?? "").holders, 0);
    assert.ok(!f.commandsSince(from).some((l) => l.includes(f.disk ?? "?")), "the disk is never detached or touched");
  });

  test("a restart finds the live pool by the disk's major:minor and leaves it alone; a live pool on other data is refused", async () => {
    const f = await dmThinFixture({ backing: onDisk });
    await f.pool.create("db", GiB);
    await f.pool.activate("db");
    f.kernel.hold("thinvol-db"); // mounted: the pool stays up
    await f.pool.close();
    const from = f.kernel.log.length;
    await f.reopen();
    assert.ok(!f.commandsSince(from).some((c) => /^dmsetup (create|remove|suspend|load)|^losetup --find|^thin_check|^blkid/.test(c)), f.commandsSince(from).join("; "));
    assert.deepEqual(await f.pool.list(), ["db"]);

    // Another directory's pool of the same name, on another disk, is live: not this pool.
    const g = await dmThinFixture({ kernel: f.kernel, backing: { disk: DISK }, open: false });
    await assert.rejects(g.pool.open(), (err: Error) => {
      assert.match(err.message, /device thinvol-pool is active but is not the pool in .*: it uses data 8:0, .*expected .*disk \(8:16\)/);
      return true;
    });
  });

  test("a POOL_DEVICE given as a symlink (/dev/disk/by-id/...) is resolved; the state keeps both", async () => {
    const kernel = new FakeDmKernel();
    const f = await dmThinFixture({ kernel, backing: onDisk, open: false });
    const link = join(f.dir, "..", "by-id-disk");
    await symlink(f.disk ?? "", link);
    const pool = await f.reopen({ dataDevice: link });
    assert.match(f.kernel.device("thinvol-pool")?.live?.text ?? "", / 8:0 /);
    assert.deepEqual((await f.state() as unknown as { dataDevice: unknown }).dataDevice, { setting: link, path: f.disk, sizeBytes: DISK, ids: [] });
    await pool.create("db", GiB);
  });

  test("a kernel name that now leads to another disk is refused by the disk's by-id names; the same disk under a new name is taken", async () => {
    const kernel = new FakeDmKernel();
    const f = await dmThinFixture({ kernel, backing: onDisk, open: false });
    kernel.disk(f.disk ?? "").ids = ["wwn-0x5000aaaa", "ata-DISK_A"];
    const pool = await f.reopen();
    await pool.create("db", GiB);
    await pool.close();
    const before = await stateText(f);
    // After a reboot the same /dev name is another disk of the same size.
    kernel.disk(f.disk ?? "").ids = ["wwn-0x5000bbbb"];
    await assert.rejects(f.reopen(), (err: Error) => {
      assert.match(err.message, /is not the disk the dm-thin pool in .* was made on: that one is wwn-0x5000aaaa, ata-DISK_A/);
      assert.match(err.message, /this one is wwn-0x5000bbbb/);
      return true;
    });
    assert.equal(await stateText(f), before, "nothing written");
    assert.equal(kernel.devices.size, 0, "no pool device made on the wrong disk");
    kernel.disk(f.disk ?? "").ids = ["ata-DISK_A"];
    const again = await f.reopen();
    assert.deepEqual(await again.list(), ["db"]);
  });

  test("a device with no by-id name is taken with a warning that only its size tells it apart", async () => {
    const f = await dmThinFixture({ backing: onDisk });
    assert.ok(f.logs.some((l) => /POOL_DEVICE has no \/dev\/disk\/by-id name/.test(l)), f.logs.join("\n"));
  });

  for (const [what, signature, says] of [
    ["an ext4 filesystem", { UUID: "0c7e", BLOCK_SIZE: "4096", TYPE: "ext4", USAGE: "filesystem", LABEL: "db" }, /holds an ext4 filesystem \(label "db"\)/],
    ["a partition table", { PTUUID: "5d1e", PTTYPE: "gpt" }, /holds a gpt partition table/],
    ["an LVM physical volume", { UUID: "x", VERSION: "LVM2 001", TYPE: "LVM2_member", USAGE: "raid" }, /holds a LVM2_member raid/],
  ] as const) {
    test(`a device holding ${what} is refused, naming it; nothing is made; once wiped it is taken`, async () => {
      const f = await dmThinFixture({ backing: { disk: DISK, signature }, open: false });
      await assert.rejects(f.pool.open(), (err: Error) => {
        assert.ok(err.message.includes(`POOL_DEVICE ${f.disk} is not empty`), err.message);
        assert.match(err.message, says);
        assert.ok(err.message.includes(`wipefs -a ${f.disk}`), err.message);
        return true;
      });
      assert.equal(f.kernel.devices.size, 0, "no dm device");
      assert.equal(f.kernel.loops.size, 0, "no loop device");
      assert.deepEqual(await readdir(f.dir), [], "no state, no metadata file");
      f.kernel.disk(f.disk ?? "").signature = undefined; // wipefs -a
      await f.reopen();
      await f.pool.create("db", GiB);
    });
  }

  test("a pool's own volumes on the device are not mistaken for a foreign signature on a restart", async () => {
    const f = await dmThinFixture({ backing: onDisk });
    await f.pool.create("db", GiB);
    f.kernel.disk(f.disk ?? "").signature = { TYPE: "ext4", USAGE: "filesystem" }; // the volume's ext4 at data block 0
    await f.pool.close();
    f.kernel.reboot();
    await f.reopen();
    assert.deepEqual(await f.pool.list(), ["db"]);
    assert.equal(f.kernel.log.filter((l) => l.startsWith("blkid")).length, 1, "probed only before the pool was made");
  });

  test("a device that is mounted or held elsewhere: the EBUSY from the kernel becomes an error naming the device", async () => {
    const f = await dmThinFixture({ backing: onDisk, open: false });
    f.kernel.disk(f.disk ?? "").busy = true;
    await assert.rejects(f.pool.open(), (err: Error) => {
      assert.ok(err.message.includes(`POOL_DEVICE ${f.disk}: the device is in use`), err.message);
      assert.match(err.message, /Device or resource busy/);
      return true;
    });
    assert.equal(f.kernel.device("thinvol-pool"), undefined);
  });

  test("a path that is no block device is refused, naming it", async () => {
    const f = await dmThinFixture({ open: false });
    const file = join(f.dir, "..", "plain-file");
    await writeFile(file, "");
    await assert.rejects(f.reopen({ dataDevice: file, blockDevices: f.kernel.blockDevices }), (err: Error) => {
      assert.match(err.message, /^POOL_DEVICE .*plain-file cannot hold the data of dm-thin pool thinvol-pool: .* is not a block device$/);
      return true;
    });
    assert.equal(f.kernel.devices.size, 0);
  });

  test("a device that shrank is refused; one that grew keeps the pool's length, with a log line", async () => {
    const f = await dmThinFixture({ backing: onDisk });
    await f.pool.create("db", GiB);
    await f.pool.close();
    const disk = f.kernel.disk(f.disk ?? "");
    disk.sizeBytes = DISK - 1;
    const before = await stateText(f);
    await assert.rejects(f.reopen(), (err: Error) => {
      assert.ok(err.message.includes(`POOL_DEVICE ${f.disk} has`), err.message);
      assert.match(err.message, /less than the .* pool thinvol-pool was made on/);
      return true;
    });
    assert.equal(await stateText(f), before);
    assert.equal(f.kernel.device("thinvol-pool"), undefined);
    disk.sizeBytes = 2 * DISK;
    await f.reopen();
    assert.equal((await f.pool.usage()).dataTotalBytes, 10 * GiB);
    assert.ok(f.logs.some((l) => /larger than the pool's length; the pool keeps its length until it is grown/.test(l)));
  });
});

describe("dm-thin pool: a pool never moves between a file and a device", () => {
  test("a pool made on a file, opened with POOL_DEVICE: refused, naming both; nothing changes", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await f.pool.close();
    const disk = f.kernel.addDisk(join(f.dir, "..", "disk"), DISK);
    const before = await stateText(f);
    const from = f.kernel.log.length;
    await assert.rejects(f.reopen({ dataDevice: disk, blockDevices: f.kernel.blockDevices }), (err: Error) => {
      assert.ok(err.message.includes(`POOL_DEVICE=${disk}`), err.message);
      assert.ok(err.message.includes(f.dataFile), err.message);
      assert.match(err.message, /a pool cannot move between a file and a device/);
      return true;
    });
    assert.equal(await stateText(f), before);
    assert.deepEqual(f.commandsSince(from), ["blockdev --getsize64 " + disk], "only the device's size was read");
    assert.equal(f.kernel.device("thinvol-pool"), undefined);
  });

  test("a pool made on a device, opened without POOL_DEVICE or with another device: refused, naming both; nothing changes", async () => {
    const f = await dmThinFixture({ backing: onDisk });
    await f.pool.create("db", GiB);
    await f.pool.close();
    const before = await stateText(f);
    await assert.rejects(f.reopen({ dataDevice: "" }), (err: Error) => {
      assert.ok(err.message.includes(`keeps its data on the device ${f.disk}`), err.message);
      assert.match(err.message, /POOL_DEVICE is not set/);
      assert.match(err.message, /a pool cannot move between a file and a device/);
      return true;
    });
    const other = f.kernel.addDisk(join(f.dir, "..", "other-disk"), DISK);
    await assert.rejects(f.reopen({ dataDevice: other }), (err: Error) => {
      assert.ok(err.message.includes(`POOL_DEVICE=${other}`), err.message);
      assert.ok(err.message.includes(`keeps its data on the device ${f.disk}`), err.message);
      assert.match(err.message, /cannot move to another device, nor between a file and a device/);
      return true;
    });
    assert.equal(await stateText(f), before);
    assert.equal(f.kernel.devices.size, 0);
    assert.equal(f.kernel.loops.size, 0);
    assert.deepEqual(await readdir(f.dir).then((l) => l.sort()), ["dmthin-state.json", "meta.img"], "no data file made");
  });
});

test("st_rdev is split into major:minor as the kernel prints it, large numbers included", () => {
  // glibc's makedev
  const makedev = (major: bigint, minor: bigint) =>
    ((major & 0xfffff000n) << 32n) | ((major & 0xfffn) << 8n) | ((minor & 0xffffff00n) << 12n) | (minor & 0xffn);
  assert.equal(deviceNumberOf(0x810n), "8:16"); // /dev/sdb
  assert.equal(deviceNumberOf(makedev(7n, 0n)), "7:0");
  assert.equal(deviceNumberOf(makedev(259n, 300n)), "259:300");
  assert.equal(deviceNumberOf(makedev(0x12345n, 0xabcdefn)), `${0x12345}:${0xabcdef}`);
});

describe("pool selection with POOL_DEVICE", () => {
  const dirs: string[] = [];
  after(() => Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true }))));
  const stateDir = async () => {
    const d = await mkdtemp(join(tmpdir(), "thinvol-select-"));
    dirs.push(d);
    return d;
  };
  const select = async (kernel: FakeDmKernel, stateDir: string, setting: "auto" | "dm-thin" | "loop") =>
    selectPool({ runner: kernel.runner, stateDir, setting, dataSizeBytes: GiB, dataDevice: "/dev/sdz", minFreePercent: 10, log: createLogger("error", () => {}) });

  test("auto on a kernel without dm-thin fails start-up, saying POOL_DEVICE needs dm-thin", async () => {
    const kernel = new FakeDmKernel();
    kernel.deviceMapper = false;
    const dir = await stateDir();
    await assert.rejects(select(kernel, dir, "auto"), /POOL_DEVICE=\/dev\/sdz needs the dm-thin driver, but this kernel has no dm-thin/);
    assert.deepEqual(await readdir(dir), [], "no driver chosen, no pool made");
  });

  test("a state directory whose pool uses the loop driver is refused", async () => {
    const dir = await stateDir();
    await writeFile(join(dir, "pool-driver.json"), JSON.stringify({ driver: "loop" }));
    await assert.rejects(select(new FakeDmKernel(), dir, "auto"), /POOL_DEVICE=\/dev\/sdz needs the dm-thin driver, but the pool in .* was created with the loop driver/);
  });
});
