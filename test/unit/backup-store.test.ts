import assert from "node:assert/strict";
import { mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { DirectoryStore } from "../../src/backup/directory-store.js";
import { LazyS3Store } from "../../src/backup/s3-lazy.js";
import { openStore } from "../../src/backup/store.js";
import { InvalidRequestError } from "../../src/errors.js";
import { withTempDir } from "../support/backup.js";
import { BAD_KEYS, backupStoreContract } from "../support/store-contract.js";

backupStoreContract("a directory store", async () => {
  const dir = await mkdtemp(join(tmpdir(), "thinvol-backup-"));
  return { store: new DirectoryStore(join(dir, "target")), close: () => rm(dir, { recursive: true, force: true }) };
});

test("a put leaves no temporary file behind, and a temporary file left by a crash is never listed", () =>
  withTempDir(async (dir) => {
    const store = new DirectoryStore(dir);
    await store.put("blocks/aa/bb/c", Buffer.alloc(1000, 1));
    assert.deepEqual(await readdir(join(dir, "blocks/aa/bb")), ["c"]);
    await writeFile(join(dir, "blocks/aa/bb/.1234.tmp"), "half a block");
    assert.deepEqual(await store.list("blocks/"), ["blocks/aa/bb/c"]);
  }));

test("keys never reach outside the store's directory", () =>
  withTempDir(async (dir) => {
    const store = new DirectoryStore(join(dir, "target"));
    await writeFile(join(dir, "secret"), "x");
    for (const key of BAD_KEYS) {
      await assert.rejects(store.get(key), InvalidRequestError, key);
      await assert.rejects(store.put(key, Buffer.from("x")), InvalidRequestError, key);
      await assert.rejects(store.delete(key), InvalidRequestError, key);
      await assert.rejects(store.has(key), InvalidRequestError, key);
    }
    await assert.rejects(store.list("../"), InvalidRequestError);
    await assert.rejects(store.list("blocks"), /must end with '\/'/);
    assert.deepEqual(await readdir(dir), ["secret"]); // nothing written anywhere
  }));

test("targets: file:///path opens a directory store, s3://bucket/prefix an S3 store; other schemes are refused clearly", () => {
  const store = openStore("file:///srv/backups");
  assert.ok(store instanceof DirectoryStore);
  assert.equal(store.root, "/srv/backups");
  const s3 = openStore("s3://bucket/prefix", { s3: { region: "us-east-1" } });
  assert.ok(s3 instanceof LazyS3Store);
  assert.equal(s3.url, "s3://bucket/prefix");
  assert.throws(() => openStore("s3://Bucket/prefix"), /bucket "Bucket" is not a valid name/);
  assert.throws(() => openStore("sftp://host/srv"), /not supported: use file:\/\/\/path or s3:\/\/bucket\/prefix/);
  assert.throws(() => openStore("file://host/srv"), /no host/);
  assert.throws(() => openStore("not a url"), /invalid backup target "not a url"/);
});
