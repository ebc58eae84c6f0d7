import assert from "node:assert/strict";
import { after, describe, test } from "node:test";
import { cutRanges, mappedRangesFromThinDelta, parseThinDelta } from "../../src/backup/plan.js";
import { ConflictError, NotFoundError } from "../../src/errors.js";
import { BLOCK, GiB, MiB, cleanupFixtures, dmThinFixture, type DmThinFixture } from "../support/dmthin-fixture.js";

/*
 * What a backup needs from the dm-thin pool, on the simulated kernel: a snapshot opened for
 * reading (a read-only device of its own per reader, gone on release, left ones cleaned up)
 * and the ranges a snapshot maps or changed since another (thin_delta on a metadata snapshot,
 * always released).
 */

after(cleanupFixtures);

/** Volume `db` (1 GiB) with `blocks` written pool blocks at the start, and its snapshot `s1`; the volume stays active. */
async function snapshotted(blocks = 3): Promise<DmThinFixture> {
  const f = await dmThinFixture();
  await f.pool.create("db", GiB);
  await f.pool.activate("db");
  f.kernel.write("thinvol-db", 0, blocks * BLOCK);
  await f.pool.snapshot("db", "s1");
  return f;
}

const deviceName = (path: string) => path.replace("/dev/mapper/", "");
const readerDevices = (f: DmThinFixture) => [...f.kernel.devices.keys()].filter((n) => n.includes("@")).sort();
const thinCommands = (f: DmThinFixture, from: number) =>
  f.commandsSince(from).filter((c) => /^thin_delta|^dmsetup message/.test(c)).map((c) => c.replace(/\/dev\/loop\d+/, "META"));

async function assertAgrees(f: DmThinFixture): Promise<void> {
  const ids = await f.ids();
  assert.deepEqual(ids.kernel, ids.state, "the pool holds exactly the thin ids the state knows");
  assert.equal((await f.state()).pending, undefined, "nothing pending");
}

describe("dm-thin pool: openSnapshot", () => {
  test("activates the snapshot's thin id read-only under a name no volume can have; release() removes it", async () => {
    const f = await snapshotted();
    const reader = await f.pool.openSnapshot("db", "s1");
    const name = deviceName(reader.path);
    assert.match(name, /^thinvol-@read-\d+-\d+$/);
    const dev = f.kernel.device(name);
    assert.ok(dev?.live?.kind === "thin");
    assert.equal(dev.readOnly, true, "made with --readonly");
    assert.equal(dev.live.id, (await f.state()).snapshots?.["db@s1"]?.id, "maps the snapshot's thin id");
    assert.equal(dev.live.length * 512, GiB, "the snapshot's size");
    assert.ok(f.kernel.nodes.has(reader.path), "its /dev/mapper node exists");
    assert.throws(() => f.kernel.write(name, 0, BLOCK), /Operation not permitted/);
    assert.deepEqual(await f.blocksOf("db@s1"), await f.blocksOf("db"), "the snapshot shares the volume's blocks");
    f.kernel.write("thinvol-db", 0, BLOCK);
    assert.ok(f.kernel.device("thinvol-db"), "the volume stays in use meanwhile");

    await reader.release();
    assert.equal(f.kernel.device(name), undefined, "the device is gone");
    assert.ok(!f.kernel.nodes.has(reader.path), "and its node");
    await reader.release();
    await f.pool.removeSnapshot("db", "s1");
    await assertAgrees(f);
  });

  test("two readers of one snapshot at once: each its own device; releasing one leaves the other", async () => {
    const f = await snapshotted();
    const a = await f.pool.openSnapshot("db", "s1");
    const b = await f.pool.openSnapshot("db", "s1");
    assert.notEqual(a.path, b.path);
    assert.equal(readerDevices(f).length, 2);
    await a.release();
    assert.deepEqual(readerDevices(f), [deviceName(b.path)]);
    assert.ok(f.kernel.device(deviceName(b.path))?.readOnly);
    await b.release();
    assert.deepEqual(readerDevices(f), []);
  });

  test("an unknown snapshot: NotFoundError naming it and the volume, no device made", async () => {
    const f = await snapshotted();
    await assert.rejects(f.pool.openSnapshot("db", "nope"), (e: Error) => e instanceof NotFoundError && /snapshot "nope" of thin volume "db"/.test(e.message));
    await assert.rejects(f.pool.openSnapshot("other", "s1"), (e: Error) => e instanceof NotFoundError && /"other"/.test(e.message));
    assert.deepEqual(readerDevices(f), []);
  });

  test("removeSnapshot while a reader is open is refused, naming the snapshot and its reader; after release() it goes", async () => {
    const f = await snapshotted();
    const reader = await f.pool.openSnapshot("db", "s1");
    await assert.rejects(f.pool.removeSnapshot("db", "s1"), (e: Error) => {
      assert.ok(e instanceof ConflictError, String(e));
      assert.match(e.message, /snapshot "s1" of thin volume "db" is being read/);
      assert.ok(e.message.includes(reader.path), e.message);
      return true;
    });
    assert.deepEqual(await f.pool.snapshots(), new Map([["db", ["s1"]]]), "the snapshot stays");
    await reader.release();
    await f.pool.removeSnapshot("db", "s1");
    assert.deepEqual(await f.pool.snapshots(), new Map());
    await assertAgrees(f);
  });

  test("release() while the device is still open is refused (ConflictError); the reader stays usable and releases later", async () => {
    const f = await snapshotted();
    const reader = await f.pool.openSnapshot("db", "s1");
    f.kernel.hold(deviceName(reader.path));
    await assert.rejects(reader.release(), (e: Error) => e instanceof ConflictError && /still open/.test(e.message) && /snapshot "s1"/.test(e.message));
    await assert.rejects(f.pool.removeSnapshot("db", "s1"), ConflictError);
    f.kernel.release(deviceName(reader.path));
    await reader.release();
    assert.deepEqual(readerDevices(f), []);
  });

  test("a reader left by a killed process is removed at the next open(), and blocks neither removeSnapshot nor removing the volume", async () => {
    const f = await snapshotted();
    const reader = await f.pool.openSnapshot("db", "s1");
    // The process dies without release(): a new one opens the pool.
    const pool = await f.reopen();
    assert.equal(f.kernel.device(deviceName(reader.path)), undefined, "the left reader is gone");
    assert.ok(f.logs.some((l) => l.includes("removed a snapshot reader left by an earlier run")));
    await pool.removeSnapshot("db", "s1");
    await pool.deactivate("db");
    await pool.remove("db");
    await assertAgrees(f);
  });

  test("a crash right after the device was made: the device is removed at the next open()", async () => {
    const f = await snapshotted();
    const crashed = f.kernel.crashWhen(/^dmsetup create .*--readonly/, { when: "after" });
    void f.pool.openSnapshot("db", "s1");
    await crashed;
    f.kernel.revive();
    assert.equal(readerDevices(f).length, 1);
    const pool = await f.reopen();
    assert.deepEqual(readerDevices(f), []);
    await pool.removeSnapshot("db", "s1");
    await assertAgrees(f);
  });

  test("a left reader still open at open() stays (open works); removeSnapshot refuses naming it until it is closed, then removes it", async () => {
    const f = await snapshotted();
    const reader = await f.pool.openSnapshot("db", "s1");
    const name = deviceName(reader.path);
    f.kernel.hold(name); // a reading process outlived the plugin
    const pool = await f.reopen();
    assert.ok(f.kernel.device(name), "left in place while open");
    await assert.rejects(pool.removeSnapshot("db", "s1"), (e: Error) => e instanceof ConflictError && e.message.includes(reader.path) && /snapshot "s1" of thin volume "db"/.test(e.message));
    f.kernel.release(name);
    await pool.removeSnapshot("db", "s1");
    assert.deepEqual(readerDevices(f), []);
    await assertAgrees(f);
  });

  test("a device with a reader's name that is not a thin device of this pool is left alone", async () => {
    const f = await snapshotted();
    await f.kernel.runner.run("dmsetup", ["create", "thinvol-@read-1-1", "--table", "0 2048 linear /dev/loop9 0"]);
    await f.reopen();
    assert.ok(f.kernel.device("thinvol-@read-1-1"), "untouched");
    assert.ok(f.logs.some((l) => l.includes("not a thin device of this pool")));
  });

  test("close() removes idle readers and takes the pool down; a reader still open keeps the pool up", async () => {
    const f = await snapshotted();
    await f.pool.deactivate("db");
    const idle = await f.pool.openSnapshot("db", "s1");
    await f.pool.close();
    assert.deepEqual([...f.kernel.devices.keys()], [], "no reader, no pool left");
    await idle.release(); // nothing left to do

    const pool = await f.reopen();
    const busy = await pool.openSnapshot("db", "s1");
    f.kernel.hold(deviceName(busy.path));
    await pool.close();
    assert.ok(f.kernel.device("thinvol-pool"), "the pool stays up under an open reader");
    assert.ok(f.kernel.device(deviceName(busy.path)));
    f.kernel.release(deviceName(busy.path));
    await f.reopen();
    assert.deepEqual(readerDevices(f), [], "removed at the next open()");
  });
});

describe("dm-thin pool: changedRanges", () => {
  test("without since: the pool blocks the snapshot maps, in bytes, from thin_delta of its id with itself on a metadata snapshot", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await f.pool.activate("db");
    f.kernel.write("thinvol-db", 0, 3 * BLOCK);
    f.kernel.write("thinvol-db", 100 * BLOCK + 10, 5);
    f.kernel.write("thinvol-db", 512 * MiB, 2 * BLOCK);
    await f.pool.snapshot("db", "s1");
    const id = (await f.state()).snapshots?.["db@s1"]?.id;
    const from = f.kernel.log.length;
    const ranges = await f.pool.changedRanges("db", "s1");
    assert.deepEqual(ranges, [
      { offset: 0, length: 3 * BLOCK },
      { offset: 100 * BLOCK, length: BLOCK },
      { offset: 512 * MiB, length: 2 * BLOCK },
    ]);
    assert.deepEqual(thinCommands(f, from), [
      "dmsetup message thinvol-pool 0 reserve_metadata_snap",
      `thin_delta --metadata-snap --snap1 ${id} --snap2 ${id} META`,
      "dmsetup message thinvol-pool 0 release_metadata_snap",
    ]);
    assert.equal(f.kernel.meta(f.metaFile).metadataSnap, undefined, "released");
  });

  test("with since: only what was written in between (changed and newly mapped blocks), not what both share", async () => {
    const f = await snapshotted(10);
    f.kernel.write("thinvol-db", 2 * BLOCK, 1); // a shared block, copied on write
    f.kernel.write("thinvol-db", 300 * BLOCK, 2 * BLOCK); // new blocks
    await f.pool.snapshot("db", "s2");
    const s = (await f.state()).snapshots ?? {};
    const from = f.kernel.log.length;
    assert.deepEqual(await f.pool.changedRanges("db", "s2", "s1"), [
      { offset: 2 * BLOCK, length: BLOCK },
      { offset: 300 * BLOCK, length: 2 * BLOCK },
    ]);
    assert.deepEqual(thinCommands(f, from), [
      "dmsetup message thinvol-pool 0 reserve_metadata_snap",
      `thin_delta --metadata-snap --snap1 ${s["db@s1"]?.id} --snap2 ${s["db@s2"]?.id} META`,
      "dmsetup message thinvol-pool 0 release_metadata_snap",
    ]);
    assert.deepEqual(await f.pool.changedRanges("db", "s2", "s2"), [], "a snapshot against itself: nothing changed");
  });

  test("ranges are cut at the snapshot's size (its last pool block reaches past the end)", async () => {
    const f = await dmThinFixture();
    const size = 10 * BLOCK + 4096;
    await f.pool.create("db", size);
    await f.pool.activate("db");
    f.kernel.write("thinvol-db", 9 * BLOCK, BLOCK + 4096);
    await f.pool.snapshot("db", "s1");
    assert.deepEqual(await f.pool.changedRanges("db", "s1"), [{ offset: 9 * BLOCK, length: BLOCK + 4096 }]);
  });

  test("a failing thin_delta: the metadata snapshot is released all the same, and the error names the volume, the snapshot and the cause", async () => {
    const f = await snapshotted();
    f.kernel.failWhen(/^thin_delta/, "thin_delta: bad checksum in btree node");
    const from = f.kernel.log.length;
    await assert.rejects(f.pool.changedRanges("db", "s1"), (e: Error) => /snapshot "s1" of thin volume "db"/.test(e.message) && /bad checksum in btree node/.test(e.message));
    assert.deepEqual(
      thinCommands(f, from).map((c) => c.replace(/\d+ --snap2 \d+/, "A --snap2 B")),
      ["dmsetup message thinvol-pool 0 reserve_metadata_snap", "thin_delta --metadata-snap --snap1 A --snap2 B META", "dmsetup message thinvol-pool 0 release_metadata_snap"],
    );
    assert.equal(f.kernel.meta(f.metaFile).metadataSnap, undefined, "released");
    assert.equal((await f.pool.changedRanges("db", "s1")).length, 1, "works again");
  });

  test("a metadata snapshot left reserved by a killed process is released by the next open() (it would keep deleted blocks allocated)", async () => {
    const f = await snapshotted();
    const crashed = f.kernel.crashWhen(/^thin_delta/, { when: "before" });
    void f.pool.changedRanges("db", "s1");
    await crashed;
    f.kernel.revive();
    assert.ok(f.kernel.meta(f.metaFile).metadataSnap, "left reserved");
    const pool = await f.reopen();
    assert.equal(f.kernel.meta(f.metaFile).metadataSnap, undefined, "released at open()");
    assert.ok(f.logs.some((l) => l.includes("metadata snapshot an earlier run left reserved")));
    const from = f.kernel.log.length;
    assert.deepEqual(await pool.changedRanges("db", "s1"), [{ offset: 0, length: 3 * BLOCK }]);
    assert.deepEqual(
      thinCommands(f, from).filter((c) => c.startsWith("dmsetup")),
      ["dmsetup message thinvol-pool 0 reserve_metadata_snap", "dmsetup message thinvol-pool 0 release_metadata_snap"],
    );
  });

  test("a metadata snapshot found reserved when taking one is released and taken again", async () => {
    const f = await snapshotted();
    await f.kernel.runner.run("dmsetup", ["message", "thinvol-pool", "0", "reserve_metadata_snap"]);
    const from = f.kernel.log.length;
    assert.deepEqual(await f.pool.changedRanges("db", "s1"), [{ offset: 0, length: 3 * BLOCK }]);
    assert.deepEqual(
      thinCommands(f, from).filter((c) => c.startsWith("dmsetup")),
      [
        "dmsetup message thinvol-pool 0 reserve_metadata_snap",
        "dmsetup message thinvol-pool 0 release_metadata_snap",
        "dmsetup message thinvol-pool 0 reserve_metadata_snap",
        "dmsetup message thinvol-pool 0 release_metadata_snap",
      ],
    );
    assert.equal(f.kernel.meta(f.metaFile).metadataSnap, undefined);
  });

  test("unknown snapshots: NotFoundError naming them, and no metadata snapshot is taken", async () => {
    const f = await snapshotted();
    const from = f.kernel.log.length;
    await assert.rejects(f.pool.changedRanges("db", "nope"), (e: Error) => e instanceof NotFoundError && /snapshot "nope" of thin volume "db"/.test(e.message));
    await assert.rejects(f.pool.changedRanges("db", "s1", "gone"), (e: Error) => e instanceof NotFoundError && /snapshot "gone" of thin volume "db"/.test(e.message));
    assert.deepEqual(thinCommands(f, from), []);
  });
});

describe("thin_delta of a device with itself: parsing", () => {
  // Printed by thin_delta 0.9.0 on Debian's kernel for a snapshot mapping blocks 0-2, 100 and 200.
  const selfDelta = `<superblock uuid="" time="2" transaction="0" data_block_size="128" nr_data_blocks="0">
  <diff left="2" right="2">
    <same begin="0" length="3"/>
    <same begin="100" length="1"/>
    <same begin="200" length="1"/>
  </diff>
</superblock>`;

  test("every run is a mapped range, in bytes of the pool's block size, merged", () => {
    assert.deepEqual(mappedRangesFromThinDelta(parseThinDelta(selfDelta)), [
      { offset: 0, length: 3 * BLOCK },
      { offset: 100 * BLOCK, length: BLOCK },
      { offset: 200 * BLOCK, length: BLOCK },
    ]);
  });

  test("against another device: what the right side maps (same, different, right_only), not what only the left maps", () => {
    const xml = `<superblock uuid="" time="2" transaction="0" data_block_size="256" nr_data_blocks="0">
  <diff left="2" right="3">
    <same begin="0" length="1"/>
    <different begin="1" length="1"/>
    <left_only begin="5" length="2"/>
    <right_only begin="300" length="2"/>
  </diff>
</superblock>`;
    const block = 256 * 512;
    assert.deepEqual(mappedRangesFromThinDelta(parseThinDelta(xml)), [
      { offset: 0, length: 2 * block },
      { offset: 300 * block, length: 2 * block },
    ]);
  });

  test("nothing mapped: no ranges", () => {
    assert.deepEqual(mappedRangesFromThinDelta(parseThinDelta(`<superblock uuid="" time="0" transaction="0" data_block_size="128" nr_data_blocks="0">\n  <diff left="1" right="1">\n  </diff>\n</superblock>`)), []);
  });

  test("cutRanges: nothing at or past the end, a range across it shortened", () => {
    assert.deepEqual(
      cutRanges(
        [
          { offset: 0, length: 10 },
          { offset: 90, length: 20 },
          { offset: 100, length: 5 },
          { offset: 200, length: 5 },
        ],
        100,
      ),
      [
        { offset: 0, length: 10 },
        { offset: 90, length: 10 },
      ],
    );
  });
});
