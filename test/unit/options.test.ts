import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { loadSettings } from "../../src/settings.js";
import { formatSize, parseSize } from "../../src/size.js";
import { QUOTE_MAX_CHARS, quote, quoteList } from "../../src/errors.js";
import { MAX_OPTION_VALUE_CHARS, checkSize, checkVolumeName, parseCreateOptions } from "../../src/volumes/options.js";

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
  test("backup=URL#ID names a target and a backup id; size, fs and from cannot go with it", () => {
    const id = "20261129T101500123Z-1a2b3c4d";
    assert.deepEqual(parseCreateOptions("v", { backup: `s3://bucket/some/prefix#${id}` }).backup, { url: "s3://bucket/some/prefix", id });
    assert.deepEqual(parseCreateOptions("v", { backup: `file:///mnt/backup#${id}`, uid: "70" }).backup, { url: "file:///mnt/backup", id });
    for (const bad of ["s3://bucket", `http://x/y#${id}`, `s3://b/p#12`, `s3://b/p#${id}#${id}`, `#${id}`, `s3://b p#${id}`]) {
      assert.throws(() => parseCreateOptions("v", { backup: bad }), /is not URL#ID/, bad);
    }
    assert.throws(() => parseCreateOptions("v", { backup: `s3://b/p#${id}`, size: "1G", fs: "xfs" }), /has the backup's size and filesystem; leave out size and fs/);
    assert.throws(() => parseCreateOptions("v", { backup: `s3://b/p#${id}`, from: "w" }), /leave out from/);
  });
  test("an unknown option names itself and lists the allowed ones", () => {
    assert.throws(() => parseCreateOptions("v", { sise: "1G" }), /volume "v": unknown option "sise"; allowed options are size, fs, from, backup, uid, gid, mode, mountopts/);
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

describe("quoting user input in messages", () => {
  test("short text is quoted whole, with quotes and backslashes escaped", () => {
    assert.equal(quote('a"b\\c'), '"a\\"b\\\\c"');
  });
  test("control, bidirectional and separator characters are escaped, so a message stays one readable line", () => {
    assert.equal(quote("a\nb\r\t\u0000\u001b\u007f\u0085\u2028\u202e\ufeff"), '"a\\nb\\r\\t\\u0000\\u001b\\u007f\\u0085\\u2028\\u202e\\ufeff"');
    assert.equal(quote("x\ud800y"), '"x\\ud800y"', "a lone surrogate");
  });
  test("long text is cut at the cap with … and its full length; a character is never split", () => {
    assert.equal(quote("x".repeat(QUOTE_MAX_CHARS)), `"${"x".repeat(QUOTE_MAX_CHARS)}"`);
    assert.equal(quote("x".repeat(1_000_000)), `"${"x".repeat(QUOTE_MAX_CHARS)}…" (1000000 characters)`);
    assert.equal(quote("😀".repeat(200)), `"${"😀".repeat(QUOTE_MAX_CHARS)}…" (200 characters)`);
  });
  test("a list names its first five and counts the rest", () => {
    assert.equal(quoteList(["a", "b", "c", "d", "e", "f", "g"]), '"a", "b", "c", "d", "e" and 2 more');
  });
  test("an invalid volume name is quoted capped and escaped", () => {
    assert.throws(() => checkVolumeName("\u001b]0;pwned\u0007" + "y".repeat(10_000)), (err: Error) => {
      assert.match(err.message, /^invalid volume name "\\u001b\]0;pwned\\u0007y+…" \(10010 characters\): use 1 to 96/);
      assert.ok(err.message.length < 250, err.message);
      return true;
    });
  });
  test("thousands of unknown options, each huge, make a short error", () => {
    const opts: Record<string, string> = {};
    for (let i = 0; i < 5000; i++) opts[`k${i}-${"q".repeat(1000)}`] = "v";
    assert.throws(() => parseCreateOptions("v", opts), (err: Error) => {
      assert.match(err.message, /unknown option "k0-q+…" \(1003 characters\), .* and 4995 more; allowed options are size/);
      assert.ok(err.message.length < 1000, `an error of ${err.message.length} characters`);
      return true;
    });
  });
  test("option values are quoted capped in every message", () => {
    const long = "\n" + "z".repeat(200);
    for (const [opts, pattern] of [
      [{ size: long }, /size "\\nz+…" \(201 characters\) is not a size/],
      [{ fs: long }, /fs "\\nz+…" \(201 characters\) is not supported/],
      [{ from: long }, /from "\\nz+…" \(201 characters\) is not a valid volume name/],
      [{ mode: long }, /mode "\\nz+…" \(201 characters\) must be octal/],
      [{ mountopts: `noatime,${long}` }, /mount option "z+…" \(200 characters\) is not allowed/],
    ] as const) {
      assert.throws(() => parseCreateOptions("v", opts), (err: Error) => pattern.test(err.message) && err.message.length < 400);
    }
  });
});

describe("options from hostile requests", () => {
  test("__proto__ and constructor as own keys (as JSON.parse makes them) are unknown options, not dropped", () => {
    assert.throws(() => parseCreateOptions("v", JSON.parse('{"__proto__":"x"}') as Record<string, string>), /unknown option "__proto__"/);
    assert.throws(() => parseCreateOptions("v", JSON.parse('{"size":"1G","constructor":"x"}') as Record<string, string>), /unknown option "constructor"/);
  });
  test("an option value over the cap is refused before it is parsed", () => {
    // parseSize's pattern is quadratic on runs of spaces: a megabyte of them would block for minutes.
    assert.throws(
      () => parseCreateOptions("v", { size: "1" + " ".repeat(1024 ** 2) + "x" }),
      new RegExp(`option size is ${1024 ** 2 + 2} characters long; the most is ${MAX_OPTION_VALUE_CHARS}`),
    );
  });
  test("a value that is not a string is refused, naming the option", () => {
    assert.throws(() => parseCreateOptions("v", { uid: 5 } as unknown as Record<string, string>), /option uid must be a string/);
  });
  test("repeated mount options are kept once", () => {
    assert.deepEqual(parseCreateOptions("v", { mountopts: "noatime,noatime,nodev,noatime" }).mountOptions, ["noatime", "nodev"]);
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
