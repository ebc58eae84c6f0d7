import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { copyFile, open } from "node:fs/promises";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { blockKey } from "../../src/backup/blocks.js";
import { createBackup, type BackupSummary } from "../../src/backup/engine.js";
import { collectGarbage, removeBackup } from "../../src/backup/gc.js";
import { listBackups, readManifest } from "../../src/backup/manifest.js";
import { allBlocks, blocksTouching } from "../../src/backup/plan.js";
import { restoreBackup, verifyBackup } from "../../src/backup/restore.js";
import { LazyS3Store } from "../../src/backup/s3-lazy.js";
import { openStore } from "../../src/backup/store.js";
import type { ByteRange } from "../../src/system/extents.js";
import { ScriptedStore, sha256File, withTempDir } from "../support/backup.js";
import { startS3Server, type S3Server } from "../support/s3-server.js";

const KiB = 1024;
const MiB = 1024 * KiB;
/** The default 2 MiB blocks, on a volume large enough that 1% of it is a few of them. */
const BS = 2 * MiB;
const SIZE = 256 * MiB; // 128 blocks
const geometry = { sizeBytes: SIZE, blockSizeBytes: BS };
/** 32 chunks of 1 MiB of random data, one in every fourth block, at an offset that varies within it. */
const CHUNK = 1 * MiB;
const CHUNKS = 32;
const chunkOffset = (n: number) => n * 4 * BS + ((n * 37) % 9) * 128 * KiB;

let server: S3Server;
before(async () => {
  server = await startS3Server();
});
after(() => server.stop());

async function writeRanges(path: string, ranges: readonly ByteRange[]): Promise<void> {
  const handle = await open(path, "r+");
  try {
    for (const r of ranges) await handle.write(randomBytes(r.length), 0, r.length, r.offset);
  } finally {
    await handle.close();
  }
}

/** A sparse file standing in for a volume's device: SIZE bytes, 32 MiB of them random data. */
async function makeVolume(path: string): Promise<void> {
  const handle = await open(path, "w");
  await handle.truncate(SIZE);
  await handle.close();
  await writeRanges(path, Array.from({ length: CHUNKS }, (_, n) => ({ offset: chunkOffset(n), length: CHUNK })));
}

function figures(label: string, s: BackupSummary): string {
  const pct = ((100 * s.bytesUploaded) / SIZE).toFixed(2);
  return `${label}: read ${s.blocksRead} blocks (${s.bytesRead / MiB} MiB), uploaded ${s.blocksUploaded} (${(s.bytesUploaded / MiB).toFixed(2)} MiB, ${pct}% of the volume), already stored ${s.blocksAlreadyStored}, zero ${s.blocksZero}, in ${s.durationMs} ms`;
}

test("backups to S3: full, then 1% changed, restored byte for byte; a second volume dedups; an interrupted run resumes; gc keeps what is named; verify finds a lost block", () =>
  withTempDir(async (dir) => {
    const store = openStore(`${server.url}/engine`, { s3: server.settings });
    assert.ok(store instanceof LazyS3Store);
    try {
      const device = join(dir, "db.img");
      await makeVolume(device);
      const atFull = await sha256File(device);

      const full = await createBackup({ volume: "db", snapshotName: "snap-1", store, device, sizeBytes: SIZE, blocksToRead: allBlocks(geometry) });
      console.log(figures("full backup", full));
      assert.equal(full.blocksRead, 128);
      assert.equal(full.blocksUploaded, CHUNKS);
      assert.equal(full.blocksZero, 128 - CHUNKS);
      assert.ok(full.bytesUploaded > CHUNKS * CHUNK && full.bytesUploaded < CHUNKS * CHUNK * 1.01, `${full.bytesUploaded}`);

      // 1% of the volume: five 512 KiB writes over the data, one of them across into a block never written.
      const changes: ByteRange[] = [0, 5, 11, 20].map((n) => ({ offset: chunkOffset(n) + 256 * KiB, length: 512 * KiB }));
      changes.push({ offset: 30 * 4 * BS + BS - 256 * KiB, length: 512 * KiB });
      const changedBytes = changes.reduce((n, r) => n + r.length, 0);
      assert.equal(changedBytes, 2.5 * MiB);
      await writeRanges(device, changes);
      const atIncr = await sha256File(device);

      const plan = blocksTouching(changes, geometry);
      assert.equal(plan.length, 6);
      const incr = await createBackup({ volume: "db", snapshotName: "snap-2", store, device, sizeBytes: SIZE, blocksToRead: plan, previous: full.manifest });
      console.log(figures("incremental backup (2.5 MiB changed)", incr));
      assert.equal(incr.blocksRead, 6);
      assert.equal(incr.blocksUploaded, 6);
      assert.ok(incr.bytesUploaded >= 0.005 * SIZE && incr.bytesUploaded <= 0.03 * SIZE, `${incr.bytesUploaded} bytes is ${((100 * incr.bytesUploaded) / SIZE).toFixed(2)}%`);
      assert.equal(incr.manifest.blocks.length, CHUNKS + 1);

      // Each backup restores to the volume as it was when it was taken.
      for (const [m, expected] of [[full.manifest, atFull], [incr.manifest, atIncr]] as const) {
        const restored = join(dir, `restored-${m.id}.img`);
        const r = await restoreBackup({ store, manifest: await readManifest(store, "db", m.id), device: restored });
        console.log(`restore of ${m.snapshot}: ${r.blocksWritten} blocks, ${(r.bytesWritten / MiB).toFixed(0)} MiB in ${r.durationMs} ms`);
        assert.equal(await sha256File(restored), expected);
      }

      // Another volume with the same content: every block is at the target already.
      const twin = join(dir, "twin.img");
      await copyFile(device, twin);
      const second = await createBackup({ volume: "twin", snapshotName: "snap-1", store, device: twin, sizeBytes: SIZE, blocksToRead: allBlocks(geometry) });
      console.log(figures("same content, another volume", second));
      assert.equal(second.blocksUploaded, 0);
      assert.equal(second.bytesUploaded, 0);
      assert.equal(second.blocksAlreadyStored, CHUNKS + 1);

      // An interrupted backup of new data: no record, no lease left; the rerun uploads only the rest.
      const fresh = join(dir, "fresh.img");
      await makeVolume(fresh);
      const flaky = new ScriptedStore(store);
      flaky.failAt = 13;
      await assert.rejects(
        createBackup({ volume: "fresh", snapshotName: "s", store: flaky, device: fresh, sizeBytes: SIZE, blocksToRead: allBlocks(geometry), concurrency: 1 }),
        /failed storing block \d+ at s3:\/\/thinvol-test\/backups\/engine: connection reset by peer/,
      );
      assert.deepEqual(await listBackups(store, "fresh"), []);
      assert.deepEqual(await store.list("locks/"), []);
      flaky.failAt = undefined;
      flaky.blockPuts = 0;
      const rerun = await createBackup({ volume: "fresh", snapshotName: "s", store: flaky, device: fresh, sizeBytes: SIZE, blocksToRead: allBlocks(geometry) });
      console.log(figures("rerun after an interrupted backup", rerun));
      assert.equal(rerun.blocksAlreadyStored, 12);
      assert.equal(rerun.blocksUploaded, CHUNKS - 12);
      assert.equal(flaky.blockPuts, CHUNKS - 12);

      // The first backup goes; gc deletes only the five blocks it alone named.
      const blocksBefore = (await store.list("blocks/")).length;
      await removeBackup(store, "db", full.manifest.id);
      const gcStarted = Date.now();
      const gc = await collectGarbage(store);
      console.log(`gc: deleted ${gc.blocksDeleted}, kept ${gc.blocksKept} of ${blocksBefore} blocks in ${Date.now() - gcStarted} ms`);
      assert.equal(gc.blocksDeleted, 5);
      assert.equal(gc.blocksKept, blocksBefore - 5);
      for (const [, digest] of incr.manifest.blocks) assert.equal(await store.has(blockKey(digest)), true, digest);
      const again = join(dir, "again.img");
      await restoreBackup({ store, manifest: await readManifest(store, "db", incr.manifest.id), device: again });
      assert.equal(await sha256File(again), atIncr);

      // A block object deleted behind thinvol's back: verify names it.
      assert.equal((await verifyBackup({ store, manifest: second.manifest })).ok, true);
      const [lostIndex, lostDigest] = second.manifest.blocks[3] ?? assert.fail("no block 3");
      await store.delete(blockKey(lostDigest));
      const report = await verifyBackup({ store, manifest: second.manifest });
      assert.equal(report.ok, false);
      assert.deepEqual(report.missing, [lostIndex]);
      assert.deepEqual(report.damaged, []);
    } finally {
      await (store as LazyS3Store).close();
    }
  }));
