import assert from "node:assert/strict";
import { stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { ConflictError, InvalidRequestError, NoSpaceError, NotFoundError } from "../../src/errors.js";
import { BLOCK, GiB, MiB, cleanupFixtures, dmThinFixture } from "../support/dmthin-fixture.js";
import { FakeDmKernel } from "../support/fake-dm-kernel.js";

after(cleanupFixtures);

describe("dm-thin pool: open", () => {
  test("a new pool is two allocated files on direct-I/O loop devices joined into a thin pool; data reserved only ahead of use", async () => {
    const f = await dmThinFixture({ dataSizeBytes: 10 * GiB });
    const data = await stat(f.dataFile);
    const meta = await stat(f.metaFile);
    // Headroom max(512 MiB, 10 %) = 1 GiB; a new pool reserves twice that.
    assert.equal(data.size, 2 * GiB);
    assert.equal(await f.kernel.hostSpace.allocatedBytes(f.dataFile), 2 * GiB, "the data file is allocated on the host, not sparse");
    // 48 bytes × (10 GiB / 64 KiB) = 7.5 MiB → 8 MiB, all of it allocated
    assert.equal(meta.size, 8 * MiB);
    assert.equal(await f.kernel.hostSpace.allocatedBytes(f.metaFile), 8 * MiB);
    const loops = [...f.kernel.loops.values()];
    assert.equal(loops.length, 2);
    assert.ok(loops.every((l) => l.directIo));
    const pool = f.kernel.device("thinvol-pool");
    assert.ok(pool?.live?.kind === "thin-pool");
    assert.equal(pool.live.length * 512, 2 * GiB);
    // Low-water mark = the headroom, in blocks; discards never punch holes in the reserved file.
    assert.match(pool.live.text, / 128 16384 3 skip_block_zeroing error_if_no_space no_discard_passdown$/);
    assert.ok(f.kernel.nodes.has("/dev/mapper/thinvol-pool"));
    const usage = await f.pool.usage();
    assert.equal(usage.driver, "dm-thin");
    assert.equal(usage.dataTotalBytes, 10 * GiB);
    assert.equal(usage.dataUsedBytes, 0);
    assert.equal(usage.metaTotalBytes, 8 * MiB);
    assert.equal(usage.hostReservedBytes, 2 * GiB + 8 * MiB);
    assert.equal(usage.hostFreeBytes, f.kernel.hostSizeBytes - 2 * GiB - 8 * MiB);
  });

  test("on a filesystem that refuses direct I/O the loop devices are made without it", async () => {
    const kernel = new FakeDmKernel();
    kernel.directIoRefused = true;
    const f = await dmThinFixture({ kernel });
    assert.equal(kernel.loops.size, 2);
    assert.ok([...kernel.loops.values()].every((l) => !l.directIo));
    await f.pool.create("db", GiB);
    assert.ok(f.logs.some((l) => / warn loop device without direct I\/O/.test(l)));
  });

  test("metadata is at least 2 MiB", async () => {
    const f = await dmThinFixture({ dataSizeBytes: 64 * MiB });
    assert.equal((await stat(f.metaFile)).size, 2 * MiB);
  });

  test("a restarted plugin reuses the live pool and leaves active volumes alone", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await f.pool.activate("db");
    f.kernel.hold("thinvol-db"); // mounted
    f.kernel.write("thinvol-db", 0, 3 * BLOCK);
    const from = f.kernel.log.length;
    const pool = await f.reopen();
    const cmds = f.commandsSince(from);
    assert.ok(!cmds.some((c) => c.startsWith("losetup --find")), "no new loop devices");
    assert.ok(!cmds.some((c) => /^dmsetup (create|remove|suspend|load)/.test(c)), `pool and volumes untouched: ${cmds.join("; ")}`);
    assert.ok(!cmds.some((c) => c.startsWith("thin_check")), "no thin_check on a live pool");
    assert.deepEqual(await pool.list(), ["db"]);
    assert.equal(await pool.allocatedBytes("db"), 3 * BLOCK);
    assert.equal(f.kernel.device("thinvol-db")?.openCount, 1);
  });

  test("a second loop device on the data file does not confuse a restart", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    const stray = (await f.kernel.runner.run("losetup", ["--find", "--show", f.dataFile])).stdout;
    // Make the kernel list the stray loop device first.
    for (const [dev, loop] of [...f.kernel.loops]) {
      if (dev === stray) continue;
      f.kernel.loops.delete(dev);
      f.kernel.loops.set(dev, loop);
    }
    const pool = await f.reopen();
    assert.deepEqual(await pool.list(), ["db"]);
    assert.ok(!f.kernel.log.some((c) => /^dmsetup (load|suspend)/.test(c)));
  });

  test("after a reboot the pool is rebuilt from its files, checked first, with every volume and its data", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await f.pool.activate("db");
    f.kernel.write("thinvol-db", 0, 5 * BLOCK);
    f.kernel.reboot();
    const pool = await f.reopen();
    assert.ok(f.kernel.log.some((c) => /^thin_check \/dev\/loop\d+$/.test(c)), "thin_check ran");
    assert.deepEqual(await pool.list(), ["db"]);
    assert.equal(await pool.sizeOf("db"), GiB);
    assert.equal(f.kernel.device("thinvol-db"), undefined, "volumes are activated on demand");
    assert.equal(await pool.activate("db"), "/dev/mapper/thinvol-db");
    assert.equal(await pool.allocatedBytes("db"), 5 * BLOCK);
    assert.equal((await pool.usage()).dataUsedBytes, 5 * BLOCK);
  });

  test("damaged metadata stops open with thin_check's report and the file's name", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    f.kernel.reboot();
    f.kernel.damageMetadata(f.metaFile, "examining superblock\n  superblock is corrupt\n    bad checksum in superblock");
    await assert.rejects(f.reopen(), (err: Error) => {
      assert.ok(err.message.includes(f.metaFile), err.message);
      assert.match(err.message, /thin_check/);
      assert.match(err.message, /bad checksum in superblock/);
      return true;
    });
    assert.equal(f.kernel.device("thinvol-pool"), undefined, "the pool was not started");
  });

  test("a larger POOL_SIZE on a live pool: metadata grown at once (table reloaded, pool resumed), data reserved as it is used", async () => {
    const f = await dmThinFixture({ dataSizeBytes: GiB });
    await f.pool.create("db", GiB);
    const pool = await f.reopen({ dataSizeBytes: 40 * GiB });
    assert.equal((await pool.usage()).dataTotalBytes, 40 * GiB);
    assert.equal((await stat(f.metaFile)).size, 30 * MiB);
    assert.ok(f.kernel.log.some((c) => c.startsWith("losetup --set-capacity")));
    assert.ok(f.kernel.log.some((c) => c.startsWith("dmsetup load thinvol-pool")));
    assert.deepEqual(f.kernel.suspendedDevices(), []);
    // Half of the 1 GiB is free: under the new 4 GiB headroom, so the reservation grows to 8 GiB.
    assert.equal((await f.state()).dataSizeBytes, 8 * GiB);
    assert.equal(await f.kernel.hostSpace.allocatedBytes(f.dataFile), 8 * GiB);
    assert.deepEqual(await pool.list(), ["db"]);
  });

  test("growing the pool while it is down", async () => {
    const f = await dmThinFixture({ dataSizeBytes: GiB });
    f.kernel.reboot();
    const pool = await f.reopen({ dataSizeBytes: 2 * GiB });
    assert.equal((await pool.usage()).dataTotalBytes, 2 * GiB);
  });

  test("a smaller size never shrinks the pool", async () => {
    const f = await dmThinFixture({ dataSizeBytes: GiB });
    const pool = await f.reopen({ dataSizeBytes: 512 * MiB });
    assert.equal((await pool.usage()).dataTotalBytes, GiB);
    assert.equal((await stat(f.dataFile)).size, GiB);
    assert.ok(f.logs.some((l) => / warn .*cannot shrink/.test(l)));
  });

  test("the block size is fixed when the pool is made", async () => {
    const f = await dmThinFixture({ blockSizeSectors: 256 });
    f.kernel.reboot();
    await f.reopen({ blockSizeSectors: 128 });
    const live = f.kernel.device("thinvol-pool")?.live;
    assert.ok(live?.kind === "thin-pool");
    assert.equal(live.blockSize, 256);
  });

  test("a live device with the pool's name that uses other devices is refused", async () => {
    const a = await dmThinFixture();
    const b = await dmThinFixture({ kernel: a.kernel, open: false });
    await assert.rejects(b.pool.open(), /thinvol-pool is active but is not the pool in/);
  });

  test("a damaged state file is reported by name", async () => {
    const f = await dmThinFixture();
    await writeFile(join(f.dir, "dmthin-state.json"), '{"version":1,"blockSizeSectors":"x"}');
    await assert.rejects(f.reopen(), (err: Error) => err.message.includes("dmthin-state.json") && /damaged/.test(err.message));
  });

  test("a state file that does not match the metadata stops open instead of guessing", async () => {
    const f = await dmThinFixture();
    const old = await f.state();
    await f.pool.create("a", GiB);
    await writeFile(join(f.dir, "dmthin-state.json"), JSON.stringify(old));
    await assert.rejects(f.reopen(), /transaction 1 but .* records 0/);
  });

  test("blank metadata with a state that lists volumes is refused, not silently reformatted", async () => {
    const f = await dmThinFixture();
    await f.pool.create("a", GiB);
    f.kernel.reboot();
    await writeFile(f.metaFile, Buffer.alloc(2 * MiB));
    await assert.rejects(f.reopen(), /is blank, but .* holds volumes/);
  });

  test("existing metadata without a state file is not reused", async () => {
    const f = await dmThinFixture();
    const { rm } = await import("node:fs/promises");
    await rm(join(f.dir, "dmthin-state.json"));
    await assert.rejects(f.reopen(), /no state file/);
  });
});

describe("dm-thin pool: volumes", () => {
  test("create records the volume; the pool's transaction id matches the state", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", 20 * GiB);
    assert.deepEqual(await f.pool.list(), ["db"]);
    assert.equal(await f.pool.sizeOf("db"), 20 * GiB, "thin volumes may be larger than the pool");
    const ids = await f.ids();
    assert.deepEqual(ids.kernel, ids.state);
    assert.equal(ids.kernel.length, 1);
    assert.equal(f.kernel.transactionId(f.metaFile), (await f.state()).transactionId);
    assert.equal((await f.state()).transactionId, 1);
  });

  test("activate gives a /dev/mapper path that exists, and is idempotent", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    const path = await f.pool.activate("db");
    assert.equal(path, "/dev/mapper/thinvol-db");
    assert.ok(f.kernel.nodes.has(path));
    const t = f.kernel.device("thinvol-db")?.live;
    assert.ok(t?.kind === "thin");
    assert.equal(t.length, GiB / 512);
    const creates = f.kernel.log.filter((c) => c.startsWith("dmsetup create thinvol-db")).length;
    assert.equal(await f.pool.activate("db"), path);
    assert.equal(f.kernel.log.filter((c) => c.startsWith("dmsetup create thinvol-db")).length, creates);
  });

  test("deactivate removes the device, keeps the data and is idempotent", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await f.pool.activate("db");
    f.kernel.write("thinvol-db", 0, 2 * BLOCK);
    await f.pool.deactivate("db");
    await f.pool.deactivate("db");
    assert.equal(f.kernel.device("thinvol-db"), undefined);
    assert.ok(!f.kernel.nodes.has("/dev/mapper/thinvol-db"));
    assert.equal(await f.pool.allocatedBytes("db"), 2 * BLOCK, "last known figure while inactive");
    await f.pool.activate("db");
    assert.equal(await f.pool.allocatedBytes("db"), 2 * BLOCK);
  });

  test("a second create of the same name fails and makes nothing", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await assert.rejects(f.pool.create("db", GiB), (err: Error) => err instanceof ConflictError && err.message.includes('"db"'));
    assert.equal(f.kernel.thinIds(f.metaFile).length, 1);
  });

  test('the name "pool" is refused (its device would be the pool)', async () => {
    const f = await dmThinFixture();
    await assert.rejects(f.pool.create("pool", GiB), InvalidRequestError);
  });

  test("a failing create_thin names the volume, the pool and the kernel's reason, and leaks nothing", async () => {
    const f = await dmThinFixture();
    f.kernel.failWhen(/create_thin/, "device-mapper: message ioctl on thinvol-pool  failed: No space left on device\nCommand failed.");
    await assert.rejects(f.pool.create("db", GiB), (err: Error) => {
      assert.ok(err instanceof NoSpaceError);
      assert.match(err.message, /^cannot create thin volume "db" in pool thinvol-pool: dmsetup message thinvol-pool 0 "create_thin \d+".*No space left on device/s);
      return true;
    });
    assert.deepEqual(await f.pool.list(), []);
    assert.deepEqual(f.kernel.thinIds(f.metaFile), []);
    assert.equal((await f.state()).pending, undefined);
    await f.pool.create("db", GiB);
    assert.deepEqual(await f.pool.list(), ["db"]);
  });

  test("if set_transaction_id fails after create_thin, the new thin id is deleted again", async () => {
    const f = await dmThinFixture();
    f.kernel.failWhen(/set_transaction_id/, "device-mapper: message ioctl on thinvol-pool  failed: Invalid argument");
    await assert.rejects(f.pool.create("db", GiB), /cannot create thin volume "db"/);
    const ids = await f.ids();
    assert.deepEqual(ids, { kernel: [], state: [] });
    assert.equal(f.kernel.transactionId(f.metaFile), (await f.state()).transactionId);
  });

  test("create refuses when the pool is nearly full, saying how much is free", async () => {
    const f = await dmThinFixture({ dataSizeBytes: 64 * MiB }); // 1024 blocks
    await f.pool.create("big", GiB);
    await f.pool.activate("big");
    f.kernel.write("thinvol-big", 0, 950 * BLOCK);
    await assert.rejects(f.pool.create("more", GiB), (err: Error) => {
      assert.ok(err instanceof NoSpaceError);
      assert.match(err.message, /cannot create thin volume "more" in pool thinvol-pool: only 4\.6\d MiB of 64 MiB of data space is free, under the 10% minimum/);
      return true;
    });
    assert.deepEqual(await f.pool.list(), ["big"]);
  });

  test("usage counts allocated data blocks and metadata blocks", async () => {
    const f = await dmThinFixture();
    await f.pool.create("a", GiB);
    await f.pool.activate("a");
    f.kernel.write("thinvol-a", 0, 10 * BLOCK);
    f.kernel.write("thinvol-a", 100 * BLOCK, 1);
    const u = await f.pool.usage();
    assert.equal(u.dataUsedBytes, 11 * BLOCK);
    assert.equal(u.dataTotalBytes, GiB);
    assert.ok((u.metaUsedBytes ?? 0) > 0 && (u.metaUsedBytes ?? 0) < (u.metaTotalBytes ?? 0));
    assert.equal(await f.pool.allocatedBytes("a"), 11 * BLOCK);
  });

  test("ids are unique under concurrent creates; the transaction id counts every create", async () => {
    const f = await dmThinFixture();
    await Promise.all(Array.from({ length: 20 }, (_, i) => f.pool.create(`v${i}`, GiB)));
    const ids = await f.ids();
    assert.equal(new Set(ids.kernel).size, 20);
    assert.deepEqual(ids.kernel, ids.state);
    assert.equal(f.kernel.transactionId(f.metaFile), 20);
    assert.equal((await f.state()).transactionId, 20);
  });

  test("unknown volumes: sizeOf and activate say so by name", async () => {
    const f = await dmThinFixture();
    await assert.rejects(f.pool.sizeOf("nope"), (e: Error) => e instanceof NotFoundError && e.message.includes('"nope"'));
    await assert.rejects(f.pool.activate("nope"), (e: Error) => e instanceof NotFoundError && e.message.includes('"nope"'));
  });
});

describe("dm-thin pool: clone", () => {
  test("clone of an active origin suspends it, snapshots, and resumes it; the clone shares its data", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", 2 * GiB);
    await f.pool.activate("db");
    f.kernel.hold("thinvol-db");
    f.kernel.write("thinvol-db", 0, 4 * BLOCK);
    const from = f.kernel.log.length;
    await f.pool.clone("copy", "db");
    const cmds = f.commandsSince(from).filter((c) => /^dmsetup (suspend|resume|message)/.test(c));
    assert.deepEqual(
      cmds.map((c) => c.replace(/\d+/g, "N")),
      ["dmsetup suspend --noudevsync thinvol-db", "dmsetup message thinvol-pool N create_snap N N", "dmsetup resume --noudevsync thinvol-db", "dmsetup message thinvol-pool N set_transaction_id N N"],
    );
    assert.deepEqual(f.kernel.suspendedDevices(), []);
    assert.equal(await f.pool.sizeOf("copy"), 2 * GiB);
    const s = await f.state();
    const [o, c] = [s.volumes["db"]?.id ?? -1, s.volumes["copy"]?.id ?? -1];
    assert.deepEqual(f.kernel.mappedDataBlocks(f.metaFile, c), f.kernel.mappedDataBlocks(f.metaFile, o));
    assert.equal((await f.pool.usage()).dataUsedBytes, 4 * BLOCK, "no space used by the clone");
    // The clone is writable and independent.
    await f.pool.activate("copy");
    f.kernel.write("thinvol-copy", 0, BLOCK);
    assert.notDeepEqual(f.kernel.mappedDataBlocks(f.metaFile, c), f.kernel.mappedDataBlocks(f.metaFile, o));
  });

  test("clone of an inactive origin does not suspend anything", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    const from = f.kernel.log.length;
    await f.pool.clone("copy", "db");
    assert.ok(!f.commandsSince(from).some((c) => c.startsWith("dmsetup suspend")));
    assert.deepEqual(await f.pool.list(), ["copy", "db"]);
  });

  test("a failing snapshot still resumes the origin, names both volumes and leaks nothing", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await f.pool.activate("db");
    f.kernel.failWhen(/create_snap/, "device-mapper: message ioctl on thinvol-pool  failed: Cannot allocate memory");
    await assert.rejects(f.pool.clone("copy", "db"), (err: Error) => {
      assert.match(err.message, /cannot clone "db" as thin volume "copy" in pool thinvol-pool: .*Cannot allocate memory/s);
      return true;
    });
    assert.deepEqual(f.kernel.suspendedDevices(), []);
    assert.deepEqual(await f.pool.list(), ["db"]);
    const ids = await f.ids();
    assert.deepEqual(ids.kernel, ids.state);
  });

  test("a failing resume is retried before the next operation", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await f.pool.activate("db");
    f.kernel.failWhen(/^dmsetup resume/, "device-mapper: resume ioctl on thinvol-db  failed: Invalid argument");
    // The first resume fails; recovery right after the failure resumes it.
    await assert.rejects(f.pool.clone("copy", "db"), /cannot resume origin device thinvol-db/);
    assert.deepEqual(f.kernel.suspendedDevices(), []);
  });

  test("clone of an unknown origin is NotFound and names it", async () => {
    const f = await dmThinFixture();
    await assert.rejects(f.pool.clone("copy", "ghost"), (e: Error) => e instanceof NotFoundError && e.message.includes('"ghost"'));
  });
});

describe("dm-thin pool: remove", () => {
  test("remove removes the device, deletes the id (its blocks go back to the pool) and forgets the volume", async () => {
    const f = await dmThinFixture();
    await f.pool.create("keep", GiB);
    await f.pool.create("db", GiB);
    await f.pool.activate("db");
    f.kernel.write("thinvol-db", 0, 8 * BLOCK);
    assert.equal((await f.pool.usage()).dataUsedBytes, 8 * BLOCK);
    const reserved = (await f.pool.usage()).hostReservedBytes;
    await f.pool.remove("db");
    assert.equal(f.kernel.device("thinvol-db"), undefined);
    assert.deepEqual(await f.pool.list(), ["keep"]);
    // The host space stays reserved for the pool: nothing to discard.
    assert.ok(!f.kernel.log.some((c) => c.startsWith("blkdiscard")));
    assert.equal((await f.pool.usage()).hostReservedBytes, reserved);
    assert.equal((await f.pool.usage()).dataUsedBytes, 0);
    const ids = await f.ids();
    assert.deepEqual(ids.kernel, ids.state);
    assert.equal(f.kernel.transactionId(f.metaFile), (await f.state()).transactionId);
  });

  test("an inactive volume is removed without being activated", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await f.pool.activate("db");
    f.kernel.write("thinvol-db", 0, 4 * BLOCK);
    await f.pool.deactivate("db");
    const from = f.kernel.log.length;
    await f.pool.remove("db");
    assert.ok(!f.commandsSince(from).some((c) => c.startsWith("dmsetup create")));
    assert.deepEqual(f.kernel.thinIds(f.metaFile), []);
    assert.equal((await f.pool.usage()).dataUsedBytes, 0);
    assert.equal(f.kernel.device("thinvol-db"), undefined);
  });

  test("remove is idempotent", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await f.pool.remove("db");
    await f.pool.remove("db");
    await f.pool.remove("never-existed");
    assert.deepEqual(await f.pool.list(), []);
  });

  test("a volume whose device is in use is kept, with its data, and the error says so", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await f.pool.activate("db");
    f.kernel.write("thinvol-db", 0, 3 * BLOCK);
    f.kernel.hold("thinvol-db");
    await assert.rejects(f.pool.remove("db"), (err: Error) => {
      assert.ok(err instanceof ConflictError);
      assert.match(err.message, /cannot remove thin volume "db" in pool thinvol-pool: .*in use/);
      return true;
    });
    assert.deepEqual(await f.pool.list(), ["db"]);
    assert.equal(await f.pool.allocatedBytes("db"), 3 * BLOCK);
    assert.equal((await f.state()).pending, undefined);
    f.kernel.release("thinvol-db");
    await f.pool.remove("db");
    assert.deepEqual(await f.pool.list(), []);
  });

  test("a failing delete message is finished by the next operation", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    f.kernel.failWhen(/message thinvol-pool 0 delete/, "device-mapper: message ioctl on thinvol-pool  failed: Cannot allocate memory", 2);
    await assert.rejects(f.pool.remove("db"), /cannot remove thin volume "db"/);
    // The recovery attempt right after the failure failed too: the journal stays...
    assert.equal((await f.state()).pending?.op, "remove");
    // ...and the next operation finishes it first.
    await f.pool.create("other", GiB);
    assert.deepEqual(await f.pool.list(), ["other"]);
    const ids = await f.ids();
    assert.deepEqual(ids.kernel, ids.state);
  });
});

describe("dm-thin pool: not open", () => {
  test("methods before open say the pool is not open", async () => {
    const f = await dmThinFixture({ open: false });
    await assert.rejects(f.pool.list(), /not open/);
    await f.pool.open();
    await f.pool.close();
    await assert.rejects(f.pool.create("x", GiB), /not open/);
  });
});
