import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { loadSettings } from "../../src/settings.js";
import { formatSize, parseSize } from "../../src/size.js";
import { checkSize, parseCreateOptions } from "../../src/volumes/options.js";

describe("sizes", () => {
  for (const [text, bytes] of [
    ["64M", 64 * 1024 ** 2],
    ["20G", 20 * 1024 ** 3],
    ["1.5GiB", 1.5 * 1024 ** 3],
    ["512m", 512 * 1024 ** 2],
    ["1048576", 1048576],
    ["2T", 2 * 1024 ** 4],
    ["100KB", 100 * 1024],
  ] as const) {
    test(`${text} is ${bytes} bytes`, () => assert.equal(parseSize(text), bytes));
  }
  for (const bad of ["", "G", "12Q", "-1G", "1 2G", "1e9"]) {
    test(`${JSON.stringify(bad)} is not a size`, () => assert.equal(parseSize(bad), undefined));
  }
  test("sizes print in binary units", () => {
    assert.equal(formatSize(64 * 1024 ** 2), "64 MiB");
    assert.equal(formatSize(1.5 * 1024 ** 3), "1.50 GiB");
  });
});

describe("volume options", () => {
  test("every option is read and typed", () => {
    assert.deepEqual(
      parseCreateOptions("v", { size: "1G", fs: "xfs", uid: "999", gid: "998", mode: "0700", mountopts: "noatime,nodev" }),
      { sizeBytes: 1024 ** 3, fs: "xfs", uid: 999, gid: 998, mode: 0o700, mountOptions: ["noatime", "nodev"] },
    );
  });
  test("null options are no options", () => assert.deepEqual(parseCreateOptions("v", null), { mountOptions: [] }));
  test("an unknown option names itself and lists the allowed ones", () => {
    assert.throws(() => parseCreateOptions("v", { sise: "1G" }), /volume "v": unknown option "sise"; allowed options are size, fs, from, uid, gid, mode, mountopts/);
  });
  test("a bad size says what a size looks like", () => {
    assert.throws(() => parseCreateOptions("v", { size: "lots" }), /size "lots" is not a size: use a number with an optional unit, such as 64M/);
  });
  test("an unsupported filesystem lists the supported ones", () => {
    assert.throws(() => parseCreateOptions("v", { fs: "btrfs" }), /fs "btrfs" is not supported: use ext4 or xfs/);
  });
  test("a mount option outside the allow-list is refused", () => {
    assert.throws(() => parseCreateOptions("v", { mountopts: "noatime,suid,bind" }), /mount option "suid", "bind" is not allowed: allowed are noatime/);
  });
  test("several problems are reported together", () => {
    assert.throws(() => parseCreateOptions("v", { uid: "-1", mode: "999" }), /uid must be a whole number.*; mode "999" must be octal/);
  });
  test("from must be a valid volume name and not the volume itself", () => {
    assert.throws(() => parseCreateOptions("v", { from: "../etc" }), /from "..\/etc" is not a valid volume name/);
    assert.throws(() => parseCreateOptions("v", { from: "v" }), /cannot be a clone of itself/);
  });
  test("sizes below the filesystem's minimum are refused, others rounded to 4 KiB", () => {
    assert.throws(() => checkSize("v", 100 * 1024 ** 2, "xfs"), /100 MiB is too small for xfs; the minimum is 300 MiB/);
    assert.throws(() => checkSize("v", 1024 ** 2, "ext4"), /too small for ext4/);
    assert.equal(checkSize("v", 64 * 1024 ** 2 + 1, "ext4"), 64 * 1024 ** 2 + 4096);
  });
});

describe("settings", () => {
  test("defaults", () => {
    const s = loadSettings({});
    assert.equal(s.SOCKET_PATH, "/run/docker/plugins/thinvol.sock");
    assert.equal(s.POOL_DRIVER, "auto");
    assert.equal(s.POOL_SIZE, 100 * 1024 ** 3);
    assert.equal(s.DEFAULT_FS, "ext4");
    assert.equal(s.MIN_FREE_SPACE, 10);
  });
  test("values are parsed; empty counts as unset", () => {
    const s = loadSettings({ POOL_SIZE: "4G", MIN_FREE_SPACE: "5%", POOL_DRIVER: "loop", DEFAULT_FS: "", LOG_LEVEL: "debug" });
    assert.equal(s.POOL_SIZE, 4 * 1024 ** 3);
    assert.equal(s.MIN_FREE_SPACE, 5);
    assert.equal(s.POOL_DRIVER, "loop");
    assert.equal(s.DEFAULT_FS, "ext4");
  });
  test("every bad setting is named in one error", () => {
    assert.throws(
      () => loadSettings({ POOL_SIZE: "huge", POOL_DRIVER: "zfs", MIN_FREE_SPACE: "150", STATE_DIR: "relative" }),
      (err: Error) =>
        /POOL_SIZE="huge"/.test(err.message) &&
        /POOL_DRIVER="zfs": POOL_DRIVER must be auto, dm-thin or loop/.test(err.message) &&
        /MIN_FREE_SPACE="150"/.test(err.message) &&
        /STATE_DIR="relative": STATE_DIR must be an absolute path/.test(err.message),
    );
  });
});
