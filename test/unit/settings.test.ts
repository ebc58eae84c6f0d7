import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { SettingsError, loadSettings } from "../../src/settings.js";

describe("settings: POOL_DEVICE", () => {
  test("unset or empty: the pool's data stays in a file", () => {
    assert.equal(loadSettings({}).POOL_DEVICE, "");
    assert.equal(loadSettings({ POOL_DEVICE: "  " }).POOL_DEVICE, "");
  });

  test("an absolute path is taken as given, with dm-thin or auto", () => {
    for (const path of ["/dev/sdb", "/dev/disk/by-id/nvme-Samsung_SSD_980_1TB_S64ANS0T123456", "/dev/mapper/vg0-thinvol", `/${"d".repeat(4095)}`]) {
      assert.equal(loadSettings({ POOL_DEVICE: path }).POOL_DEVICE, path);
      assert.equal(loadSettings({ POOL_DEVICE: path, POOL_DRIVER: "dm-thin" }).POOL_DEVICE, path);
    }
  });

  for (const [what, value, says] of [
    ["a relative path", "sdb", /POOL_DEVICE="sdb": POOL_DEVICE must be an absolute path/],
    ["a path with a newline inside", "/dev/sdb\n/etc/passwd", /POOL_DEVICE="\/dev\/sdb\\n\/etc\/passwd": POOL_DEVICE must not contain control characters/],
    ["a NUL byte", "/dev/sd\0b", /must not contain control characters/],
    ["an escape sequence", "/dev/\x1b[2Jsdb", /must not contain control characters/],
    ["DEL", "/dev/sdb\x7f", /must not contain control characters/],
    ["a path over 4096 characters, quoted capped", `/${"a".repeat(5000)}`, /POOL_DEVICE="\/a{99}…" \(5001 characters\): POOL_DEVICE must be at most 4096 characters$/],
  ] as const) {
    test(`${what} is refused with an error naming POOL_DEVICE`, () => {
      assert.throws(() => loadSettings({ POOL_DEVICE: value }), (err: Error) => {
        assert.ok(err instanceof SettingsError);
        assert.match(err.message, says);
        return true;
      });
    });
  }

  test("with POOL_DRIVER=loop it is refused: the loop driver keeps its pool in a file", () => {
    assert.throws(() => loadSettings({ POOL_DEVICE: "/dev/sdb", POOL_DRIVER: "loop" }), /POOL_DEVICE="\/dev\/sdb": POOL_DEVICE needs the dm-thin driver: set POOL_DRIVER=dm-thin or auto, or unset POOL_DEVICE/);
    assert.equal(loadSettings({ POOL_DEVICE: "", POOL_DRIVER: "loop" }).POOL_DRIVER, "loop");
  });
});
