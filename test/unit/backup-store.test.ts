import assert from "node:assert/strict";
import { readdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { test } from "node:test";
import { DirectoryStore } from "../../src/backup/directory-store.js";
import { openStore } from "../../src/backup/store.js";
import { InvalidRequestError } from "../../src/errors.js";
import { withTempDir } from "../support/backup.js";

test("a directory store keeps objects by key, lists them by prefix and deletes them", () =>
  withTempDir(async (dir) => {
    const store = new DirectoryStore(join(dir, "target"));
    assert.equal(await store.has("blocks/ab/cd/x"), false);
    assert.equal(await store.get("blocks/ab/cd/x"), undefined);
    assert.deepEqual(await store.list("blocks/"), []);

    await store.put("blocks/ab/cd/x", Buffer.from("one"));
    await store.put("blocks/ab/ef/y", Buffer.from("two"));
    await store.put("backups/db/1.json", Buffer.from("{}"));
    await store.put("blocks/ab/cd/x", Buffer.from("three")); // replaced whole

    assert.equal(Buffer.from((await store.get("blocks/ab/cd/x")) ?? []).toString(), "three");
    assert.equal(await store.has("blocks/ab/ef/y"), true);
    assert.deepEqual(await store.list("blocks/"), ["blocks/ab/cd/x", "blocks/ab/ef/y"]);
    assert.deepEqual(await store.list(""), ["backups/db/1.json", "blocks/ab/cd/x", "blocks/ab/ef/y"]);
    assert.deepEqual(await store.list("backups/db/"), ["backups/db/1.json"]);

    await store.delete("blocks/ab/cd/x");
    await store.delete("blocks/ab/cd/x"); // absent is fine
    assert.deepEqual(await store.list("blocks/"), ["blocks/ab/ef/y"]);
  }));

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
    for (const key of ["../secret", "blocks/../../secret", "/etc/passwd", "a//b", "blocks/", "", ".hidden", "a/./b", "a/..", "a\\..\\b", "a/\0b"]) {
      await assert.rejects(store.get(key), InvalidRequestError, key);
      await assert.rejects(store.put(key, Buffer.from("x")), InvalidRequestError, key);
      await assert.rejects(store.delete(key), InvalidRequestError, key);
      await assert.rejects(store.has(key), InvalidRequestError, key);
    }
    await assert.rejects(store.list("../"), InvalidRequestError);
    await assert.rejects(store.list("blocks"), /must end with '\/'/);
    assert.deepEqual(await readdir(dir), ["secret"]); // nothing written anywhere
  }));

test("targets: file:///path opens a directory store; other schemes are refused clearly", () => {
  const store = openStore("file:///srv/backups");
  assert.ok(store instanceof DirectoryStore);
  assert.equal(store.root, "/srv/backups");
  assert.throws(() => openStore("s3://bucket/prefix"), /not supported yet/);
  assert.throws(() => openStore("file://host/srv"), /no host/);
  assert.throws(() => openStore("not a url"), /invalid backup target "not a url"/);
});
