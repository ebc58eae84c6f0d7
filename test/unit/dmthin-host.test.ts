import assert from "node:assert/strict";
import { mkdir, open, realpath, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { NoSpaceError } from "../../src/errors.js";
import { headroomBytes, hostFloorBytes, planGrowth } from "../../src/pool/host-space.js";
import { BLOCK, GiB, MiB, cleanupFixtures, dmThinFixture, type DmThinFixture } from "../support/dmthin-fixture.js";

/*
 * The pool never needs host space it may not get in the middle of a write: its data file is
 * allocated as far as the pool reaches, grown ahead of use while the host has room.
 * A 4 GiB pool keeps 512 MiB of headroom and starts with 1 GiB reserved.
 */

after(cleanupFixtures);

const POOL = 4 * GiB;
const HEADROOM = 512 * MiB;

async function poolWithData(f: DmThinFixture, usedBytes: number): Promise<void> {
  await f.pool.create("db", 8 * GiB);
  await f.pool.activate("db");
  f.kernel.write("thinvol-db", 0, usedBytes);
}

/** The live pool table's length in bytes. */
function liveLength(f: DmThinFixture): number {
  const t = f.kernel.device("thinvol-pool")?.live;
  assert.ok(t?.kind === "thin-pool");
  return t.length * 512;
}

const reservedData = (f: DmThinFixture) => f.kernel.hostSpace.allocatedBytes(f.dataFile);

describe("dm-thin host space: sizing rules", () => {
  test("headroom is 10 % within 512 MiB and 4 GiB, in whole blocks, never more than the pool; the host floor max(256 MiB, 2 %)", () => {
    assert.equal(headroomBytes(4 * GiB, BLOCK), 512 * MiB);
    assert.equal(headroomBytes(20 * GiB, BLOCK), 2 * GiB);
    assert.equal(headroomBytes(100 * GiB, BLOCK), 4 * GiB);
    assert.equal(headroomBytes(10 * GiB + BLOCK, BLOCK), GiB + BLOCK, "rounded up to whole blocks");
    assert.equal(headroomBytes(256 * MiB, BLOCK), 256 * MiB);
    assert.equal(hostFloorBytes(GiB), 256 * MiB);
    assert.equal(hostFloorBytes(1000 * GiB), 20 * GiB);
  });

  test("growth: none while the headroom is free; to twice the headroom above use; capped by the pool and by the host", () => {
    const base = { poolMaxBytes: POOL, headroomBytes: HEADROOM, blockBytes: BLOCK, hostFreeBytes: 100 * GiB, hostFloorBytes: 256 * MiB };
    assert.deepEqual(planGrowth({ ...base, lengthBytes: GiB, usedBytes: 512 * MiB }), { targetBytes: GiB, hostShort: false });
    assert.deepEqual(planGrowth({ ...base, lengthBytes: GiB, usedBytes: 600 * MiB }), { targetBytes: 1624 * MiB, hostShort: false });
    assert.deepEqual(planGrowth({ ...base, lengthBytes: 3 * GiB, usedBytes: 3.5 * GiB - MiB }), { targetBytes: POOL, hostShort: false });
    assert.deepEqual(planGrowth({ ...base, lengthBytes: GiB, usedBytes: 600 * MiB, hostFreeBytes: 300 * MiB }), { targetBytes: GiB + 44 * MiB, hostShort: true });
    assert.deepEqual(planGrowth({ ...base, lengthBytes: GiB, usedBytes: 600 * MiB, hostFreeBytes: 100 * MiB }), { targetBytes: GiB, hostShort: true });
  });
});

describe("dm-thin host space: growth", () => {
  test("the pool grows in steps as it is used, each step allocated on the host first, up to its size and no further", async () => {
    const f = await dmThinFixture({ dataSizeBytes: POOL });
    assert.equal(liveLength(f), GiB);
    assert.equal(await reservedData(f), GiB);
    await poolWithData(f, 600 * MiB);
    await f.pool.growIfNeeded();
    assert.equal(liveLength(f), 1624 * MiB);
    assert.equal(await reservedData(f), 1624 * MiB);
    assert.equal((await f.state()).dataSizeBytes, 1624 * MiB);
    assert.deepEqual(f.kernel.suspendedDevices(), []);
    const grown = f.logs.find((l) => / info dm-thin pool grown/.test(l));
    assert.ok(grown, f.logs.join("\n"));
    assert.match(grown, /reserved="1\.59 GiB"/);
    assert.match(grown, /hostFree=/);

    // Nothing changed: nothing but a look at the pool's status.
    const from = f.kernel.log.length;
    await f.pool.growIfNeeded();
    assert.deepEqual(f.commandsSince(from), ["dmsetup status thinvol-pool"]);

    for (const used of [1500 * MiB, 2400 * MiB, 3300 * MiB, 3900 * MiB]) {
      f.kernel.write("thinvol-db", 0, used);
      await f.pool.growIfNeeded();
    }
    assert.equal(liveLength(f), POOL);
    assert.equal(await reservedData(f), POOL);
    assert.throws(() => f.kernel.write("thinvol-db", 0, POOL + BLOCK), /No space left on device/, "a full pool fails the write");
    const u = await f.pool.usage();
    assert.equal(u.dataTotalBytes, POOL);
    assert.equal(u.hostReservedBytes, POOL + (await f.kernel.hostSpace.allocatedBytes(f.metaFile)));
  });

  test("a create that finds the pool short of headroom grows it first", async () => {
    const f = await dmThinFixture({ dataSizeBytes: POOL });
    await poolWithData(f, 700 * MiB);
    await f.pool.create("next", GiB);
    assert.equal(liveLength(f), 1724 * MiB);
  });
});

describe("dm-thin host space: a host running low", () => {
  test("growth stops at the host's floor with one warning; creates and clones are refused naming the host's free space; more host space brings it all back", async () => {
    const f = await dmThinFixture({ dataSizeBytes: POOL });
    f.kernel.hostSizeBytes = 3 * GiB;
    await poolWithData(f, 600 * MiB);
    f.kernel.fillHostTo(300 * MiB);
    await f.pool.growIfNeeded();
    // 300 MiB free, 256 MiB kept for the host: 44 MiB more.
    assert.equal(liveLength(f), GiB + 44 * MiB);
    assert.equal(f.kernel.hostFreeBytes(), 256 * MiB);
    await f.pool.growIfNeeded();
    await f.pool.growIfNeeded();
    const warnings = f.logs.filter((l) => / warn dm-thin pool cannot reserve more host space/.test(l));
    assert.equal(warnings.length, 1, "warned once, not on every check");
    assert.match(warnings[0] ?? "", /hostFree="256 MiB"/);

    for (const attempt of [() => f.pool.create("new", GiB), () => f.pool.clone("copy", "db")]) {
      await assert.rejects(attempt(), (err: Error) => {
        assert.ok(err instanceof NoSpaceError, String(err));
        assert.match(err.message, /host filesystem under .* has only 256 MiB free/);
        assert.match(err.message, /Free space on the host filesystem/);
        return true;
      });
    }
    assert.deepEqual(await f.pool.list(), ["db"]);
    const u = await f.pool.usage();
    assert.equal(u.hostFreeBytes, 256 * MiB);
    assert.equal(u.hostReservedBytes, GiB + 44 * MiB + (await f.kernel.hostSpace.allocatedBytes(f.metaFile)));

    // Writes that fit the reservation still work; past it, only this volume's write fails.
    f.kernel.write("thinvol-db", 0, GiB);
    assert.throws(() => f.kernel.write("thinvol-db", 0, GiB + 44 * MiB + BLOCK), /No space left on device/);

    f.kernel.hostOtherBytes = 0; // host space added
    await f.pool.growIfNeeded();
    assert.ok(liveLength(f) >= f.kernel.device("thinvol-pool")!.live!.length * 512);
    assert.ok(f.logs.some((l) => / info dm-thin pool has its headroom again/.test(l)));
    await f.pool.create("new", GiB);
    assert.deepEqual(await f.pool.list(), ["db", "new"]);
  });

  test("a new pool on a host with too little room is refused, naming the host's free space", async () => {
    const f = await dmThinFixture({ dataSizeBytes: POOL, open: false });
    f.kernel.hostSizeBytes = 259 * MiB;
    await assert.rejects(f.pool.open(), (err: Error) => err instanceof NoSpaceError && /host filesystem under .* has \d+ MiB free/.test(err.message));
  });

  test("a new pool on a small host reserves what the host can give, with a warning", async () => {
    const f = await dmThinFixture({ dataSizeBytes: POOL, open: false });
    f.kernel.hostSizeBytes = GiB;
    await f.pool.open();
    // 1 GiB - 3 MiB of metadata - 256 MiB of floor
    assert.equal(liveLength(f), GiB - 3 * MiB - 256 * MiB);
    assert.ok(f.logs.some((l) => / warn dm-thin pool made smaller than its headroom/.test(l)));
  });
});

/** A pool as the previous version left it: a sparse data file as long as the table, live. */
async function oldPool(f: DmThinFixture): Promise<void> {
  await mkdir(f.dir, { recursive: true });
  for (const [file, size] of [[f.dataFile, POOL], [f.metaFile, 3 * MiB]] as const) {
    const h = await open(file, "w");
    await h.truncate(size);
    await h.close();
  }
  const run = (cmd: string, args: string[]) => f.kernel.runner.run(cmd, args);
  const meta = (await run("losetup", ["--find", "--show", "--direct-io=on", f.metaFile])).stdout;
  const data = (await run("losetup", ["--find", "--show", "--direct-io=on", f.dataFile])).stdout;
  await run("dmsetup", ["create", "thinvol-pool", "--noudevsync", "--table", `0 ${POOL / 512} thin-pool ${meta} ${data} 128 6553 2 skip_block_zeroing error_if_no_space`]);
  await run("dmsetup", ["message", "thinvol-pool", "0", "create_thin 1"]);
  await run("dmsetup", ["message", "thinvol-pool", "0", "set_transaction_id 0 1"]);
  const state = { version: 1, blockSizeSectors: 128, dataSizeBytes: POOL, metaSizeBytes: 3 * MiB, transactionId: 1, nextId: 2, volumes: { db: { id: 1, sizeBytes: GiB } } };
  await writeFile(join(f.dir, "dmthin-state.json"), JSON.stringify(state));
  // What the old pool's writes took of the host.
  f.kernel.allocated.set(await realpath(f.dataFile), 100 * MiB);
}

describe("dm-thin host space: a pool made by the previous version", () => {
  test("live, on a host with room: its data file is allocated, its table gets the new features, its volumes stay", async () => {
    const f = await dmThinFixture({ dataSizeBytes: POOL, open: false });
    await oldPool(f);
    await f.pool.open();
    assert.equal(await reservedData(f), POOL);
    assert.equal(liveLength(f), POOL);
    assert.match(f.kernel.device("thinvol-pool")?.live?.text ?? "", / 128 8192 3 skip_block_zeroing error_if_no_space no_discard_passdown$/);
    assert.ok(f.logs.some((l) => / info dm-thin pool data file allocated/.test(l)));
    assert.deepEqual(await f.pool.list(), ["db"]);
    assert.equal(await f.pool.activate("db"), "/dev/mapper/thinvol-db");
  });

  test("after a reboot, on a host too small to allocate it: served as before with one warning, allocated once the host has room", async () => {
    const f = await dmThinFixture({ dataSizeBytes: POOL, open: false });
    await oldPool(f);
    f.kernel.reboot();
    f.kernel.hostSizeBytes = 3 * GiB;
    await f.pool.open();
    assert.equal(liveLength(f), POOL, "the table is never shorter than the pool was");
    assert.equal(await reservedData(f), 100 * MiB);
    await f.pool.create("new", GiB);
    await f.pool.growIfNeeded();
    assert.equal(f.logs.filter((l) => / warn dm-thin pool data file is sparse/.test(l)).length, 1);
    f.kernel.hostSizeBytes = 10 * GiB;
    await f.pool.growIfNeeded();
    assert.equal(await reservedData(f), POOL);
    assert.deepEqual(await f.pool.list(), ["db", "new"]);
  });
});

describe("dm-thin host space: a crash in the middle of a growth", () => {
  const steps: [string, RegExp][] = [
    ["fallocate", /^fallocate .*data\.img$/],
    ["losetup --set-capacity", /^losetup --set-capacity/],
    ["dmsetup load", /^dmsetup load thinvol-pool/],
    ["dmsetup suspend", /^dmsetup suspend .*thinvol-pool$/],
    ["dmsetup resume", /^dmsetup resume .*thinvol-pool$/],
  ];
  for (const [step, re] of steps) {
    for (const when of ["before", "after"] as const) {
      for (const reboot of [false, true]) {
        test(`${when} ${step}${reboot ? ", then a reboot" : ""}: open finishes the growth; nothing suspended, no data lost, the state matches the pool`, async () => {
          const f = await dmThinFixture({ dataSizeBytes: POOL });
          await poolWithData(f, 600 * MiB);
          const crashed = f.kernel.crashWhen(re, { when });
          void f.pool.growIfNeeded();
          await crashed;
          f.kernel.revive();
          if (reboot) f.kernel.reboot();
          const pool = await f.reopen();
          assert.deepEqual(f.kernel.suspendedDevices(), []);
          assert.equal((await f.state()).dataSizeBytes, liveLength(f));
          assert.equal(liveLength(f), 1624 * MiB);
          assert.ok((await reservedData(f)) >= liveLength(f));
          assert.deepEqual(await pool.list(), ["db"]);
          await pool.activate("db");
          assert.equal(await pool.allocatedBytes("db"), 600 * MiB);
          f.kernel.write("thinvol-db", 600 * MiB, 900 * MiB);
          // And once more through a reboot: the pool is never re-created shorter than its metadata.
          f.kernel.reboot();
          const again = await f.reopen();
          await again.activate("db");
          assert.equal(await again.allocatedBytes("db"), 1500 * MiB);
        });
      }
    }
  }
});
