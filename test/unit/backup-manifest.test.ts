import assert from "node:assert/strict";
import { test } from "node:test";
import { BackupDamagedError } from "../../src/backup/errors.js";
import { listBackups, manifestKey, newBackupId, parseManifest, readManifest, serializeManifest, type Manifest } from "../../src/backup/manifest.js";
import { DirectoryStore } from "../../src/backup/directory-store.js";
import { NotFoundError } from "../../src/errors.js";
import { withTempDir } from "../support/backup.js";

const ID = "20261129T100000000Z-3f9a1c2b";
const D1 = "a".repeat(64);
const D2 = "b".repeat(64);
const where = { volume: "db", id: ID };

function manifest(over: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    format: 1, id: ID, volume: "db", snapshot: "backup-1", createdAt: "2026-11-29T10:00:00.000Z",
    sizeBytes: 10 * 2097152, blockSizeBytes: 2097152, compression: "gzip", blocks: [[0, D1], [7, D2]], ...over,
  };
}

test("a record survives a round trip, with and without a previous backup", () => {
  const m = parseManifest(JSON.stringify(manifest({ previous: "20261128T100000000Z-00000000" })), where);
  assert.equal(m.previous, "20261128T100000000Z-00000000");
  assert.deepEqual(parseManifest(serializeManifest(m), where), m);
  assert.equal("previous" in parseManifest(JSON.stringify(manifest()), where), false);
});

test("backup ids sort by time and are valid keys", () => {
  const a = newBackupId(new Date("2026-11-29T10:00:00.123Z"));
  const b = newBackupId(new Date("2026-11-29T10:00:00.124Z"));
  assert.match(a, /^20261129T100000123Z-[0-9a-f]{8}$/);
  assert.ok(a < b);
  assert.equal(manifestKey("db", a), `backups/db/${a}.json`);
});

test("hostile records are refused with an error naming the volume, the backup and the problem", () => {
  const cases: [Record<string, unknown> | string, RegExp][] = [
    ["{not json", /not JSON/],
    [manifest({ format: 2 }), /record format 2; this thinvol reads format 1 only/],
    [manifest({ format: undefined }), /record format "undefined"/],
    [manifest({ blocks: [[0, "A".repeat(64)]] }), /blocks\.0\.1: "AAAA.*" is not a SHA-256 digest/],
    [manifest({ blocks: [[0, "../../etc/passwd"]] }), /is not a SHA-256 digest/],
    [manifest({ blocks: [[10, D1]] }), /index 10 is past the volume's end \(10 blocks/],
    [manifest({ blocks: [[-1, D1]] }), /must not be negative/],
    [manifest({ blocks: [[1.5, D1]] }), /must be an integer/],
    [manifest({ blocks: [[3, D1], [3, D2]] }), /index 3 is not after 3/],
    [manifest({ blocks: [[5, D1], [2, D2]] }), /sorted/],
    [manifest({ sizeBytes: 1000 }), /multiple of 512/],
    [manifest({ blockSizeBytes: 3_000_000 }), /blockSizeBytes/],
    [manifest({ compression: "zstd" }), /compression/],
    [manifest({ volume: "other" }), /filed as backup .* of volume "db" but says .* of volume "other"/],
    [manifest({ volume: "../x" }), /invalid volume name/],
  ];
  for (const [input, expected] of cases) {
    const text = typeof input === "string" ? input : JSON.stringify(input);
    assert.throws(() => parseManifest(text, where), (err: unknown) => {
      assert.ok(err instanceof BackupDamagedError, String(err));
      assert.match(err.message, /^backup "20261129T100000000Z-3f9a1c2b" of volume "db"/);
      assert.match(err.message, expected);
      return true;
    }, text);
  }
});

test("records at a target: listed by volume, oldest first; an absent one is not found", () =>
  withTempDir(async (dir) => {
    const store = new DirectoryStore(dir);
    const older = "20261128T100000000Z-00000001";
    await store.put(manifestKey("db", ID), Buffer.from(JSON.stringify(manifest())));
    await store.put(manifestKey("db", older), Buffer.from(JSON.stringify(manifest({ id: older }))));
    await store.put("backups/db/notes.txt", Buffer.from("not a record"));
    assert.deepEqual(await listBackups(store, "db"), [{ volume: "db", id: older }, { volume: "db", id: ID }]);
    assert.deepEqual(await listBackups(store, "web"), []);
    const m: Manifest = await readManifest(store, "db", ID);
    assert.equal(m.blocks.length, 2);
    await assert.rejects(readManifest(store, "db", "20261127T100000000Z-00000000"), NotFoundError);
  }));
