/** Backups in the volume layer: the snapshots they keep, what a failure leaves, and removal while one runs. */
import assert from "node:assert/strict";
import { join } from "node:path";
import { afterEach, beforeEach, describe, test } from "node:test";
import { DirectoryStore } from "../../src/backup/directory-store.js";
import type { BackupStore } from "../../src/backup/store.js";
import { ConflictError, InvalidRequestError } from "../../src/errors.js";
import { silentLogger } from "../../src/log.js";
import { BackupService } from "../../src/volumes/backups.js";
import { managerFixture, type ManagerFixture } from "../support/manager-fixture.js";

const MiB = 1024 ** 2;

describe("backups in the volume layer", () => {
  let f: ManagerFixture;
  let store: BackupStore;
  let backups: BackupService;
  const target = "file:///backups";
  const snapshotNames = async (volume: string) => (await f.manager.snapshots(volume)).map((s) => s.name);

  beforeEach(async () => {
    f = await managerFixture({ defaultSizeBytes: 64 * MiB, minFreePercent: 10 });
    store = new DirectoryStore(join(f.dir, "target"), target);
    backups = new BackupService({ manager: f.manager, pool: f.pool, log: silentLogger, openTarget: async () => store, targetsFile: join(f.dir, "backup-targets.json") });
    await f.manager.create("db", null);
    (f.pool.volumes.get("db") as { data: string }).data = "first contents";
  });
  afterEach(() => f.cleanup());

  test("a backup keeps its snapshot for the next; the next asks what changed since it, then replaces it", async () => {
    const first = await backups.createBackup("db", target);
    assert.equal(first.incremental, false);
    assert.deepEqual(await snapshotNames("db"), [`backup-${first.id}`]);
    (f.pool.volumes.get("db") as { data: string }).data = "second contents, longer";
    const calls: (string | undefined)[] = [];
    const changed = f.pool.changedRanges.bind(f.pool);
    f.pool.changedRanges = (volume, snapshot, since) => (calls.push(since), changed(volume, snapshot, since));
    const second = await backups.createBackup("db", target);
    assert.deepEqual(calls, [`backup-${first.id}`], "the pool was asked for the changes since the first backup's snapshot");
    assert.equal(second.incremental, true);
    assert.equal(second.previous, first.id);
    assert.deepEqual(await snapshotNames("db"), [`backup-${second.id}`]);
    assert.deepEqual((await backups.backups(target)).map((b) => b.id), [first.id, second.id]);
    assert.equal(f.pool.readers.get(`db@backup-${second.id}`), 0, "the snapshot's reader was released");
  });

  test("without the last backup's snapshot, every block with data is read again, and blocks gone since are dropped", async () => {
    const first = await backups.createBackup("db", target);
    await f.pool.removeSnapshot("db", `backup-${first.id}`);
    const rec = await f.records.get("db");
    if (rec) rec.snapshots = [];
    if (rec) await f.records.save(rec);
    (f.pool.volumes.get("db") as { data: string }).data = "";
    const second = await backups.createBackup("db", target);
    assert.equal(second.incremental, false);
    assert.equal(second.blocks, 0, "the volume holds nothing now, and the backup says so");
  });

  test("a failed backup leaves no snapshot and no record; the volume can be removed", async () => {
    f.pool.changedRanges = async () => {
      throw new Error("the pool cannot tell");
    };
    await assert.rejects(backups.createBackup("db", target), /cannot back up volume "db" to file:\/\/\/backups: the pool cannot tell/);
    assert.deepEqual(await snapshotNames("db"), []);
    assert.deepEqual(await backups.backups(target), []);
    await f.manager.remove("db");
  });

  test("docker volume rm waits for no backup: refused while one runs, and then takes the backup's snapshot along", async () => {
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    const put = store.put.bind(store);
    store.put = async (key, data) => {
      await gate;
      return put(key, data);
    };
    const running = backups.createBackup("db", target);
    await new Promise((r) => setTimeout(r, 50));
    await assert.rejects(f.manager.remove("db"), (err: Error) => err instanceof ConflictError && /a backup of it is running/.test(err.message));
    release();
    const done = await running;
    assert.deepEqual(await snapshotNames("db"), [`backup-${done.id}`]);
    await f.manager.remove("db");
    assert.deepEqual(await f.pool.list(), []);
    assert.equal(f.pool.snaps.size, 0, "the backup's snapshot went with the volume");
    assert.deepEqual((await backups.backups(target)).map((b) => b.id), [done.id], "its backup stays at the target");
  });

  test("snapshot names starting with backup- are kept for backups; a user snapshot still blocks docker volume rm", async () => {
    await assert.rejects(f.manager.createSnapshot("db", "backup-mine"), (err: Error) => err instanceof InvalidRequestError && /kept for the snapshots backups take/.test(err.message));
    await f.manager.createSnapshot("db", "mine");
    await backups.createBackup("db", target);
    await assert.rejects(f.manager.remove("db"), /it has a snapshot "mine"; remove it first with thinvol snapshot rm db mine/);
  });

  test("restoring into an existing name is refused, changing nothing", async () => {
    const b = await backups.createBackup("db", target);
    await assert.rejects(backups.restore(target, b.id, "db"), (err: Error) => err instanceof ConflictError && /volume "db" exists/.test(err.message));
  });

  test("backup rm and verify without a target look at the targets backups were made to", async () => {
    await assert.rejects(backups.verifyBackup(undefined, "20261129T101500123Z-1a2b3c4d"), /is at none of the targets this plugin has backed up to; give its target/);
    const b = await backups.createBackup("db", target);
    assert.equal((await backups.verifyBackup(undefined, b.id)).ok, true);
    await assert.rejects(backups.verifyBackup(undefined, "20261129T101500123Z-1a2b3c4d"), /is at none of the targets this plugin has backed up to \(file:\/\/\/backups\)/);
    const removed = await backups.removeBackup(undefined, b.id);
    assert.equal(removed.volume, "db");
    assert.deepEqual(await backups.backups(target), []);
  });
});

