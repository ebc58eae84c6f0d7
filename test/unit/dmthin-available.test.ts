import assert from "node:assert/strict";
import { mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { createLogger } from "../../src/log.js";
import { dmThinAvailable } from "../../src/pool/dmthin/index.js";
import { FakeDmKernel } from "../support/fake-dm-kernel.js";
import { FakeRunner } from "../support/fake-runner.js";

const dirs: string[] = [];
after(() => Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true }))));

async function probeDir(): Promise<string> {
  const d = await mkdtemp(join(tmpdir(), "thinvol-probe-test-"));
  dirs.push(d);
  return d;
}

function logger(): { lines: string[]; log: ReturnType<typeof createLogger> } {
  const lines: string[] = [];
  return { lines, log: createLogger("debug", (l) => lines.push(l)) };
}

describe("dmThinAvailable", () => {
  test("a kernel without device-mapper: false, and says why", async () => {
    const k = new FakeDmKernel();
    k.deviceMapper = false;
    const { lines, log } = logger();
    assert.equal(await dmThinAvailable(k.runner, log, await probeDir()), false);
    assert.ok(lines.some((l) => /no device-mapper/.test(l)));
  });

  test("thin-pool listed: true without probing", async () => {
    const k = new FakeDmKernel();
    assert.equal(await dmThinAvailable(k.runner, logger().log, await probeDir()), true);
    assert.ok(!k.log.some((c) => c.startsWith("losetup")));
  });

  test("thin-pool not loaded yet and no modprobe: a throwaway pool loads it, and nothing is left behind", async () => {
    const k = new FakeDmKernel();
    k.thinPoolLoaded = false;
    const dir = await probeDir();
    assert.equal(await dmThinAvailable(k.runner, logger().log, dir), true);
    assert.ok(k.log.some((c) => c.startsWith("dmsetup create thinvol-probe-")));
    assert.equal(k.devices.size, 0, "probe pool removed");
    assert.equal(k.loops.size, 0, "probe loop devices detached");
    assert.deepEqual(await readdir(dir), [], "probe files removed");
  });

  test("modprobe that works is enough", async () => {
    const k = new FakeDmKernel();
    k.thinPoolLoaded = false;
    k.modprobeWorks = true;
    assert.equal(await dmThinAvailable(k.runner, logger().log, await probeDir()), true);
    assert.ok(!k.log.some((c) => c.startsWith("losetup")));
  });

  test("device-mapper without dm-thin at all: false, and the probe cleans up", async () => {
    const k = new FakeDmKernel();
    k.thinPoolLoaded = false;
    const { lines, log } = logger();
    k.thinPoolModuleExists = false;
    const dir = await probeDir();
    assert.equal(await dmThinAvailable(k.runner, log, dir), false);
    assert.ok(lines.some((l) => /no thin-pool target/.test(l)));
    assert.equal(k.loops.size, 0);
    assert.deepEqual(await readdir(dir), []);
  });

  test("never throws, even when every command fails", async () => {
    const runner = new FakeRunner(() => new Error("spawn dmsetup ENOENT"));
    assert.equal(await dmThinAvailable(runner, logger().log, await probeDir()), false);
  });
});
