import assert from "node:assert/strict";
import { readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { ConflictError, InvalidRequestError, NoSpaceError, NotFoundError, ThinvolError } from "../../src/errors.js";
import { BLOCK, GiB, MiB, cleanupFixtures, dmThinFixture, type DmThinFixture } from "../support/dmthin-fixture.js";

/*
 * Resize, snapshots, rollback, clone from a snapshot and pool growth on the simulated
 * kernel: what each does to the pool and the state, and every error's kind and words.
 * Crashes in the middle of each are in dmthin-crash.test.ts.
 */

after(cleanupFixtures);

/** A volume `name` of `size` holding `blocks` written blocks, left active (and mounted: held) or not. */
async function volumeWithData(f: DmThinFixture, name: string, blocks: number, opts: { size?: number; active?: boolean; held?: boolean } = {}): Promise<void> {
  await f.pool.create(name, opts.size ?? GiB);
  await f.pool.activate(name);
  if (blocks > 0) f.kernel.write(`thinvol-${name}`, 0, blocks * BLOCK);
  if (opts.held) f.kernel.hold(`thinvol-${name}`);
  else if (!opts.active) await f.pool.deactivate(name);
}

const dmCommands = (f: DmThinFixture, from: number) => f.commandsSince(from).filter((c) => /^dmsetup (suspend|resume|load|create|remove|message)/.test(c));
const numbersAsN = (cmds: string[]) => cmds.map((c) => c.replace(/\d+/g, "N"));

async function assertAgrees(f: DmThinFixture): Promise<void> {
  const s = await f.state();
  assert.equal(s.pending, undefined, "nothing pending");
  const ids = await f.ids();
  assert.deepEqual(ids.kernel, ids.state, "the pool holds exactly the thin ids the state knows");
  assert.equal(f.kernel.transactionId(f.metaFile), s.transactionId, "transaction ids agree");
  assert.deepEqual(f.kernel.suspendedDevices(), [], "nothing suspended");
}

describe("dm-thin pool: resize", () => {
  test("an inactive volume: only its recorded size changes; activating it gives the new length", async () => {
    const f = await dmThinFixture();
    await volumeWithData(f, "db", 3);
    const from = f.kernel.log.length;
    await f.pool.resize("db", 3 * GiB);
    assert.deepEqual(dmCommands(f, from), [], "no device, no message to the pool");
    assert.equal(await f.pool.sizeOf("db"), 3 * GiB);
    assert.equal((await f.state()).volumes["db"]?.sizeBytes, 3 * GiB);
    await f.pool.activate("db");
    const t = f.kernel.device("thinvol-db")?.live;
    assert.ok(t?.kind === "thin");
    assert.equal(t.length * 512, 3 * GiB);
    assert.equal(await f.pool.allocatedBytes("db"), 3 * BLOCK, "the data is still there");
    await assertAgrees(f);
  });

  test("a mounted volume: the longer table is loaded and swapped in (suspend, resume); it stays open and takes writes past the old end", async () => {
    const f = await dmThinFixture();
    await volumeWithData(f, "db", 4, { held: true });
    const before = await f.blocksOf("db");
    assert.throws(() => f.kernel.write("thinvol-db", GiB, BLOCK), /beyond the end/);
    const from = f.kernel.log.length;
    await f.pool.resize("db", 2 * GiB);
    assert.deepEqual(numbersAsN(dmCommands(f, from)), [
      "dmsetup load thinvol-db --table N N thin N:N N",
      "dmsetup suspend --noudevsync thinvol-db",
      "dmsetup resume --noudevsync thinvol-db",
    ]);
    const dev = f.kernel.device("thinvol-db");
    assert.ok(dev?.live?.kind === "thin");
    assert.equal(dev.live.length * 512, 2 * GiB);
    assert.equal(dev.openCount, 1, "still mounted");
    assert.deepEqual(await f.blocksOf("db"), before, "same data");
    f.kernel.write("thinvol-db", GiB, BLOCK);
    assert.equal(await f.pool.allocatedBytes("db"), 5 * BLOCK);
    await assertAgrees(f);
    // A restart recognises the grown device as the volume's own.
    const pool = await f.reopen();
    assert.equal(await pool.activate("db"), "/dev/mapper/thinvol-db");
    assert.ok(!f.commandsSince(from).some((c) => c.startsWith("dmsetup create thinvol-db")));
  });

  test("the same size is a no-op: nothing runs, nothing is written", async () => {
    const f = await dmThinFixture();
    await volumeWithData(f, "db", 1, { active: true });
    const state = await readFile(join(f.dir, "dmthin-state.json"), "utf8");
    const from = f.kernel.log.length;
    await f.pool.resize("db", GiB);
    assert.deepEqual(dmCommands(f, from), []);
    assert.equal(await readFile(join(f.dir, "dmthin-state.json"), "utf8"), state);
  });

  test("a smaller size is refused, naming the volume and both sizes; nothing changes", async () => {
    const f = await dmThinFixture();
    await volumeWithData(f, "db", 1, { active: true });
    await assert.rejects(f.pool.resize("db", 512 * MiB), (err: Error) => {
      assert.ok(err instanceof ConflictError, err.name);
      assert.match(err.message, /cannot resize thin volume "db" to 512 MiB \(536870912 bytes\): it has 1 GiB \(1073741824 bytes\) and a volume never shrinks/);
      return true;
    });
    assert.equal(await f.pool.sizeOf("db"), GiB);
    const t = f.kernel.device("thinvol-db")?.live;
    assert.equal(t?.length, GiB / 512);
  });

  test("bad sizes and unknown volumes are refused by kind and name", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    for (const bad of [GiB + 1, 0, -512, Number.NaN]) {
      await assert.rejects(f.pool.resize("db", bad), (e: Error) => e instanceof InvalidRequestError && e.message.includes('"db"'));
    }
    await assert.rejects(f.pool.resize("ghost", GiB), (e: Error) => e instanceof NotFoundError && e.message.includes('"ghost"'));
  });

  test("a device of another kind at the volume's name is left alone and the resize refused before anything is written", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await f.kernel.runner.run("dmsetup", ["create", "thinvol-db", "--table", "0 2048 linear 7:0 0"]);
    await assert.rejects(f.pool.resize("db", 2 * GiB), (e: Error) => e instanceof ConflictError && /maps "0 2048 linear/.test(e.message) && e.message.includes('"db"'));
    assert.equal((await f.state()).pending, undefined);
    assert.equal(await f.pool.sizeOf("db"), GiB);
    assert.equal(f.kernel.device("thinvol-db")?.live?.length, 2048);
  });

  test("a full pool refuses it like a create, changing nothing: the filesystem's growth would write", async () => {
    const f = await dmThinFixture({ dataSizeBytes: 64 * MiB }); // 1024 blocks
    await volumeWithData(f, "big", 1024, { held: true, size: GiB });
    assert.equal((await f.pool.usage()).dataUsedBytes, 64 * MiB);
    await assert.rejects(f.pool.create("more", GiB), NoSpaceError);
    await assert.rejects(f.pool.resize("big", 2 * GiB), (e: Error) => e instanceof NoSpaceError && /cannot resize thin volume "big"/.test(e.message));
    assert.equal(f.kernel.device("thinvol-big")?.live?.length, GiB / 512);
    assert.equal(await f.pool.sizeOf("big"), GiB);
    await assertAgrees(f);
  });

  test("a failing resume is finished in-process: the error names the volume, the device ends grown and running", async () => {
    const f = await dmThinFixture();
    await volumeWithData(f, "db", 2, { held: true });
    f.kernel.failWhen(/^dmsetup resume --noudevsync thinvol-db$/, "device-mapper: resume ioctl on thinvol-db  failed: Cannot allocate memory");
    await assert.rejects(f.pool.resize("db", 2 * GiB), (e: Error) => /cannot resize thin volume "db" in pool thinvol-pool: .*Cannot allocate memory/s.test(e.message));
    assert.equal(await f.pool.sizeOf("db"), 2 * GiB);
    assert.equal(f.kernel.device("thinvol-db")?.live?.length, (2 * GiB) / 512);
    await assertAgrees(f);
  });

  test("a failing load, and a failing recovery, leave the resize pending; the next operation finishes it", async () => {
    const f = await dmThinFixture();
    await volumeWithData(f, "db", 2, { held: true });
    f.kernel.failWhen(/^dmsetup load thinvol-db/, "device-mapper: reload ioctl on thinvol-db  failed: Cannot allocate memory", 2);
    await assert.rejects(f.pool.resize("db", 2 * GiB), /cannot resize thin volume "db"/);
    assert.equal((await f.state()).pending?.op, "resize");
    // Meanwhile the device at either length is the volume's own.
    await f.pool.deactivate("other-does-not-exist");
    assert.equal(await f.pool.allocatedBytes("db"), 2 * BLOCK);
    await f.pool.create("other", GiB);
    assert.equal(await f.pool.sizeOf("db"), 2 * GiB);
    assert.equal(f.kernel.device("thinvol-db")?.live?.length, (2 * GiB) / 512);
    assert.ok(f.logs.some((l) => / warn completed an interrupted resize .*volume=db/.test(l)));
    await assertAgrees(f);
  });
});

describe("dm-thin pool: snapshots", () => {
  test("of an inactive volume: a thin id the state keeps apart from volumes; no device, nothing suspended", async () => {
    const f = await dmThinFixture();
    await volumeWithData(f, "db", 3);
    const from = f.kernel.log.length;
    await f.pool.snapshot("db", "monday");
    assert.deepEqual(numbersAsN(dmCommands(f, from)), ["dmsetup message thinvol-pool N create_snap N N", "dmsetup message thinvol-pool N set_transaction_id N N"]);
    assert.deepEqual(await f.pool.list(), ["db"], "a snapshot is not a volume");
    assert.deepEqual(await f.pool.attached(), new Set());
    assert.deepEqual(await f.pool.snapshots(), new Map([["db", ["monday"]]]));
    assert.equal(await f.pool.snapshotSizeOf("db", "monday"), GiB);
    assert.equal(await f.pool.snapshotAllocatedBytes("db", "monday"), 3 * BLOCK);
    assert.deepEqual(await f.blocksOf("db@monday"), await f.blocksOf("db"), "shares every block");
    assert.equal((await f.pool.usage()).dataUsedBytes, 3 * BLOCK, "costs nothing");
    assert.equal(f.kernel.device("thinvol-db@monday"), undefined);
    await assertAgrees(f);
  });

  test("of a mounted volume: suspended for the instant of create_snap, resumed; later writes do not reach the snapshot", async () => {
    const f = await dmThinFixture();
    await volumeWithData(f, "db", 4, { held: true });
    const before = await f.blocksOf("db");
    const from = f.kernel.log.length;
    await f.pool.snapshot("db", "s1");
    assert.deepEqual(numbersAsN(dmCommands(f, from)), [
      "dmsetup suspend --noudevsync thinvol-db",
      "dmsetup message thinvol-pool N create_snap N N",
      "dmsetup resume --noudevsync thinvol-db",
      "dmsetup message thinvol-pool N set_transaction_id N N",
    ]);
    assert.deepEqual(f.kernel.suspendedDevices(), []);
    assert.equal(f.kernel.device("thinvol-db")?.openCount, 1);
    f.kernel.write("thinvol-db", 0, 2 * BLOCK);
    f.kernel.write("thinvol-db", 10 * BLOCK, BLOCK);
    assert.deepEqual(await f.blocksOf("db@s1"), before, "the snapshot keeps the data of its instant");
    assert.notDeepEqual(await f.blocksOf("db"), before);
    assert.equal(await f.pool.snapshotAllocatedBytes("db", "s1"), 4 * BLOCK);
    assert.equal((await f.pool.usage()).dataUsedBytes, 7 * BLOCK, "only the rewritten and new blocks cost space");
    await assertAgrees(f);
  });

  test("names are per volume; snapshots() lists them by volume, sorted; they survive a restart and a reboot", async () => {
    const f = await dmThinFixture();
    await f.pool.create("b", GiB);
    await f.pool.create("a", GiB);
    for (const [v, s] of [["b", "z"], ["b", "m"], ["a", "m"]] as const) await f.pool.snapshot(v, s);
    const want = new Map([["a", ["m"]], ["b", ["m", "z"]]]);
    assert.deepEqual(await f.pool.snapshots(), want);
    assert.deepEqual([...(await f.pool.snapshots()).keys()], ["a", "b"]);
    assert.deepEqual(await (await f.reopen()).snapshots(), want);
    await f.pool.close();
    f.kernel.reboot();
    assert.deepEqual(await (await f.reopen()).snapshots(), want);
    await assertAgrees(f);
  });

  test("refusals: an existing snapshot, an unknown volume, a bad name, a nearly full pool", async () => {
    const f = await dmThinFixture({ dataSizeBytes: 64 * MiB });
    await volumeWithData(f, "db", 10);
    await f.pool.snapshot("db", "s1");
    await assert.rejects(f.pool.snapshot("db", "s1"), (e: Error) => e instanceof ConflictError && /snapshot "s1" of thin volume "db" already exists/.test(e.message));
    await assert.rejects(f.pool.snapshot("ghost", "s1"), (e: Error) => e instanceof NotFoundError && e.message.includes('"ghost"'));
    for (const bad of ["a@b", "", "-x", "x".repeat(97)]) {
      await assert.rejects(f.pool.snapshot("db", bad), (e: Error) => e instanceof InvalidRequestError && e.message.includes('"db"'), bad);
    }
    await f.pool.activate("db");
    f.kernel.write("thinvol-db", 0, 950 * BLOCK);
    await assert.rejects(f.pool.snapshot("db", "s2"), (e: Error) => {
      assert.ok(e instanceof NoSpaceError, e.name);
      assert.match(e.message, /^cannot take snapshot "s2" of thin volume "db" in pool thinvol-pool: only .* of data space is free/);
      return true;
    });
    assert.deepEqual(await f.pool.snapshots(), new Map([["db", ["s1"]]]));
    await assertAgrees(f);
  });

  test("a failing create_snap resumes the volume, names the volume and the snapshot, and leaks nothing", async () => {
    const f = await dmThinFixture();
    await volumeWithData(f, "db", 2, { held: true });
    f.kernel.failWhen(/create_snap/, "device-mapper: message ioctl on thinvol-pool  failed: Cannot allocate memory");
    await assert.rejects(f.pool.snapshot("db", "s1"), /^ThinvolError: cannot take snapshot "s1" of thin volume "db" in pool thinvol-pool: .*Cannot allocate memory/s);
    assert.deepEqual(await f.pool.snapshots(), new Map());
    await assertAgrees(f);
  });

  test("snapshots of unknown volumes and snapshots are NotFound, naming both", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await assert.rejects(f.pool.snapshotSizeOf("db", "nope"), (e: Error) => e instanceof NotFoundError && /no snapshot "nope" of thin volume "db"/.test(e.message));
    await assert.rejects(f.pool.snapshotAllocatedBytes("db", "nope"), NotFoundError);
  });

  test("remove: the thin id is deleted and its own blocks freed; the volume keeps its data; idempotent", async () => {
    const f = await dmThinFixture();
    await volumeWithData(f, "db", 4, { held: true });
    await f.pool.snapshot("db", "s1");
    f.kernel.write("thinvol-db", 0, 4 * BLOCK); // the volume now owns new blocks; the snapshot alone holds the old ones
    assert.equal((await f.pool.usage()).dataUsedBytes, 8 * BLOCK);
    const blocks = await f.blocksOf("db");
    await f.pool.removeSnapshot("db", "s1");
    assert.deepEqual(await f.pool.snapshots(), new Map());
    assert.equal((await f.pool.usage()).dataUsedBytes, 4 * BLOCK);
    assert.deepEqual(await f.blocksOf("db"), blocks);
    await f.pool.removeSnapshot("db", "s1");
    await f.pool.removeSnapshot("ghost", "s1");
    await assertAgrees(f);
  });

  test("a volume with snapshots is not removed: the error names them; once they are gone it is", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await f.pool.snapshot("db", "a");
    await f.pool.snapshot("db", "b");
    await assert.rejects(f.pool.remove("db"), (e: Error) => {
      assert.ok(e instanceof ConflictError);
      assert.match(e.message, /thin volume "db" has 2 snapshots \("a", "b"\); remove them first/);
      return true;
    });
    assert.deepEqual(await f.pool.list(), ["db"]);
    assert.equal((await f.state()).pending, undefined);
    await f.pool.removeSnapshot("db", "a");
    await f.pool.removeSnapshot("db", "b");
    await f.pool.remove("db");
    assert.deepEqual(await f.pool.list(), []);
    await assertAgrees(f);
  });

  test("a state file from before snapshots (no snapshots field) loads; a damaged snapshot entry is reported", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    const raw = JSON.parse(await readFile(join(f.dir, "dmthin-state.json"), "utf8")) as Record<string, unknown>;
    assert.equal(raw["snapshots"], undefined, "an empty snapshot table is not written");
    const pool = await f.reopen();
    await pool.snapshot("db", "s1");
    const withSnap = JSON.parse(await readFile(join(f.dir, "dmthin-state.json"), "utf8")) as { snapshots: Record<string, unknown> };
    assert.deepEqual(Object.keys(withSnap.snapshots), ["db@s1"]);
    await writeFile(join(f.dir, "dmthin-state.json"), JSON.stringify({ ...withSnap, snapshots: { "db-s1": withSnap.snapshots["db@s1"] } }));
    await assert.rejects(f.reopen(), (e: Error) => /dmthin-state.json is damaged at snapshots/.test(e.message));
  });

  test("snapshot ids are never handed to a new volume", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await f.pool.snapshot("db", "s1");
    const s = await f.state();
    // Make the next id the snapshot's: allocation must skip it.
    const snapId = s.snapshots?.["db@s1"]?.id ?? -1;
    await writeFile(join(f.dir, "dmthin-state.json"), JSON.stringify({ ...s, nextId: snapId }));
    const pool = await f.reopen();
    await pool.create("other", GiB);
    assert.notEqual((await f.state()).volumes["other"]?.id, snapId);
    await assertAgrees(f);
  });
});

describe("dm-thin pool: rollback", () => {
  test("the volume gets the snapshot's data and size under its name; its old data is freed; the snapshot stays", async () => {
    const f = await dmThinFixture();
    await volumeWithData(f, "db", 4, { held: true });
    await f.pool.snapshot("db", "s1");
    const snapBlocks = await f.blocksOf("db@s1");
    f.kernel.write("thinvol-db", 0, 6 * BLOCK);
    await f.pool.resize("db", 2 * GiB);
    f.kernel.release("thinvol-db");
    await f.pool.deactivate("db");
    const oldId = (await f.state()).volumes["db"]?.id;
    assert.equal((await f.pool.usage()).dataUsedBytes, 10 * BLOCK);
    const from = f.kernel.log.length;
    await f.pool.rollback("db", "s1");
    assert.deepEqual(numbersAsN(dmCommands(f, from)), [
      "dmsetup message thinvol-pool N create_snap N N",
      "dmsetup message thinvol-pool N set_transaction_id N N",
      "dmsetup message thinvol-pool N delete N",
    ]);
    const s = await f.state();
    assert.notEqual(s.volumes["db"]?.id, oldId, "a new thin id");
    assert.ok(!f.kernel.thinIds(f.metaFile).includes(oldId ?? -1), "the old id is deleted");
    assert.deepEqual(await f.blocksOf("db"), snapBlocks, "the snapshot's data, block for block");
    assert.equal(await f.pool.sizeOf("db"), GiB, "the snapshot's size");
    assert.deepEqual(await f.pool.snapshots(), new Map([["db", ["s1"]]]));
    assert.equal((await f.pool.usage()).dataUsedBytes, 4 * BLOCK, "the data written after the snapshot is freed");
    assert.equal(await f.pool.allocatedBytes("db"), 4 * BLOCK);
    await f.pool.activate("db");
    assert.equal(f.kernel.device("thinvol-db")?.live?.length, GiB / 512);
    // The rolled-back volume is writable and does not touch the snapshot.
    f.kernel.write("thinvol-db", 0, BLOCK);
    assert.deepEqual(await f.blocksOf("db@s1"), snapBlocks);
    await f.pool.deactivate("db");
    await f.pool.rollback("db", "s1");
    assert.deepEqual(await f.blocksOf("db"), snapBlocks, "a second rollback again");
    await assertAgrees(f);
  });

  test("refused while the volume's device is active, mounted or not, and nothing changes", async () => {
    const f = await dmThinFixture();
    await volumeWithData(f, "db", 2, { held: true });
    await f.pool.snapshot("db", "s1");
    const state = await readFile(join(f.dir, "dmthin-state.json"), "utf8");
    await assert.rejects(f.pool.rollback("db", "s1"), (e: Error) => {
      assert.ok(e instanceof ConflictError, e.name);
      assert.match(e.message, /cannot roll thin volume "db" back to snapshot "s1": its device \/dev\/mapper\/thinvol-db is in use \(open 1 times\); unmount and deactivate the volume first/);
      return true;
    });
    f.kernel.release("thinvol-db");
    await assert.rejects(f.pool.rollback("db", "s1"), (e: Error) => e instanceof ConflictError && /thinvol-db is active; unmount and deactivate/.test(e.message));
    assert.equal(await readFile(join(f.dir, "dmthin-state.json"), "utf8"), state);
    assert.ok(f.kernel.device("thinvol-db"), "the device is left as it was");
  });

  test("unknown volume or snapshot: NotFound naming them", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await assert.rejects(f.pool.rollback("db", "nope"), (e: Error) => e instanceof NotFoundError && /no snapshot "nope" of thin volume "db"/.test(e.message));
    await assert.rejects(f.pool.rollback("ghost", "s1"), (e: Error) => e instanceof NotFoundError && e.message.includes('"ghost"'));
  });

  test("a failing delete of the old id, after the commit point, is finished by recovery", async () => {
    const f = await dmThinFixture();
    await volumeWithData(f, "db", 2);
    await f.pool.snapshot("db", "s1");
    const oldId = (await f.state()).volumes["db"]?.id ?? -1;
    f.kernel.failWhen(new RegExp(`^dmsetup message thinvol-pool 0 delete ${oldId}$`), "device-mapper: message ioctl on thinvol-pool  failed: Cannot allocate memory");
    await assert.rejects(f.pool.rollback("db", "s1"), (e: Error) => /^cannot restore snapshot "s1" to thin volume "db" in pool thinvol-pool: .*Cannot allocate memory/s.test(e.message));
    assert.deepEqual(await f.blocksOf("db"), await f.blocksOf("db@s1"));
    assert.ok(!f.kernel.thinIds(f.metaFile).includes(oldId));
    await assertAgrees(f);
  });
});

describe("dm-thin pool: clone from a snapshot", () => {
  test("the clone has the snapshot's data and size; nothing is suspended, even with the origin mounted", async () => {
    const f = await dmThinFixture();
    await volumeWithData(f, "db", 3, { held: true });
    await f.pool.snapshot("db", "s1");
    f.kernel.write("thinvol-db", 0, 5 * BLOCK);
    await f.pool.resize("db", 4 * GiB);
    const from = f.kernel.log.length;
    await f.pool.clone("copy", "db", { snapshot: "s1" });
    assert.deepEqual(numbersAsN(dmCommands(f, from)), ["dmsetup message thinvol-pool N create_snap N N", "dmsetup message thinvol-pool N set_transaction_id N N"]);
    assert.deepEqual(await f.pool.list(), ["copy", "db"]);
    assert.equal(await f.pool.sizeOf("copy"), GiB, "the snapshot's size, not the volume's now");
    assert.deepEqual(await f.blocksOf("copy"), await f.blocksOf("db@s1"));
    assert.equal(await f.pool.allocatedBytes("copy"), 3 * BLOCK);
    // Independent of the snapshot it came from.
    await f.pool.removeSnapshot("db", "s1");
    await f.pool.activate("copy");
    assert.equal(await f.pool.allocatedBytes("copy"), 3 * BLOCK);
    await assertAgrees(f);
  });

  test("refusals: unknown snapshot, a name that exists, a nearly full pool", async () => {
    const f = await dmThinFixture({ dataSizeBytes: 64 * MiB });
    await volumeWithData(f, "db", 1, { active: true });
    await f.pool.snapshot("db", "s1");
    await assert.rejects(f.pool.clone("copy", "db", { snapshot: "nope" }), (e: Error) => e instanceof NotFoundError && /no snapshot "nope" of thin volume "db"/.test(e.message));
    await assert.rejects(f.pool.clone("copy", "ghost", { snapshot: "s1" }), (e: Error) => e instanceof NotFoundError && e.message.includes('"ghost"'));
    await assert.rejects(f.pool.clone("db", "db", { snapshot: "s1" }), (e: Error) => e instanceof ConflictError && /thin volume "db" already exists/.test(e.message));
    f.kernel.write("thinvol-db", BLOCK, 950 * BLOCK);
    await assert.rejects(f.pool.clone("copy", "db", { snapshot: "s1" }), (e: Error) => {
      assert.ok(e instanceof NoSpaceError, e.name);
      assert.match(e.message, /^cannot clone snapshot "s1" of "db" as thin volume "copy" in pool thinvol-pool: only/);
      return true;
    });
    assert.deepEqual(await f.pool.list(), ["db"]);
  });
});

describe("dm-thin pool: grow", () => {
  test("on files: a larger maximum at run time, metadata grown with it, a mounted volume undisturbed; a restart with the old POOL_SIZE keeps it", async () => {
    const f = await dmThinFixture({ dataSizeBytes: GiB });
    await volumeWithData(f, "db", 4, { held: true });
    await f.pool.grow(40 * GiB);
    const u = await f.pool.usage();
    assert.equal(u.dataTotalBytes, 40 * GiB);
    assert.equal((await stat(f.metaFile)).size, 30 * MiB, "metadata for 40 GiB");
    const s = await f.state();
    assert.equal(s.maxDataBytes, 40 * GiB);
    assert.equal(s.metaSizeBytes, 30 * MiB);
    // The new low-water mark (the 4 GiB headroom) is in the table, and the headroom is reserved.
    const live = f.kernel.device("thinvol-pool")?.live;
    assert.ok(live?.kind === "thin-pool");
    assert.match(live.text, / 128 65536 3 skip_block_zeroing/);
    assert.equal(s.dataSizeBytes, 8 * GiB + 4 * BLOCK, "reserved twice the new headroom above what is used");
    assert.deepEqual(f.kernel.suspendedDevices(), []);
    assert.equal(f.kernel.device("thinvol-db")?.openCount, 1);
    f.kernel.write("thinvol-db", 100 * BLOCK, BLOCK);
    const pool = await f.reopen({ dataSizeBytes: GiB });
    assert.equal((await pool.usage()).dataTotalBytes, 40 * GiB);
    assert.ok(f.logs.some((l) => / warn POOL_SIZE is smaller than the size the pool was grown to/.test(l)));
    // A larger POOL_SIZE still wins.
    assert.equal((await (await f.reopen({ dataSizeBytes: 50 * GiB })).usage()).dataTotalBytes, 50 * GiB);
    await assertAgrees(f);
  });

  test("a smaller size is refused; the same is a no-op; a bad one is invalid", async () => {
    const f = await dmThinFixture({ dataSizeBytes: 2 * GiB });
    await assert.rejects(f.pool.grow(GiB), (e: Error) => {
      assert.ok(e instanceof ConflictError, e.name);
      assert.match(e.message, /cannot grow dm-thin pool thinvol-pool to 1 GiB \(1073741824 bytes\): it already has 2 GiB \(2147483648 bytes\) and a pool never shrinks/);
      return true;
    });
    const from = f.kernel.log.length;
    await f.pool.grow(2 * GiB);
    await f.pool.grow(2 * GiB + 1000); // less than a block more
    assert.deepEqual(dmCommands(f, from), []);
    await assert.rejects(f.pool.grow(-1), InvalidRequestError);
    assert.equal((await f.state()).maxDataBytes, undefined);
  });

  test("on a device: the pool takes more of an enlarged device at once; not beyond it; kept after a reboot", async () => {
    const f = await dmThinFixture({ backing: { disk: GiB } });
    await volumeWithData(f, "db", 2, { held: true });
    const disk = f.kernel.disk(f.disk ?? "");
    await assert.rejects(f.pool.grow(2 * GiB), (e: Error) => {
      assert.ok(e instanceof NoSpaceError, e.name);
      assert.match(e.message, /cannot grow dm-thin pool thinvol-pool to 2 GiB .*: its POOL_DEVICE .* has only 1 GiB \(1073741824 bytes\); enlarge the device first/);
      return true;
    });
    disk.sizeBytes = 3 * GiB;
    await f.pool.grow(2 * GiB);
    assert.equal(f.kernel.device("thinvol-pool")?.live?.length, (2 * GiB) / 512);
    assert.equal((await f.pool.usage()).dataTotalBytes, 2 * GiB);
    const s = (await f.state()) as unknown as { dataSizeBytes: number; dataDevice: { sizeBytes: number } };
    assert.equal(s.dataSizeBytes, 2 * GiB);
    assert.equal(s.dataDevice.sizeBytes, 3 * GiB);
    assert.equal(f.kernel.device("thinvol-db")?.openCount, 1);
    f.kernel.release("thinvol-db");
    await f.pool.deactivate("db");
    await f.pool.close();
    f.kernel.reboot();
    const pool = await f.reopen();
    assert.equal(f.kernel.device("thinvol-pool")?.live?.length, (2 * GiB) / 512);
    assert.equal((await pool.usage()).dataTotalBytes, 2 * GiB);
    await pool.grow(3 * GiB);
    assert.equal((await pool.usage()).dataTotalBytes, 3 * GiB);
    await assertAgrees(f);
  });

  test("errors from the kernel name the pool and keep the old maximum", async () => {
    const f = await dmThinFixture({ dataSizeBytes: GiB });
    f.kernel.failWhen(/^dmsetup load thinvol-pool/, "device-mapper: reload ioctl on thinvol-pool  failed: Invalid argument");
    await assert.rejects(f.pool.grow(40 * GiB), (e: Error) => e instanceof ThinvolError && /^cannot grow dm-thin pool thinvol-pool to 40 GiB: .*Invalid argument/s.test(e.message));
    assert.equal((await f.pool.usage()).dataTotalBytes, GiB);
    assert.equal((await f.state()).maxDataBytes, undefined);
    await f.pool.grow(40 * GiB);
    assert.equal((await f.pool.usage()).dataTotalBytes, 40 * GiB);
  });
});
