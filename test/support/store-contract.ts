import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { test } from "node:test";
import type { BackupStore } from "../../src/backup/store.js";
import { InvalidRequestError } from "../../src/errors.js";

export interface OpenedStore {
  store: BackupStore;
  /** Releases what the store holds (a directory, a client's connections). */
  close(): Promise<void>;
}

/** Keys no store may accept: they leave the store's space, are empty or hidden, or are not keys at all. */
export const BAD_KEYS = ["../secret", "blocks/../../secret", "/etc/passwd", "a//b", "blocks/", "", ".hidden", "a/./b", "a/..", "a\\..\\b", "a/\0b", "a b", "é"];

/**
 * What engine.ts, restore.ts, gc.ts and lease.ts rely on from any BackupStore, as tests: every
 * store (a directory, S3) is held to the same behaviour. `open` gives a new, empty store each time.
 */
export function backupStoreContract(kind: string, open: () => Promise<OpenedStore>): void {
  const withStore = (fn: (store: BackupStore) => Promise<void>) => async () => {
    const { store, close } = await open();
    try {
      await fn(store);
    } finally {
      await close();
    }
  };

  test(`${kind}: keeps objects by key, replaces them whole, lists them by prefix and deletes them`, withStore(async (store) => {
    assert.equal(await store.has("blocks/ab/cd/x"), false);
    assert.equal(await store.get("blocks/ab/cd/x"), undefined);
    assert.deepEqual(await store.list("blocks/"), []);
    assert.deepEqual(await store.list(""), []);

    await store.put("blocks/ab/cd/x", Buffer.from("one"));
    await store.put("blocks/ab/ef/y", Buffer.from("two"));
    await store.put("backups/db/1.json", Buffer.from("{}"));
    await store.put("blocks/ab/cd/x", Buffer.from("three")); // replaced whole

    assert.equal(Buffer.from((await store.get("blocks/ab/cd/x")) ?? []).toString(), "three");
    assert.equal(await store.has("blocks/ab/ef/y"), true);
    assert.equal(await store.has("blocks/ab"), false); // a "directory" is not an object
    assert.deepEqual(await store.list("blocks/"), ["blocks/ab/cd/x", "blocks/ab/ef/y"]);
    assert.deepEqual(await store.list(""), ["backups/db/1.json", "blocks/ab/cd/x", "blocks/ab/ef/y"]);
    assert.deepEqual(await store.list("backups/db/"), ["backups/db/1.json"]);
    assert.deepEqual(await store.list("backups/d/"), []); // a prefix is whole segments, not a string prefix

    await store.delete("blocks/ab/cd/x");
    await store.delete("blocks/ab/cd/x"); // absent is fine
    assert.equal(await store.has("blocks/ab/cd/x"), false);
    assert.deepEqual(await store.list("blocks/"), ["blocks/ab/ef/y"]);
  }));

  test(`${kind}: bytes come back exactly, an empty object included`, withStore(async (store) => {
    const data = randomBytes(1024 * 1024 + 7);
    await store.put("blocks/00/01/big", data);
    await store.put("locks/empty.json", new Uint8Array());
    assert.ok(Buffer.from((await store.get("blocks/00/01/big")) ?? []).equals(data));
    assert.equal((await store.get("locks/empty.json"))?.byteLength, 0);
    assert.equal(await store.has("locks/empty.json"), true);
  }));

  test(`${kind}: lists many keys at any depth, all of them, sorted`, withStore(async (store) => {
    const keys = Array.from({ length: 30 }, (_, i) => `blocks/${(i % 4).toString(16).padStart(2, "0")}/${String(29 - i).padStart(2, "0")}/k${i}`);
    // Put in an order unrelated to the sorted one, a few at a time.
    for (let i = 0; i < keys.length; i += 6) await Promise.all(keys.slice(i, i + 6).map((k) => store.put(k, Buffer.from(k))));
    await store.put("backups/v/1.json", Buffer.from("{}"));
    const sorted = [...keys].sort();
    assert.deepEqual(await store.list("blocks/"), sorted);
    assert.deepEqual(await store.list("blocks/01/"), sorted.filter((k) => k.startsWith("blocks/01/")));
    assert.equal((await store.list("")).length, 31);
  }));

  test(`${kind}: refuses bad keys and prefixes and changes nothing`, withStore(async (store) => {
    await store.put("blocks/aa/bb/c", Buffer.from("x"));
    for (const key of BAD_KEYS) {
      await assert.rejects(store.get(key), InvalidRequestError, key);
      await assert.rejects(store.put(key, Buffer.from("x")), InvalidRequestError, key);
      await assert.rejects(store.delete(key), InvalidRequestError, key);
      await assert.rejects(store.has(key), InvalidRequestError, key);
    }
    await assert.rejects(store.list("../"), InvalidRequestError);
    await assert.rejects(store.list("blocks"), /must end with '\/'/);
    assert.deepEqual(await store.list(""), ["blocks/aa/bb/c"]);
  }));
}
