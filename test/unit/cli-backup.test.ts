import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { runCli, useFakeAdmin } from "../support/cli-fakes.js";

const MiB = 1024 ** 2;
const ID = "20261129T101500123Z-1a2b3c4d";
const ID2 = "20261129T111500456Z-5e6f7a8b";
const TARGET = "file:///mnt/backup";
const BACKUP = { id: ID, volume: "db", createdAt: "2026-11-29T10:15:00.123Z", sizeBytes: 1024 * MiB, filesystem: "ext4", blocks: 87, dataBytes: 174 * MiB };
const RESULT = {
  ...BACKUP,
  id: ID2,
  previous: ID,
  target: TARGET,
  incremental: true,
  blocksRead: 7,
  blocksChanged: 7,
  blocksUploaded: 7,
  bytesRead: 14 * MiB,
  bytesUploaded: 10 * MiB,
  durationMs: 256,
};

const fake = useFakeAdmin();

describe("thinvol backup and restore", () => {
  test("backup create posts the target and prints what was read and sent", async () => {
    fake.admin.on("POST", "/v1/volumes/db/backups", { json: RESULT });
    const r = await runCli(["backup", "create", "db", "--to", TARGET, ...fake.sock]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(
      r.stdout,
      `backed up volume "db" as ${ID2} at ${TARGET} (incremental to ${ID})\n  7 blocks read (14 MiB), 7 changed, 7 stored (10 MiB sent) in 0.3 s\n`,
    );
    assert.deepEqual(fake.admin.requests[0]?.body, { to: TARGET });
  });

  test("the target comes from --to, else THINVOL_BACKUP_TARGET; without one it is a usage error and nothing is sent", async () => {
    fake.admin.on("POST", "/v1/volumes/db/backups", { json: RESULT });
    const fromEnv = await runCli(["backup", "create", "db", ...fake.sock], { env: { THINVOL_BACKUP_TARGET: "s3://bucket/prod" } });
    assert.equal(fromEnv.code, 0, fromEnv.stderr);
    assert.deepEqual(fake.admin.requests[0]?.body, { to: "s3://bucket/prod" });
    const none = await runCli(["backup", "create", "db", ...fake.sock]);
    assert.equal(none.code, 2);
    assert.match(none.stderr, /backup create needs --to URL/);
    for (const bad of ["http://x/y", "file://host/x", "s3://", "/mnt/backup"]) {
      const r = await runCli(["backup", "create", "db", "--to", bad, ...fake.sock]);
      assert.equal(r.code, 2, bad);
      assert.match(r.stderr, /invalid backup target/);
    }
    assert.equal(fake.admin.requests.length, 1, "only the valid call reached the plugin");
  });

  test("backup ls puts the target in the query and prints a table", async () => {
    fake.admin.on("GET", `/v1/backups?to=${encodeURIComponent(TARGET)}&volume=db`, { json: { backups: [BACKUP] } });
    const r = await runCli(["backup", "ls", "db", "--to", TARGET, ...fake.sock]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^ID\s+VOLUME\s+CREATED\s+SIZE\s+DATA\s+FS\n/);
    assert.match(r.stdout, new RegExp(`${ID}\\s+db\\s+2026-11-29T10:15:00Z\\s+1 GiB\\s+174 MiB\\s+ext4`));
  });

  test("backup verify of a damaged backup exits 1 and names the blocks; an intact one exits 0", async () => {
    fake.admin.on("POST", `/v1/backups/${ID}/verify`, { json: { id: ID, volume: "db", ok: false, blocksChecked: 87, missing: [3], damaged: [] } });
    const bad = await runCli(["backup", "verify", ID, "--to", TARGET, ...fake.sock]);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /backup 20261129T101500123Z-1a2b3c4d of volume "db" is damaged: 1 missing \(blocks 3\) of 87 blocks/);
    fake.admin.on("POST", `/v1/backups/${ID}/verify`, { json: { id: ID, volume: "db", ok: true, blocksChecked: 87, missing: [], damaged: [] } });
    const ok = await runCli(["backup", "verify", ID, "--to", TARGET, ...fake.sock]);
    assert.equal(ok.code, 0);
    assert.match(ok.stdout, /is intact: 87 blocks checked/);
  });

  test("backup rm and restore: ids are checked before anything is sent", async () => {
    fake.admin.on("DELETE", `/v1/backups/${ID}?to=${encodeURIComponent(TARGET)}`, { json: { id: ID, volume: "db", blocksDeleted: 5, blocksKept: 82, leasesRemoved: 0 } });
    const rm = await runCli(["backup", "rm", ID, "--to", TARGET, ...fake.sock]);
    assert.equal(rm.code, 0, rm.stderr);
    assert.equal(rm.stdout, `removed backup ${ID} of volume "db": 5 blocks deleted, 82 kept for other backups\n`);
    const volume = { name: "db2", sizeBytes: 1024 * MiB, filesystem: "ext4", mounted: false, mounts: 0, allocatedBytes: 174 * MiB, snapshots: [] };
    fake.admin.on("POST", "/v1/restore", { json: volume });
    const restored = await runCli(["restore", ID, "db2", "--from", TARGET, ...fake.sock]);
    assert.equal(restored.code, 0, restored.stderr);
    assert.deepEqual(fake.admin.requests.at(-1)?.body, { from: TARGET, id: ID, volume: "db2" });
    const sent = fake.admin.requests.length;
    for (const args of [["restore", "../x", "db2"], ["restore", ID, "bad/name"], ["backup", "rm", "latest"]]) {
      const r = await runCli([...args, "--from", TARGET, "--to", TARGET, ...fake.sock]);
      assert.equal(r.code, 2, args.join(" "));
    }
    assert.equal(fake.admin.requests.length, sent);
  });

  test("backup rm and verify without --to leave the target to the plugin, which knows where it backed up", async () => {
    fake.admin.on("DELETE", `/v1/backups/${ID}`, { json: { id: ID, volume: "db", blocksDeleted: 1, blocksKept: 0, leasesRemoved: 0 } });
    fake.admin.on("POST", `/v1/backups/${ID}/verify`, { json: { id: ID, volume: "db", ok: true, blocksChecked: 1, missing: [], damaged: [] } });
    assert.equal((await runCli(["backup", "verify", ID, ...fake.sock])).code, 0);
    assert.deepEqual(fake.admin.requests.at(-1)?.body, {});
    assert.equal((await runCli(["backup", "rm", ID, ...fake.sock])).code, 0);
    assert.equal(fake.admin.requests.at(-1)?.path, `/v1/backups/${ID}`);
  });
});

