/**
 * Backups from the dm-thin pool on a real kernel, at the Pool level: a snapshot opened for
 * reading holds its bytes while the volume is written, its mapped ranges cover every byte
 * that is not zero, the ranges changed between two snapshots are about what was written,
 * and the backup engine, fed those ranges, makes a full and an incremental backup into a
 * directory that restores byte for byte. Run as root inside the VM:
 *   npm run vm -- node --import tsx --test --test-reporter=spec test/vm/dmthin-backup.test.ts
 */
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdtemp, open, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { DEFAULT_BLOCK_SIZE_BYTES } from "../../src/backup/blocks.js";
import { DirectoryStore } from "../../src/backup/directory-store.js";
import { createBackup, type BackupSummary } from "../../src/backup/engine.js";
import { blocksTouching } from "../../src/backup/plan.js";
import { restoreBackup } from "../../src/backup/restore.js";
import { ConflictError } from "../../src/errors.js";
import { createLogger } from "../../src/log.js";
import { DmThinPool } from "../../src/pool/dmthin/index.js";
import type { SnapshotReader, VolumeRange } from "../../src/pool/types.js";
import { thinPoolStatus } from "../../src/system/dmsetup.js";
import { fileExtents, type ByteRange } from "../../src/system/extents.js";
import { baseMountOptions, formatFilesystem } from "../../src/system/filesystem.js";
import { ExecaRunner } from "../../src/system/runner.js";
import { dmDevicesNamed, loopDevicesUnder, tearDownPool, withMount } from "../support/kernel.js";

const MiB = 1024 ** 2;
const GiB = 1024 ** 3;
/** The pool's block size (the default, 128 sectors), and the unit the device scan looks at. */
const POOL_BLOCK = 64 * 1024;
const VOLUME_BYTES = GiB;
const FILES = 16;
const FILE_BYTES = 4 * MiB;
/** Written in place between the two snapshots: about 1 % of the volume, inside one file. */
const OVERWRITE_BYTES = 10 * MiB;
const OVERWRITE_AT = MiB;
/** Every dm device of this file has a name starting with this. */
const PREFIX = "tvbak";
const real = new ExecaRunner();
const started = Date.now();
const report: string[] = [];
const note = (line: string) => {
  report.push(line);
  console.log(`  # ${line}`);
};
const mib = (bytes: number) => `${(bytes / MiB).toFixed(1)} MiB`;
const total = (ranges: readonly VolumeRange[]) => ranges.reduce((n, r) => n + r.length, 0);

async function timed<T>(what: string, work: () => Promise<T>): Promise<T> {
  const t = Date.now();
  const result = await work();
  note(`${what}: ${Date.now() - t} ms`);
  return result;
}

interface Scan {
  sha: string;
  /** Offsets of the 64 KiB chunks that are not all zeros. */
  nonZero: number[];
  sizeBytes: number;
}

const ZERO_CHUNK = Buffer.alloc(POOL_BLOCK);

/** The whole device's checksum and its chunks that hold something, read past any cached copy. */
async function scanDevice(path: string): Promise<Scan> {
  await real.run("blockdev", ["--flushbufs", path]);
  const handle = await open(path, "r");
  const hash = createHash("sha256");
  const nonZero: number[] = [];
  const buffer = Buffer.alloc(8 * MiB);
  let offset = 0;
  try {
    for (;;) {
      const { bytesRead } = await handle.read(buffer, 0, buffer.length, offset);
      if (bytesRead === 0) break;
      const piece = buffer.subarray(0, bytesRead);
      hash.update(piece);
      for (let c = 0; c < bytesRead; c += POOL_BLOCK) if (!piece.subarray(c, c + POOL_BLOCK).equals(ZERO_CHUNK.subarray(0, Math.min(POOL_BLOCK, bytesRead - c)))) nonZero.push(offset + c);
      offset += bytesRead;
    }
  } finally {
    await handle.close();
  }
  return { sha: hash.digest("hex"), nonZero, sizeBytes: offset };
}

/** Whether [offset, offset+length) lies inside the (sorted, merged) ranges. */
function covered(ranges: readonly VolumeRange[], r: ByteRange): boolean {
  return ranges.some((x) => x.offset <= r.offset && r.offset + r.length <= x.offset + x.length);
}

async function writeSynced(path: string, data: Buffer, position: number, flags: string): Promise<void> {
  const handle = await open(path, flags);
  try {
    await handle.write(data, 0, data.length, position);
    await handle.sync();
  } finally {
    await handle.close();
  }
}

describe("dm-thin backups on a real kernel", () => {
  let base: string;
  let pool: DmThinPool;
  const logs: string[] = [];
  const readers: SnapshotReader[] = [];
  const newPool = () => new DmThinPool({ runner: real, dir: join(base, "pool"), dataSizeBytes: 3 * GiB, log: createLogger("debug", (l) => logs.push(l)), name: PREFIX });
  const readerDevices = async () => (await dmDevicesNamed(`${PREFIX}-`)).filter((n) => n.includes("@"));

  let device: string;
  let atS1: Scan;
  let reader1: SnapshotReader;
  /** Where the overwritten bytes lie on the volume's device. */
  let written: ByteRange[] = [];

  before(async () => {
    base = await mkdtemp(join(process.env["THINVOL_TEST_TMP"] ?? tmpdir(), "thinvol-dmthin-backup-"));
    pool = newPool();
    await pool.open();
  });

  after(async () => {
    for (const r of readers) await r.release().catch(() => undefined);
    await pool.close().catch(() => undefined);
    await tearDownPool(base, `${PREFIX}-`).catch((err: unknown) => console.log(`cleanup: ${String(err)}`));
    assert.deepEqual(await dmDevicesNamed(`${PREFIX}-`), [], "no dm device left");
    assert.deepEqual(await loopDevicesUnder(base), [], "no loop device left");
    await rm(base, { recursive: true, force: true });
    console.log(`\nfindings:\n  ${report.join("\n  ")}\nwhole file: ${Math.round((Date.now() - started) / 1000)} s`);
  });

  test("a snapshot's reader reads exactly the volume's bytes at the snapshot; its mapped ranges cover every byte that is not zero", async () => {
    await pool.create("vol", VOLUME_BYTES);
    device = await pool.activate("vol");
    await formatFilesystem(real, device, "ext4", "vol", VOLUME_BYTES);
    await withMount(device, base, async (mnt) => {
      for (let i = 0; i < FILES; i++) await writeSynced(join(mnt, `f${i}`), randomBytes(FILE_BYTES), 0, "w");
    }, { options: baseMountOptions("ext4") });
    note(`wrote ${mib(FILES * FILE_BYTES)} of files into a ${mib(VOLUME_BYTES)} ext4 volume`);
    atS1 = await timed("scan of the volume's device (sha256 of 1 GiB)", () => scanDevice(device));
    // The volume stays active (attached) for the snapshot and everything after.
    await timed("snapshot s1", () => pool.snapshot("vol", "s1"));
    reader1 = await timed("openSnapshot s1", () => pool.openSnapshot("vol", "s1"));
    readers.push(reader1);
    assert.match(reader1.path, new RegExp(`^/dev/mapper/${PREFIX}-@read-\\d+-\\d+$`));
    const info = (await real.run("dmsetup", ["info", "-c", "--noheadings", "-o", "attr", reader1.path.replace("/dev/mapper/", "")])).stdout.trim();
    assert.match(info, /^..-r/, `the reader's device is read-only (attr ${info})`);
    await assert.rejects(writeSynced(reader1.path, Buffer.alloc(4096, 1), 0, "r+"), /EPERM|EROFS|EACCES/, "a write to the reader is refused");
    const s1 = await timed("scan of the reader", () => scanDevice(reader1.path));
    assert.equal(s1.sizeBytes, VOLUME_BYTES);
    assert.equal(s1.sha, atS1.sha, "the reader holds the volume's bytes at the snapshot");

    const mapped = await timed("changedRanges(s1)", () => pool.changedRanges("vol", "s1"));
    note(`changedRanges(s1): ${mapped.length} ranges, ${mib(total(mapped))} mapped; ${s1.nonZero.length} non-zero 64 KiB chunks (${mib(s1.nonZero.length * POOL_BLOCK)})`);
    const missed = s1.nonZero.filter((offset) => !covered(mapped, { offset, length: POOL_BLOCK }));
    assert.deepEqual(missed, [], "every non-zero chunk lies in a mapped range");
    assert.ok(total(mapped) < VOLUME_BYTES / 4, `far less than the volume is mapped (${mib(total(mapped))})`);
    for (let i = 1; i < mapped.length; i++) assert.ok((mapped[i - 1]?.offset ?? 0) + (mapped[i - 1]?.length ?? 0) < (mapped[i]?.offset ?? 0), "sorted, merged");
  });

  test("the volume is written while the reader is open; changedRanges(s2, s1) is about what was written", async () => {
    await withMount(device, base, async (mnt) => {
      // Overwritten in place, as `dd conv=notrunc` does: the file keeps its blocks.
      await real.run("dd", ["if=/dev/urandom", `of=${join(mnt, "f3")}`, "bs=1M", `seek=${OVERWRITE_AT / MiB}`, `count=${OVERWRITE_BYTES / MiB}`, "conv=notrunc,fsync", "status=none"]);
      written = (await fileExtents(real, join(mnt, "f3"), { offset: OVERWRITE_AT, length: OVERWRITE_BYTES })).map((e) => ({ offset: e.deviceOffset, length: e.length }));
    }, { options: baseMountOptions("ext4") });
    assert.equal(total(written), OVERWRITE_BYTES, "the overwritten bytes lie in the file's blocks");
    const still = await timed("scan of the s1 reader after the writes", () => scanDevice(reader1.path));
    assert.equal(still.sha, atS1.sha, "the snapshot did not change under the writes");

    await pool.snapshot("vol", "s2");
    const changed = await timed("changedRanges(s2, s1)", () => pool.changedRanges("vol", "s2", "s1"));
    note(`changedRanges(s2, s1): ${changed.length} ranges, ${mib(total(changed))} for ${mib(OVERWRITE_BYTES)} written in place`);
    for (const w of written) {
      const first = Math.floor(w.offset / POOL_BLOCK) * POOL_BLOCK;
      const end = Math.ceil((w.offset + w.length) / POOL_BLOCK) * POOL_BLOCK;
      assert.ok(covered(changed, { offset: first, length: end - first }), `written bytes at ${w.offset} (+${w.length}) are in the changed ranges`);
    }
    assert.ok(total(changed) < 3 * OVERWRITE_BYTES + 16 * POOL_BLOCK, `about what was written, not more (${mib(total(changed))})`);
    assert.deepEqual(await pool.changedRanges("vol", "s2", "s2"), [], "a snapshot against itself: nothing changed");
  });

  test("removeSnapshot is refused while a reader is open; readers and a metadata snapshot left by a killed process are removed by the next open()", async () => {
    await assert.rejects(pool.removeSnapshot("vol", "s1"), (e: Error) => e instanceof ConflictError && /snapshot "s1" of thin volume "vol" is being read/.test(e.message));
    await pool.openSnapshot("vol", "s2");
    assert.equal((await readerDevices()).length, 2);
    // A process killed inside changedRanges leaves the pool's metadata snapshot reserved.
    await real.run("dmsetup", ["message", `${PREFIX}-pool`, "0", "reserve_metadata_snap"]);
    assert.equal((await thinPoolStatus(real, `${PREFIX}-pool`)).metadataSnapHeld, true);
    // A new process takes the pool over without release(): the old one was killed.
    readers.splice(0);
    pool = newPool();
    await timed("open() with two left readers and a metadata snapshot left reserved", () => pool.open());
    assert.deepEqual(await readerDevices(), [], "both left readers are gone");
    assert.equal((await thinPoolStatus(real, `${PREFIX}-pool`)).metadataSnapHeld, false, "the metadata snapshot is released");
    reader1 = await pool.openSnapshot("vol", "s1");
    readers.push(reader1);
  });

  test("the backup engine, planned by changedRanges: a full backup of s1, an incremental of s2 a fraction of it, restored byte for byte", async () => {
    const store = new DirectoryStore(join(base, "store"));
    const sizeBytes = await pool.snapshotSizeOf("vol", "s1");
    const g = { sizeBytes, blockSizeBytes: DEFAULT_BLOCK_SIZE_BYTES };
    const describeRun = (s: BackupSummary) =>
      `${s.blocksRead} blocks read (${mib(s.bytesRead)}), ${s.blocksUploaded} uploaded (${mib(s.bytesUploaded)}), ${s.blocksZero} zero, ${s.durationMs} ms`;

    const fullPlan = blocksTouching(await pool.changedRanges("vol", "s1"), g);
    const full = await createBackup({ store, volume: "vol", snapshotName: "s1", device: reader1.path, sizeBytes, blocksToRead: fullPlan });
    note(`full backup of s1: ${fullPlan.length} of ${sizeBytes / DEFAULT_BLOCK_SIZE_BYTES} blocks planned; ${describeRun(full)}`);

    const reader2 = await pool.openSnapshot("vol", "s2");
    readers.push(reader2);
    const incPlan = blocksTouching(await pool.changedRanges("vol", "s2", "s1"), g);
    const inc = await createBackup({ store, volume: "vol", snapshotName: "s2", device: reader2.path, sizeBytes, blocksToRead: incPlan, previous: full.manifest });
    note(`incremental backup of s2: ${incPlan.length} blocks planned; ${describeRun(inc)}; ${((100 * inc.bytesUploaded) / full.bytesUploaded).toFixed(1)} % of the full upload`);
    assert.ok(full.bytesUploaded >= (FILES * FILE_BYTES) / 2, "the full backup holds the files");
    assert.ok(inc.bytesUploaded < full.bytesUploaded / 3, "the incremental uploads a small fraction of the full");
    assert.ok(inc.blocksRead < fullPlan.length / 3, "and reads a small fraction");

    await pool.create("restored", sizeBytes);
    const target = await pool.activate("restored");
    const restored = await timed("restore of the incremental into a new thin volume", () => restoreBackup({ store, manifest: inc.manifest, device: target }));
    note(`restore: ${restored.blocksWritten} blocks, ${mib(restored.bytesWritten)} written`);
    const [got, want] = [await scanDevice(target), await scanDevice(reader2.path)];
    assert.equal(got.sha, want.sha, "the restored volume is s2, byte for byte");
    note(`restored volume allocates ${mib(await pool.allocatedBytes("restored"))} of the pool (thin: unwritten blocks stay unmapped)`);

    const paths = readers.map((r) => r.path);
    for (const r of readers.splice(0)) await r.release();
    assert.deepEqual(await readerDevices(), [], "release() removed the readers");
    assert.deepEqual(paths.filter((p) => existsSync(p)), [], "and their /dev/mapper nodes");
    await pool.deactivate("restored");
    await pool.remove("restored");
    await pool.removeSnapshot("vol", "s2");
    await pool.removeSnapshot("vol", "s1");
    await pool.deactivate("vol");
    await pool.remove("vol");
  });
});
