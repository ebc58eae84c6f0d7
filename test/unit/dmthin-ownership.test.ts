import assert from "node:assert/strict";
import { after, describe, test } from "node:test";
import { ConflictError } from "../../src/errors.js";
import { BLOCK, GiB, cleanupFixtures, dmThinFixture, type DmThinFixture } from "../support/dmthin-fixture.js";

/*
 * A device named like a volume (`thinvol-<volume>`) that is not that volume's thin device
 * of this pool: thinvol never suspends, resumes, discards, removes or reads it, and the
 * volume and its record stay as they were.
 */

after(cleanupFixtures);

/** Puts an unrelated device at the volume's name. */
async function foreignDevice(f: DmThinFixture, volume: string): Promise<void> {
  await f.kernel.runner.run("dmsetup", ["create", `thinvol-${volume}`, "--table", "0 2048 linear /dev/sdz 0"]);
}

/** Commands since `from` that touched the device, other than looking at it. */
function touched(f: DmThinFixture, from: number, volume: string): string[] {
  const dev = `thinvol-${volume}`;
  return f
    .commandsSince(from)
    .filter((c) => c.endsWith(` ${dev}`) || c.endsWith(`/${dev}`))
    .filter((c) => !/^dmsetup (table|info) /.test(c));
}

function assertForeignError(err: unknown, volume: string): true {
  assert.ok(err instanceof ConflictError, String(err));
  assert.ok(err.message.includes(`thinvol-${volume}`), err.message);
  assert.match(err.message, /maps "0 2048 linear \/dev\/sdz 0"/);
  assert.match(err.message, /dmsetup remove thinvol-/);
  return true;
}

async function assertVolumeKept(f: DmThinFixture, volume: string, id: number): Promise<void> {
  assert.ok((await f.pool.list()).includes(volume));
  assert.ok(f.kernel.thinIds(f.metaFile).includes(id));
  const s = await f.state();
  assert.equal(s.volumes[volume]?.id, id);
  assert.equal(s.pending, undefined);
  const dev = f.kernel.device(`thinvol-${volume}`);
  assert.equal(dev?.live?.kind, "other", "the foreign device is still there");
  assert.equal(dev.suspended, false);
}

describe("dm-thin pool: a device with a volume's name that is not the volume", () => {
  test("remove fails with a ConflictError, and neither discards nor removes that device", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    const id = (await f.state()).volumes["db"]?.id ?? -1;
    await foreignDevice(f, "db");
    const from = f.kernel.log.length;
    await assert.rejects(f.pool.remove("db"), (e) => assertForeignError(e, "db"));
    assert.deepEqual(touched(f, from, "db"), []);
    assert.ok(!f.commandsSince(from).some((c) => c.startsWith("blkdiscard")));
    await assertVolumeKept(f, "db", id);
  });

  test("deactivate fails and leaves it; so does activate", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await foreignDevice(f, "db");
    const from = f.kernel.log.length;
    await assert.rejects(f.pool.deactivate("db"), (e) => assertForeignError(e, "db"));
    await assert.rejects(f.pool.activate("db"), (e) => assertForeignError(e, "db"));
    assert.deepEqual(touched(f, from, "db"), []);
    await assertVolumeKept(f, "db", 1);
  });

  test("a thin device of this pool with another volume's id is not the volume either", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await f.pool.create("other", GiB);
    await f.pool.activate("other");
    f.kernel.write("thinvol-other", 0, 2 * BLOCK);
    const otherTable = f.kernel.device("thinvol-other")?.live?.text ?? "";
    await f.kernel.runner.run("dmsetup", ["create", "thinvol-db", "--table", otherTable]);
    const from = f.kernel.log.length;
    await assert.rejects(f.pool.remove("db"), ConflictError);
    await assert.rejects(f.pool.deactivate("db"), ConflictError);
    assert.deepEqual(touched(f, from, "db"), []);
    assert.ok(f.kernel.device("thinvol-db"));
    assert.deepEqual(await f.pool.list(), ["db", "other"]);
    assert.equal(await f.pool.allocatedBytes("other"), 2 * BLOCK, "the other volume's data is untouched");
  });

  test("clone of an origin whose name is taken is refused before anything is suspended or made", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await foreignDevice(f, "db");
    const tx = f.kernel.transactionId(f.metaFile);
    const from = f.kernel.log.length;
    await assert.rejects(f.pool.clone("copy", "db"), (e) => assertForeignError(e, "db"));
    assert.deepEqual(touched(f, from, "db"), []);
    assert.ok(!f.commandsSince(from).some((c) => /^dmsetup (suspend|resume|message)/.test(c)));
    assert.deepEqual(await f.pool.list(), ["db"]);
    assert.equal(f.kernel.transactionId(f.metaFile), tx);
    await assertVolumeKept(f, "db", 1);
  });

  test("allocatedBytes does not read its status", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await foreignDevice(f, "db");
    const from = f.kernel.log.length;
    await assert.rejects(f.pool.allocatedBytes("db"), (e) => assertForeignError(e, "db"));
    assert.ok(!f.commandsSince(from).some((c) => c === "dmsetup status thinvol-db"));
  });

  test("open leaves a suspended foreign device suspended, with a warning, and the pool works", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await foreignDevice(f, "db");
    await f.kernel.runner.run("dmsetup", ["suspend", "--noudevsync", "thinvol-db"]);
    const from = f.kernel.log.length;
    const pool = await f.reopen();
    assert.deepEqual(touched(f, from, "db"), []);
    assert.deepEqual(f.kernel.suspendedDevices(), ["thinvol-db"]);
    assert.ok(f.logs.some((l) => / warn a suspended device with a volume's name is not that volume/.test(l) && l.includes("thinvol-db")));
    await pool.create("more", GiB);
  });

  test("close takes an idle pool down and leaves the foreign device alone", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await foreignDevice(f, "db");
    const from = f.kernel.log.length;
    await f.pool.close();
    assert.deepEqual(touched(f, from, "db"), []);
    assert.equal(f.kernel.device("thinvol-pool"), undefined, "no volume of the pool is active, so it was taken down");
    assert.equal(f.kernel.device("thinvol-db")?.live?.kind, "other");
  });

  test("an interrupted remove whose device was replaced by a foreign one keeps the volume and leaves the device", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await f.pool.activate("db");
    const crashed = f.kernel.crashWhen(/^dmsetup remove .*thinvol-db$/, { when: "before" });
    void f.pool.remove("db");
    await crashed;
    f.kernel.revive();
    await f.kernel.runner.run("dmsetup", ["remove", "thinvol-db"]);
    await foreignDevice(f, "db");
    const from = f.kernel.log.length;
    const pool = await f.reopen();
    assert.deepEqual(touched(f, from, "db"), []);
    assert.deepEqual(await pool.list(), ["db"]);
    await assertVolumeKept(f, "db", 1);
    assert.ok(f.logs.some((l) => / warn kept a volume whose interrupted remove could not finish/.test(l)));
  });
});
