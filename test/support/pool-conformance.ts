/**
 * The behaviour every pool driver must have, run against real block devices:
 * the loop driver on this machine (test/integration), dm-thin in the VM
 * (test/vm). A driver is handed in by a factory so each test gets a fresh pool.
 */
import assert from "node:assert/strict";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import type { Pool } from "../../src/pool/types.js";
import { deviceSizeBytes } from "../../src/system/blockdev.js";
import { formatFilesystem } from "../../src/system/filesystem.js";
import { mountDevice, readMounts, unmount } from "../../src/system/mount.js";
import { ExecaRunner } from "../../src/system/runner.js";
import { withMount } from "./kernel.js";

export interface PoolFactory {
  /** Short name used in test titles. */
  label: string;
  /** A pool over `dir` of `dataSizeBytes`, not yet opened. */
  make(dir: string, dataSizeBytes: number): Pool;
  /** Tears the pool down in the kernel as a host reboot would (files stay). */
  tearDown?(dir: string): Promise<void>;
  /** Leftover kernel objects (loop devices, dm devices) that mention `dir` or the pool; must be empty after cleanup. */
  leftovers(dir: string): Promise<string[]>;
}

const MiB = 1024 ** 2;
const runner = new ExecaRunner();

export function poolConformance(factory: PoolFactory): void {
  describe(`pool conformance: ${factory.label}`, () => {
    let dir: string;
    let pool: Pool;

    before(async () => {
      dir = await mkdtemp(join(process.env["THINVOL_TEST_TMP"] ?? tmpdir(), "thinvol-pool-"));
      pool = factory.make(join(dir, "pool"), 2048 * MiB);
      await mkdir(join(dir, "pool"), { recursive: true });
      await pool.open();
    });

    after(async () => {
      for (const name of await pool.list().catch(() => [])) await pool.remove(name).catch(() => undefined);
      await factory.tearDown?.(join(dir, "pool"));
      await rm(dir, { recursive: true, force: true });
    });

    test("a new volume is a block device of exactly the size asked for", async () => {
      await pool.create("sized", 96 * MiB);
      const dev = await pool.activate("sized");
      assert.equal(await deviceSizeBytes(runner, dev), 96 * MiB);
      assert.equal(await pool.sizeOf("sized"), 96 * MiB);
      assert.deepEqual(await pool.list().then((l) => l.includes("sized")), true);
      await pool.deactivate("sized");
    });

    test("activate is idempotent and returns the same device", async () => {
      await pool.create("twice", 32 * MiB);
      const a = await pool.activate("twice");
      const b = await pool.activate("twice");
      assert.equal(a, b);
      await pool.deactivate("twice");
      await pool.deactivate("twice");
    });

    test("data survives deactivate and activate", async () => {
      await pool.create("keep", 64 * MiB);
      let dev = await pool.activate("keep");
      await formatFilesystem(runner, dev, "ext4", "keep");
      await withMount(dev, dir, (m) => writeFile(join(m, "hello.txt"), "kept"));
      await pool.deactivate("keep");
      dev = await pool.activate("keep");
      assert.equal(await withMount(dev, dir, (m) => readFile(join(m, "hello.txt"), "utf8")), "kept");
      await pool.deactivate("keep");
    });

    test("space is used only as data is written", async () => {
      await pool.create("thin", 1024 * MiB);
      const before = await pool.allocatedBytes("thin");
      assert.ok(before < 8 * MiB, `a fresh 1 GiB volume holds ${before} bytes`);
      const dev = await pool.activate("thin");
      await formatFilesystem(runner, dev, "ext4", "thin");
      await withMount(dev, dir, (m) => writeFile(join(m, "blob"), Buffer.alloc(32 * MiB, 7)));
      const afterWrite = await pool.allocatedBytes("thin");
      assert.ok(afterWrite >= 32 * MiB, `after writing 32 MiB the volume holds ${afterWrite} bytes`);
      assert.ok(afterWrite < 200 * MiB, `after writing 32 MiB the volume holds ${afterWrite} bytes`);
      await pool.deactivate("thin");
    });

    test("a clone holds the origin's data and the two diverge on write", async () => {
      await pool.create("origin", 64 * MiB);
      const odev = await pool.activate("origin");
      await formatFilesystem(runner, odev, "ext4", "origin");
      await withMount(odev, dir, (m) => writeFile(join(m, "f"), "before"));
      await pool.deactivate("origin");
      await pool.clone("copy", "origin");
      assert.equal(await pool.sizeOf("copy"), 64 * MiB);
      const cdev = await pool.activate("copy");
      await withMount(cdev, dir, async (m) => {
        assert.equal(await readFile(join(m, "f"), "utf8"), "before");
        await writeFile(join(m, "f"), "changed in copy");
      });
      const odev2 = await pool.activate("origin");
      assert.equal(await withMount(odev2, dir, (m) => readFile(join(m, "f"), "utf8")), "before");
      await pool.deactivate("copy");
      await pool.deactivate("origin");
    });

    test("a clone of a mounted, written-to volume is a consistent copy", async () => {
      await pool.create("live", 64 * MiB);
      const dev = await pool.activate("live");
      await formatFilesystem(runner, dev, "ext4", "live");
      const mnt = join(dir, "live-mnt");
      await mkdir(mnt, { recursive: true });
      await mountDevice(runner, dev, mnt, "ext4", []);
      try {
        await writeFile(join(mnt, "a"), "at clone time");
        await pool.clone("live-copy", "live", { originMountpoint: mnt });
        await writeFile(join(mnt, "a"), "after the clone");
      } finally {
        await unmount(runner, mnt);
      }
      const cdev = await pool.activate("live-copy");
      const check = await runner.run("e2fsck", ["-f", "-n", cdev], { okExitCodes: [1, 4] });
      assert.equal(check.exitCode, 0, `fsck of the clone: ${check.stdout}${check.stderr}`);
      assert.equal(await withMount(cdev, dir, (m) => readFile(join(m, "a"), "utf8")), "at clone time");
      await pool.deactivate("live-copy");
      await pool.deactivate("live");
    });

    test("a frozen filesystem is not left frozen when a clone fails", async () => {
      await pool.create("frz", 32 * MiB);
      const dev = await pool.activate("frz");
      await formatFilesystem(runner, dev, "ext4", "frz");
      const mnt = join(dir, "frz-mnt");
      await mkdir(mnt, { recursive: true });
      await mountDevice(runner, dev, mnt, "ext4", []);
      try {
        await assert.rejects(pool.clone("frz-target", "no-such-origin", { originMountpoint: mnt }), /no-such-origin/);
        assert.equal((await pool.list()).includes("frz-target"), false);
        // A write to a frozen filesystem would block forever.
        await writeFile(join(mnt, "still-writable"), "yes");
      } finally {
        await unmount(runner, mnt);
      }
      await pool.deactivate("frz");
    });

    test("remove returns the space and is idempotent", async () => {
      await pool.create("gone", 128 * MiB);
      const dev = await pool.activate("gone");
      await formatFilesystem(runner, dev, "ext4", "gone");
      await withMount(dev, dir, (m) => writeFile(join(m, "blob"), Buffer.alloc(64 * MiB, 1)));
      const used = (await pool.usage()).dataUsedBytes;
      await pool.remove("gone");
      const after = (await pool.usage()).dataUsedBytes;
      assert.ok(used - after >= 60 * MiB, `removing 64 MiB of data freed only ${used - after} bytes`);
      assert.equal((await pool.list()).includes("gone"), false);
      await pool.remove("gone");
    });

    test("create refuses a name that exists", async () => {
      await pool.create("dup", 32 * MiB);
      await assert.rejects(pool.create("dup", 32 * MiB), /dup/);
    });

    test("a pool opened again finds every volume and its data", async () => {
      await pool.create("persist", 32 * MiB);
      const dev = await pool.activate("persist");
      await formatFilesystem(runner, dev, "ext4", "persist");
      await withMount(dev, dir, (m) => writeFile(join(m, "p"), "persisted"));
      await pool.deactivate("persist");
      await pool.close();
      await factory.tearDown?.(join(dir, "pool"));
      pool = factory.make(join(dir, "pool"), 2048 * MiB);
      await pool.open();
      assert.ok((await pool.list()).includes("persist"));
      const dev2 = await pool.activate("persist");
      assert.equal(await withMount(dev2, dir, (m) => readFile(join(m, "p"), "utf8")), "persisted");
      await pool.deactivate("persist");
    });

    test("nothing is left attached once every volume is removed", async () => {
      for (const name of await pool.list()) await pool.remove(name);
      assert.deepEqual(await pool.list(), []);
      await factory.tearDown?.(join(dir, "pool"));
      assert.deepEqual(await factory.leftovers(join(dir, "pool")), []);
      const stillMounted = (await readMounts()).filter((m) => m.mountPoint.startsWith(dir));
      assert.deepEqual(stillMounted, []);
      // The suite's after() opens nothing again; recreate for its cleanup.
      pool = factory.make(join(dir, "pool"), 2048 * MiB);
      await pool.open();
    });
  });
}
