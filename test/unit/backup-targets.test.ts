import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { DirectoryStore } from "../../src/backup/directory-store.js";
import { BackupTargets, mountRootOf } from "../../src/backup/targets.js";
import type { BackupStore } from "../../src/backup/store.js";

/** A mount table as the plugin sees it: the backups mount is a bind of a host directory. */
const MOUNTINFO = [
  "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw",
  "40 22 8:1 /var/lib/docker/plugins /var/lib/docker-plugins rw,relatime - ext4 /dev/sda1 rw",
  "41 22 8:1 /srv/my\\040backups /backups rw,relatime - ext4 /dev/sda1 rw",
].join("\n");

const rootOf = async (store: Promise<BackupStore>) => {
  const s = await store;
  assert.ok(s instanceof DirectoryStore);
  return s.root;
};

describe("backup targets", () => {
  test("the mount table tells which host directory a mount shows (octal escapes undone)", () => {
    assert.equal(mountRootOf(MOUNTINFO, "/backups"), "/srv/my backups");
    assert.equal(mountRootOf(MOUNTINFO, "/nowhere"), undefined);
  });

  test("a file URL is a host path, mapped into the backups mount", async () => {
    const t = new BackupTargets({ backupsDir: "/backups", backupsSource: "", readMountInfo: async () => MOUNTINFO });
    assert.equal(await rootOf(t.open("file:///srv/my%20backups")), "/backups");
    assert.equal(await rootOf(t.open("file:///srv/my%20backups/prod/db/")), "/backups/prod/db");
    const store = await t.open("file:///srv/my%20backups/prod");
    assert.equal(store.url, "file:///srv/my%20backups/prod", "messages quote the URL the user gave");
  });

  test("a path outside the mount, or one climbing out of it, is refused with the command that fixes it", async () => {
    const t = new BackupTargets({ backupsDir: "/backups", backupsSource: "/mnt/backup", readMountInfo: async () => MOUNTINFO });
    for (const url of ["file:///etc", "file:///mnt/backupx", "file:///mnt/backup/../../etc", "file:///mnt/backup/%2e%2e/etc"]) {
      await assert.rejects(t.open(url), /is outside the host directory the plugin can reach \(\/mnt\/backup\); .*backups\.source=/, url);
    }
    assert.equal(await rootOf(t.open("file:///mnt/backup/a/./b")), "/backups/a/b");
  });

  test("a mount of a filesystem's root cannot be placed: BACKUPS_SOURCE is asked for", async () => {
    const t = new BackupTargets({ backupsDir: "/backups", backupsSource: "", readMountInfo: async () => "41 22 8:17 / /backups rw - xfs /dev/sdb1 rw" });
    await assert.rejects(t.open("file:///mnt/backup"), /set BACKUPS_SOURCE to the same path as backups\.source/);
    const none = new BackupTargets({ backupsDir: "/backups", backupsSource: "", readMountInfo: async () => "" });
    await assert.rejects(none.open("file:///mnt/backup"), /nothing is mounted at \/backups/);
  });

  test("outside the plugin a file URL is used as it stands; bad URLs are refused before anything", async () => {
    const t = new BackupTargets({ backupsDir: "", backupsSource: "" });
    assert.equal(await rootOf(t.open("file:///tmp/x/")), "/tmp/x");
    for (const [url, re] of [
      ["", /a backup target is needed/],
      ["not a url", /invalid backup target/],
      ["file://host/x", /no host, query or fragment/],
      ["file:///x?y=1", /no host, query or fragment/],
      ["ftp://x/y", /is not supported: use file:\/\/\/path or s3:\/\/bucket\/prefix/],
      ["file:///a%0Ab", /control characters/],
      [`file:///${"a".repeat(1100)}`, /too long/],
    ] as const) {
      await assert.rejects(t.open(url), re, url);
    }
  });

  test("other URLs go to the store module once each: one S3 client per target", async () => {
    let opened = 0;
    const fake = { url: "s3://b/p" } as BackupStore;
    const t = new BackupTargets({ backupsDir: "/backups", backupsSource: "/x", openOther: () => (opened++, fake) });
    assert.equal(await t.open("s3://b/p"), fake);
    assert.equal(await t.open("s3://b/p"), fake);
    assert.equal(opened, 1);
  });
});
