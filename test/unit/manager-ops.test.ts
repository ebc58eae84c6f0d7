/** The volume layer's operations beyond Docker's protocol: resize, snapshots, rollback, pool growth. */
import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, test } from "node:test";
import { ConflictError, InvalidRequestError, NotFoundError } from "../../src/errors.js";
import type { VolumeManager } from "../../src/volumes/manager.js";
import type { RecordStore } from "../../src/volumes/records.js";
import type { FakePool } from "../support/fake-pool.js";
import type { FakeRunner } from "../support/fake-runner.js";
import { managerFixture, type ManagerFixture } from "../support/manager-fixture.js";

const MiB = 1024 ** 2;

describe("resize, snapshots and rollback in the volume layer", () => {
  let f: ManagerFixture;
  let pool: FakePool;
  let records: RecordStore;
  let runner: FakeRunner;
  let m: VolumeManager;

  beforeEach(async () => {
    f = await managerFixture({ defaultSizeBytes: 64 * MiB, minFreePercent: 10 });
    ({ pool, records, runner, manager: m } = f);
  });
  afterEach(() => f.cleanup());

  test("resize of a mounted ext4 volume grows the device, then the filesystem online through its device", async () => {
    await m.create("db", null);
    await m.mount("db", "c1");
    const before = runner.calls.length;
    const result = await m.resize("db", 256 * MiB);
    assert.deepEqual(result, { name: "db", previousSizeBytes: 64 * MiB, sizeBytes: 256 * MiB });
    assert.equal(await pool.sizeOf("db"), 256 * MiB);
    assert.deepEqual(runner.lines().slice(before), ["resize2fs /dev/fake/db"], "grown in place: no unmount, no second mount");
    const info = await m.get("db");
    assert.equal(info.status["size"], "256 MiB", "docker volume inspect shows the new size");
    assert.equal(info.status["mounts"], 1);
  });

  test("without CAP_SYS_RESOURCE a mounted ext4 volume is refused, changing nothing; unmounted, it grows offline", async () => {
    f.online = false;
    await m.create("db", null);
    await m.mount("db", "c1");
    const before = runner.calls.length;
    await assert.rejects(m.resize("db", 256 * MiB), (err: Error) => {
      assert.ok(err instanceof ConflictError);
      assert.match(err.message, /cannot resize volume "db" while it is mounted: growing a mounted ext4 filesystem needs the CAP_SYS_RESOURCE capability/);
      return true;
    });
    assert.equal(runner.calls.length, before);
    assert.equal(await pool.sizeOf("db"), 64 * MiB);
    assert.equal((await records.get("db"))?.resizeTo, undefined);
    await m.unmount("db", "c1");
    const atUnmount = runner.calls.length;
    await m.resize("db", 256 * MiB);
    assert.deepEqual(runner.lines().slice(atUnmount), ["e2fsck -f -p /dev/fake/db", "resize2fs /dev/fake/db"], "checked, then grown, never mounted");
    assert.deepEqual(pool.active(), []);
  });

  test("resize of a mounted xfs volume grows it through its mount point", async () => {
    await m.create("x", { fs: "xfs", size: "512M" });
    const mp = await m.mount("x", "c1");
    await m.resize("x", 1024 * MiB);
    assert.equal(runner.lines().at(-1), `xfs_growfs ${mp}`);
  });

  test("resize of an unmounted volume mounts it for the growth and leaves it as it was", async () => {
    await m.create("db", null);
    await m.resize("db", 128 * MiB);
    assert.ok(runner.lines().includes("resize2fs /dev/fake/db"));
    assert.deepEqual(f.mounts, []);
    assert.deepEqual(pool.active(), []);
  });

  test("a shrink is refused with both sizes, an equal size changes nothing, a bad size changes nothing", async () => {
    await m.create("db", { size: "128M" });
    const before = runner.calls.length;
    await assert.rejects(m.resize("db", 64 * MiB), (err: Error) => {
      assert.ok(err instanceof ConflictError);
      assert.match(err.message, /cannot resize volume "db" to 64 MiB: it is 128 MiB, and a volume never shrinks/);
      return true;
    });
    assert.deepEqual(await m.resize("db", 128 * MiB), { name: "db", previousSizeBytes: 128 * MiB, sizeBytes: 128 * MiB });
    await assert.rejects(m.resize("db", 1024), (err: Error) => err instanceof InvalidRequestError && /too small for ext4/.test(err.message));
    await assert.rejects(m.resize("ghost", 1024 ** 3), NotFoundError);
    await assert.rejects(m.resize("bad/name", 1024 ** 3), InvalidRequestError);
    assert.equal(runner.calls.length, before, "no command ran");
    assert.equal(await pool.sizeOf("db"), 128 * MiB);
  });

  test("a snapshot of a mounted volume is taken with its filesystem quiesced, and listed", async () => {
    await m.create("db", null);
    const mp = await m.mount("db", "c1");
    const snap = await m.createSnapshot("db", "before-upgrade");
    assert.equal(snap.volume, "db");
    assert.equal(snap.name, "before-upgrade");
    assert.equal(snap.sizeBytes, 64 * MiB);
    assert.deepEqual(pool.clones.at(-1), { name: "db@before-upgrade", origin: "db", options: { originMountpoint: mp } });
    assert.deepEqual((await m.snapshots()).map((x) => x.name), ["before-upgrade"]);
    assert.deepEqual((await m.volume("db")).snapshots, ["before-upgrade"]);
    assert.equal((await m.get("db")).status["snapshots"], "before-upgrade");
    await assert.rejects(m.createSnapshot("db", "before-upgrade"), /volume "db" already has a snapshot "before-upgrade"/);
    await assert.rejects(m.createSnapshot("db", "no/slash"), InvalidRequestError);
    await assert.rejects(m.createSnapshot("ghost", "s"), NotFoundError);
  });

  test("a failed snapshot leaves no trace", async () => {
    await m.create("db", null);
    pool.failNext = "create_snap: No space left on device";
    await assert.rejects(m.createSnapshot("db", "s1"), /cannot snapshot volume "db" as "s1": create_snap: No space left on device/);
    assert.deepEqual(await m.snapshots(), []);
    assert.equal((await records.get("db"))?.snapshots, undefined);
  });

  test("docker volume rm of a volume with snapshots is refused, naming them and the command that removes them", async () => {
    await m.create("db", null);
    await m.createSnapshot("db", "a");
    await m.createSnapshot("db", "b");
    await assert.rejects(m.remove("db"), (err: Error) => {
      assert.ok(err instanceof ConflictError);
      assert.equal(
        err.message,
        'cannot remove volume "db": it has snapshots "a", "b"; remove them first with thinvol snapshot rm db a and thinvol snapshot rm db b',
      );
      return true;
    });
    assert.deepEqual(await pool.list(), ["db"]);
    await m.removeSnapshot("db", "a");
    await m.removeSnapshot("db", "b");
    await assert.rejects(m.removeSnapshot("db", "b"), /volume "db" has no snapshot "b"/);
    await m.remove("db");
    assert.deepEqual(await pool.list(), []);
  });

  test("rollback puts the data and the size back, keeps the snapshot, and is refused while mounted", async () => {
    await m.create("db", null);
    pool.volumes.get("db")!.data = "v1";
    await m.createSnapshot("db", "s1");
    pool.volumes.get("db")!.data = "v2";
    await m.resize("db", 128 * MiB);
    await m.mount("db", "c1");
    await assert.rejects(m.rollback("db", "s1"), (err: Error) => {
      assert.ok(err instanceof ConflictError);
      assert.match(err.message, /cannot roll back volume "db" to snapshot "s1": it is mounted \(1 container mount\); stop the containers that use it first/);
      return true;
    });
    assert.equal(pool.volumes.get("db")?.data, "v2");
    await m.unmount("db", "c1");
    await assert.rejects(m.rollback("db", "nope"), /volume "db" has no snapshot "nope"/);
    const after = await m.rollback("db", "s1");
    assert.equal(pool.volumes.get("db")?.data, "v1");
    assert.equal(after.sizeBytes, 64 * MiB, "the size the snapshot had");
    assert.deepEqual(after.snapshots, ["s1"]);
  });

  test("from=VOLUME@SNAPSHOT makes a volume of the snapshot's size and data", async () => {
    await m.create("db", { fs: "xfs", size: "512M" });
    pool.volumes.get("db")!.data = "v1";
    await m.createSnapshot("db", "s1");
    pool.volumes.get("db")!.data = "v2";
    await m.resize("db", 1024 * MiB);
    await m.create("copy", { from: "db@s1" });
    assert.equal(pool.volumes.get("copy")?.data, "v1");
    const info = await m.get("copy");
    assert.equal(info.status["sizeBytes"], 512 * MiB);
    assert.equal(info.status["filesystem"], "xfs");
    assert.equal(info.status["origin"], "db@s1");
    await assert.rejects(m.create("other", { from: "db@ghost" }), /cannot create volume "other" as a clone of "db@ghost": volume "db" has no snapshot "ghost"/);
    await assert.rejects(m.create("other", { from: "db@" }), /from "db@" is not a valid volume name, nor VOLUME@SNAPSHOT/);
  });

  test("the pool view counts volumes and snapshots, and pool growth reaches the pool", async () => {
    await m.create("a", null);
    await m.create("b", null);
    await m.createSnapshot("a", "s");
    const p = await m.pool();
    assert.equal(p.volumes, 2);
    assert.equal(p.snapshots, 1);
    assert.equal(p.minFreePercent, 10);
    const grown = await m.growPool(200 * 1024 ** 3);
    assert.equal(grown.dataTotalBytes, 200 * 1024 ** 3);
  });
});
