import assert from "node:assert/strict";
import { join } from "node:path";
import { test } from "node:test";
import { blockKey } from "../../src/backup/blocks.js";
import { DirectoryStore } from "../../src/backup/directory-store.js";
import { createBackup } from "../../src/backup/engine.js";
import { BackupDamagedError } from "../../src/backup/errors.js";
import { listBackups, readManifest } from "../../src/backup/manifest.js";
import { allBlocks, blocksTouching } from "../../src/backup/plan.js";
import { restoreBackup, verifyBackup } from "../../src/backup/restore.js";
import { allocatedBytes, blockData, makeDevice, ScriptedStore, sha256File, withTempDir, writeBlock } from "../support/backup.js";

const KiB = 1024;
const MiB = 1024 * KiB;
/** Small blocks keep the tests fast; the default 2 MiB has its own test. */
const BS = 64 * KiB;
const SIZE = 64 * MiB; // 1024 blocks
const geometry = { sizeBytes: SIZE, blockSizeBytes: BS };

/** A volume with data in `count` blocks spread over it, the rest never written. */
async function volumeWithData(path: string, count: number): Promise<Map<number, Buffer>> {
  const blocks = new Map<number, Buffer>();
  for (let i = 0; i < count; i++) blocks.set(i * 2, blockData(BS));
  await makeDevice(path, SIZE, BS, blocks);
  return blocks;
}

const base = { volume: "db", snapshotName: "snap-1", sizeBytes: SIZE, blockSizeBytes: BS };

test("a full backup, then 1% of the volume changes: the incremental backup reads and uploads about 1%", () =>
  withTempDir(async (dir) => {
    const store = new DirectoryStore(join(dir, "target"));
    const device = join(dir, "db.img");
    await volumeWithData(device, 300);

    const full = await createBackup({ ...base, store, device, blocksToRead: allBlocks(geometry) });
    assert.equal(full.blocksRead, 1024);
    assert.equal(full.blocksZero, 724);
    assert.equal(full.blocksUploaded, 300);
    assert.equal(full.blocksChanged, 300);
    assert.equal(full.manifest.blocks.length, 300);
    assert.ok(full.bytesUploaded < 300 * BS * 0.7, `compressed: ${full.bytesUploaded}`);

    // 1% of the volume: 6 data blocks rewritten, 4 never-written blocks written, 1 zeroed.
    const changed = [0, 2, 4, 100, 200, 598, 1, 3, 1001, 1023];
    for (const i of changed) await writeBlock(device, BS, i, blockData(BS));
    await writeBlock(device, BS, 10, Buffer.alloc(BS));
    const plan = blocksTouching([...changed, 10].map((i) => ({ offset: i * BS + 100, length: 10 })), geometry);

    const incr = await createBackup({ ...base, snapshotName: "snap-2", store, device, blocksToRead: plan, previous: full.manifest });
    assert.equal(incr.blocksRead, 11);
    assert.equal(incr.bytesRead, 11 * BS);
    assert.equal(incr.blocksUploaded, 10);
    assert.equal(incr.blocksChanged, 11);
    assert.ok(incr.bytesUploaded < full.bytesUploaded / 20, `${incr.bytesUploaded} vs ${full.bytesUploaded}`);
    assert.equal(incr.manifest.previous, full.manifest.id);
    assert.equal(incr.manifest.blocks.length, 300 + 4 - 1);
    assert.deepEqual(await listBackups(store, "db"), [{ volume: "db", id: full.manifest.id }, { volume: "db", id: incr.manifest.id }]);

    // The incremental record is complete on its own: restoring it alone gives today's volume.
    const restored = join(dir, "restored.img");
    await restoreBackup({ store, manifest: await readManifest(store, "db", incr.manifest.id), device: restored });
    assert.equal(await sha256File(restored), await sha256File(device));
  }));

test("a restore is byte-identical and thin: only the data blocks take space", () =>
  withTempDir(async (dir) => {
    const store = new DirectoryStore(join(dir, "target"));
    const device = join(dir, "db.img");
    await volumeWithData(device, 40);
    const { manifest } = await createBackup({ ...base, store, device, blocksToRead: allBlocks(geometry) });
    const restored = join(dir, "restored.img");
    const progress: number[] = [];
    const summary = await restoreBackup({ store, manifest, device: restored, onProgress: (p) => progress.push(p.blocksDone) });
    assert.equal(summary.blocksWritten, 40);
    assert.equal(summary.bytesWritten, 40 * BS);
    assert.equal(progress.length, 40);
    assert.equal(await sha256File(restored), await sha256File(device));
    const taken = await allocatedBytes(restored);
    assert.ok(taken >= 40 * BS && taken <= 40 * BS + 2 * MiB, `restored file takes ${taken} bytes for ${40 * BS} of data in ${SIZE}`);
  }));

test("the default 2 MiB blocks, a size that is not a multiple of them, and progress with a rate", () =>
  withTempDir(async (dir) => {
    const store = new DirectoryStore(join(dir, "target"));
    const device = join(dir, "db.img");
    const size = 9 * MiB + 512; // 5 blocks, the last one 512 bytes
    const tail = Buffer.alloc(512, 7);
    await makeDevice(device, size, 2 * MiB, new Map([[1, blockData(2 * MiB)], [4, tail]]));
    const events: { blocksDone: number; bytesPerSecond: number }[] = [];
    const { manifest } = await createBackup({
      volume: "db", snapshotName: "s", store, device, sizeBytes: size,
      blocksToRead: allBlocks({ sizeBytes: size, blockSizeBytes: 2 * MiB }), onProgress: (p) => events.push(p),
    });
    assert.equal(manifest.blockSizeBytes, 2 * MiB);
    assert.deepEqual(manifest.blocks.map(([i]) => i), [1, 4]);
    assert.equal(events.length, 5);
    assert.ok(events.every((e) => e.bytesPerSecond > 0));
    const restored = join(dir, "restored.img");
    await restoreBackup({ store, manifest, device: restored });
    assert.equal(await sha256File(restored), await sha256File(device));
  }));

test("an interrupted backup leaves no visible backup, and running it again uploads only what is missing", () =>
  withTempDir(async (dir) => {
    const store = new ScriptedStore(new DirectoryStore(join(dir, "target")));
    const device = join(dir, "db.img");
    await volumeWithData(device, 50);
    store.failAt = 21;
    await assert.rejects(
      createBackup({ ...base, store, device, blocksToRead: allBlocks(geometry), concurrency: 1 }),
      /^ThinvolError: backup "\d{8}T\d{9}Z-[0-9a-f]{8}" of volume "db" failed storing block \d+ at file:\/\/.*: connection reset by peer$/,
    );
    assert.deepEqual(await listBackups(store), []);
    assert.deepEqual(await store.list("locks/"), []); // the lease went too
    assert.equal((await store.list("blocks/")).length, 20);

    store.failAt = undefined;
    const rerun = await createBackup({ ...base, store, device, blocksToRead: allBlocks(geometry) });
    assert.equal(rerun.blocksAlreadyStored, 20);
    assert.equal(rerun.blocksUploaded, 30);
    assert.equal((await listBackups(store)).length, 1);
    assert.equal((await verifyBackup({ store, manifest: rerun.manifest })).ok, true);
  }));

test("two volumes sharing blocks store them once", () =>
  withTempDir(async (dir) => {
    const store = new DirectoryStore(join(dir, "target"));
    const shared = blockData(BS);
    const a = join(dir, "a.img");
    const b = join(dir, "b.img");
    await makeDevice(a, SIZE, BS, new Map([[0, shared], [5, shared], [9, blockData(BS)]]));
    await makeDevice(b, SIZE, BS, new Map([[3, shared], [7, blockData(BS)]]));
    const first = await createBackup({ ...base, volume: "a", store, device: a, blocksToRead: [0, 5, 9] });
    assert.equal(first.blocksUploaded, 2); // the shared content once, even within one volume
    const second = await createBackup({ ...base, volume: "b", store, device: b, blocksToRead: [3, 7] });
    assert.equal(second.blocksAlreadyStored, 1);
    assert.equal(second.blocksUploaded, 1);
    assert.equal((await store.list("blocks/")).length, 3);
  }));

test("verify finds a missing block and a corrupted one, and restore refuses to write them", () =>
  withTempDir(async (dir) => {
    const store = new DirectoryStore(join(dir, "target"));
    const device = join(dir, "db.img");
    await volumeWithData(device, 10);
    const { manifest } = await createBackup({ ...base, store, device, blocksToRead: allBlocks(geometry) });
    assert.deepEqual(await verifyBackup({ store, manifest }), { ok: true, blocksChecked: 10, missing: [], damaged: [] });

    const [, gone] = manifest.blocks[1] ?? [];
    const [, bad] = manifest.blocks[3] ?? [];
    await store.delete(blockKey(gone ?? ""));
    const stored = Buffer.from((await store.get(blockKey(bad ?? ""))) ?? []);
    const mid = stored.length >> 1;
    stored[mid] = (stored[mid] ?? 0) ^ 0xff;
    await store.put(blockKey(bad ?? ""), stored);

    assert.deepEqual(await verifyBackup({ store, manifest }), { ok: false, blocksChecked: 10, missing: [2], damaged: [6] });
    await assert.rejects(restoreBackup({ store, manifest, device: join(dir, "r.img") }), (err: unknown) => {
      assert.ok(err instanceof BackupDamagedError);
      assert.match(err.message, new RegExp(`^backup "${manifest.id}" of volume "db": block (2|6) .* (is missing|does not decompress|is corrupt)`));
      return true;
    });
  }));

test("a block swapped for another valid block is caught by its digest", () =>
  withTempDir(async (dir) => {
    const store = new DirectoryStore(join(dir, "target"));
    const device = join(dir, "db.img");
    await volumeWithData(device, 2);
    const { manifest } = await createBackup({ ...base, store, device, blocksToRead: [0, 2] });
    const [[, d0], [, d2]] = manifest.blocks as [[number, string], [number, string]];
    await store.put(blockKey(d0), (await store.get(blockKey(d2))) ?? new Uint8Array());
    const report = await verifyBackup({ store, manifest });
    assert.deepEqual(report.damaged, [0]);
    await assert.rejects(restoreBackup({ store, manifest, device: join(dir, "r.img") }), /block 0 .* is corrupt: its content does not match its digest/);
  }));

test("an incremental backup whose previous backup was removed meanwhile reads the whole volume", () =>
  withTempDir(async (dir) => {
    const store = new DirectoryStore(join(dir, "target"));
    const device = join(dir, "db.img");
    await volumeWithData(device, 5);
    const full = await createBackup({ ...base, store, device, blocksToRead: allBlocks(geometry) });
    await store.delete(`backups/db/${full.manifest.id}.json`);
    const next = await createBackup({ ...base, store, device, blocksToRead: [], previous: full.manifest });
    assert.equal(next.blocksRead, 1024);
    assert.equal(next.manifest.blocks.length, 5);
    assert.equal("previous" in next.manifest, false);
  }));

test("wrong requests are refused before anything is read, naming the volume", () =>
  withTempDir(async (dir) => {
    const store = new DirectoryStore(join(dir, "target"));
    const device = join(dir, "db.img");
    await volumeWithData(device, 1);
    const full = await createBackup({ ...base, store, device, blocksToRead: [0] });
    await assert.rejects(createBackup({ ...base, volume: "../etc", store, device, blocksToRead: [] }), /invalid volume name/);
    await assert.rejects(createBackup({ ...base, store, device, blocksToRead: [1024] }), /of volume "db": planned block 1024 is not within the volume's 1024 blocks/);
    await assert.rejects(createBackup({ ...base, volume: "web", store, device, blocksToRead: [], previous: full.manifest }), /that is a backup of volume "db"/);
    await assert.rejects(createBackup({ ...base, store, device, blockSizeBytes: 2 * MiB, blocksToRead: [], previous: full.manifest }), /2097152-byte blocks/);
    await assert.rejects(createBackup({ ...base, store, device, sizeBytes: SIZE * 2, blocksToRead: [1500] }), /failed reading block 1500 .* ends at byte/);
    assert.equal((await listBackups(store)).length, 1);
  }));
