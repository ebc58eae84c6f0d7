import assert from "node:assert/strict";
import { readdirSync, rmSync } from "node:fs";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { test } from "node:test";
import { blockKey } from "../../src/backup/blocks.js";
import { DirectoryStore } from "../../src/backup/directory-store.js";
import { createBackup } from "../../src/backup/engine.js";
import { collectGarbage, removeBackup } from "../../src/backup/gc.js";
import { Lease } from "../../src/backup/lease.js";
import { listBackups, manifestKey } from "../../src/backup/manifest.js";
import { allBlocks } from "../../src/backup/plan.js";
import { restoreBackup, verifyBackup } from "../../src/backup/restore.js";
import { ConflictError, NotFoundError } from "../../src/errors.js";
import { blockData, makeDevice, ScriptedStore, sha256File, withTempDir, writeBlock } from "../support/backup.js";

const BS = 64 * 1024;
const SIZE = 4 * 1024 * 1024; // 64 blocks
const g = { sizeBytes: SIZE, blockSizeBytes: BS };
const base = { volume: "db", snapshotName: "s1", sizeBytes: SIZE, blockSizeBytes: BS };

async function device(dir: string, name: string, blocks: number[]): Promise<string> {
  const path = join(dir, name);
  await makeDevice(path, SIZE, BS, new Map(blocks.map((i) => [i, blockData(BS)])));
  return path;
}

test("removing a backup, then collecting: only blocks no remaining backup names are deleted", () =>
  withTempDir(async (dir) => {
    const store = new DirectoryStore(join(dir, "target"));
    const dev = await device(dir, "db.img", [0, 1, 2, 3]);
    const first = await createBackup({ ...base, store, device: dev, blocksToRead: allBlocks(g) });
    await writeBlock(dev, BS, 1, blockData(BS));
    await writeBlock(dev, BS, 2, blockData(BS));
    const second = await createBackup({ ...base, store, device: dev, blocksToRead: [1, 2], previous: first.manifest });
    assert.equal((await store.list("blocks/")).length, 6);

    assert.deepEqual(await collectGarbage(store), { blocksDeleted: 0, blocksKept: 6, leasesRemoved: 0, leftoversRemoved: 0 });
    await removeBackup(store, "db", first.manifest.id);
    await assert.rejects(removeBackup(store, "db", first.manifest.id), NotFoundError);
    assert.deepEqual(await collectGarbage(store), { blocksDeleted: 2, blocksKept: 4, leasesRemoved: 0, leftoversRemoved: 0 });

    // What is left restores exactly.
    assert.equal((await verifyBackup({ store, manifest: second.manifest })).ok, true);
    await restoreBackup({ store, manifest: second.manifest, device: join(dir, "r.img") });
    assert.equal(await sha256File(join(dir, "r.img")), await sha256File(dev));
  }));

test("a block another volume's backup still names survives the removal of the first", () =>
  withTempDir(async (dir) => {
    const store = new DirectoryStore(join(dir, "target"));
    const shared = blockData(BS);
    const a = join(dir, "a.img");
    const b = join(dir, "b.img");
    await makeDevice(a, SIZE, BS, new Map([[0, shared], [1, blockData(BS)]]));
    await makeDevice(b, SIZE, BS, new Map([[9, shared]]));
    const ba = await createBackup({ ...base, volume: "a", store, device: a, blocksToRead: [0, 1] });
    const bb = await createBackup({ ...base, volume: "b", store, device: b, blocksToRead: [9] });
    await removeBackup(store, "a", ba.manifest.id);
    assert.equal((await collectGarbage(store)).blocksDeleted, 1);
    assert.equal((await verifyBackup({ store, manifest: bb.manifest })).ok, true);
  }));

test("garbage collection never runs beside a backup in progress, so it cannot delete a block that backup relies on", () =>
  withTempDir(async (dir) => {
    const store = new ScriptedStore(new DirectoryStore(join(dir, "target")));
    const shared = blockData(BS);
    const a = join(dir, "a.img");
    await makeDevice(a, SIZE, BS, new Map([[0, shared]]));
    const old = await createBackup({ ...base, volume: "a", store, device: a, blocksToRead: [0] });
    await removeBackup(store, "a", old.manifest.id); // `shared` is now garbage...

    // ...but a backup of b, in progress, finds it stored and will name it.
    const b = join(dir, "b.img");
    await makeDevice(b, SIZE, BS, new Map([[0, shared], [1, blockData(BS)]]));
    store.pauseAt = store.blockPuts + 1;
    const running = createBackup({ ...base, volume: "b", store, device: b, blocksToRead: [0, 1], concurrency: 1 });
    await store.paused;

    await assert.rejects(collectGarbage(store), (err: unknown) => {
      assert.ok(err instanceof ConflictError);
      assert.match(err.message, /^garbage collection cannot start at file:.*: backup "[^"]+" of volume "b" on .* is in progress/);
      return true;
    });
    store.resume();
    const done = await running;
    assert.equal(done.blocksAlreadyStored, 1);
    assert.equal((await verifyBackup({ store, manifest: done.manifest })).ok, true);
    assert.deepEqual(await collectGarbage(store), { blocksDeleted: 0, blocksKept: 2, leasesRemoved: 0, leftoversRemoved: 0 });
    assert.deepEqual(await store.list("locks/"), []);
  }));

test("a backup does not start while a garbage collection holds the target", () =>
  withTempDir(async (dir) => {
    const store = new DirectoryStore(join(dir, "target"));
    const dev = await device(dir, "db.img", [0]);
    const gc = await Lease.acquire(store, "gc", "garbage collection");
    await assert.rejects(createBackup({ ...base, store, device: dev, blocksToRead: [0] }), /^ConflictError: backup "[^"]+" of volume "db" cannot start at .*: garbage collection on .* is in progress/);
    assert.deepEqual(await store.list("blocks/"), []);
    await gc.release();
    await createBackup({ ...base, store, device: dev, blocksToRead: [0] });
  }));

test("the lease of a process that died goes stale: collection removes it and goes on", () =>
  withTempDir(async (dir) => {
    const store = new DirectoryStore(join(dir, "target"));
    const dead = Date.parse("2026-01-01T00:00:00Z");
    await Lease.acquire(store, "backup", 'backup "x" of volume "db"', { now: () => new Date(dead) });
    await store.put(blockKey("c".repeat(64)), Buffer.from("left by the dead backup"));
    await assert.rejects(collectGarbage(store, { now: () => new Date(dead + 60_000) }), ConflictError);
    const report = await collectGarbage(store, { now: () => new Date(dead + 31 * 60_000) });
    assert.deepEqual(report, { blocksDeleted: 1, blocksKept: 0, leasesRemoved: 1, leftoversRemoved: 0 });
  }));

test("a backup whose lease was taken away as abandoned fails instead of writing its record", () =>
  withTempDir(async (dir) => {
    const store = new DirectoryStore(join(dir, "target"));
    const dev = await device(dir, "db.img", [0, 1]);
    const stolen = createBackup({
      ...base, store, device: dev, blocksToRead: [0, 1], concurrency: 1,
      // What a collection does to a lease it finds stale.
      onProgress: () => {
        for (const name of readdirSync(join(dir, "target/locks"))) rmSync(join(dir, "target/locks", name));
      },
    });
    await assert.rejects(stolen, /^ConflictError: backup "[^"]+" of volume "db" lost its lease .*; run it again/);
    assert.deepEqual(await listBackups(store), []);
  }));

test("an unreadable record stops collection before it deletes anything", () =>
  withTempDir(async (dir) => {
    const store = new DirectoryStore(join(dir, "target"));
    const dev = await device(dir, "db.img", [0]);
    const { manifest } = await createBackup({ ...base, store, device: dev, blocksToRead: [0] });
    await store.put(blockKey("d".repeat(64)), Buffer.from("garbage"));
    await store.put(manifestKey("db", "20990101T000000000Z-00000000"), Buffer.from(JSON.stringify({ format: 9 })));
    await assert.rejects(collectGarbage(store), /^ThinvolError: garbage collection at .* stopped before deleting anything: backup "20990101T000000000Z-00000000" of volume "db" has record format 9/);
    assert.equal((await store.list("blocks/")).length, 2);
    assert.equal((await verifyBackup({ store, manifest })).ok, true);
  }));

test("files at the target that are not blocks are left alone", () =>
  withTempDir(async (dir) => {
    const store = new DirectoryStore(join(dir, "target"));
    await store.put("blocks/README", Buffer.from("do not delete"));
    await store.put(`blocks/00/00/${"1".repeat(64)}`, Buffer.from("misfiled"));
    assert.deepEqual(await collectGarbage(store), { blocksDeleted: 0, blocksKept: 2, leasesRemoved: 0, leftoversRemoved: 0 });
  }));

test("a collection removes the half-written files of a writer that died, and the lease of an earlier process of the same pool at once", () =>
  withTempDir(async (dir) => {
    const store = new DirectoryStore(join(dir, "target"));
    const dev = await device(dir, "db.img", [0, 1]);
    const b = await createBackup({ ...base, store, device: dev, blocksToRead: allBlocks(g) });
    // A put killed before its rename, and a backup of an earlier process of this pool that died, minutes ago.
    const [key] = await store.list("blocks/");
    await writeFile(join(dir, "target", `${key}`.replace(/[^/]+$/, ".0a1b2c.tmp")), "half a block");
    const owner = "0123456789abcdef0123456789abcdef";
    const dead = await Lease.acquire(store, "backup", "a backup that died", { holder: { owner, instance: "old" } });
    assert.ok(dead.key.startsWith("locks/"));
    await assert.rejects(collectGarbage(store, { holder: { owner: "another pool", instance: "x" } }), /a backup that died .* is in progress/);
    const report = await collectGarbage(store, { holder: { owner, instance: "new" } });
    assert.deepEqual(report, { blocksDeleted: 0, blocksKept: 2, leasesRemoved: 1, leftoversRemoved: 1 });
    assert.equal((await verifyBackup({ store, manifest: b.manifest })).ok, true);
  }));
