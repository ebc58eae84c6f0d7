/**
 * Crash sweeps for the loop pool on real devices: each operation is cut short at every
 * command it runs (the process "dies": that command and every later one fail), then a new
 * pool is opened on the same files and does what the volume layer's start-up does. Nothing
 * else may be lost, the interrupted volume can be cleaned up, and the host space reserve is
 * whole again.
 */
import assert from "node:assert/strict";
import { mkdir, mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { silentLogger } from "../../src/log.js";
import { LoopPool } from "../../src/pool/loop.js";
import { formatFilesystem, thawFilesystem } from "../../src/system/filesystem.js";
import { mountDevice, unmount } from "../../src/system/mount.js";
import { allocateRange, fileExtents } from "../../src/system/extents.js";
import { ExecaRunner, type RunOptions, type RunResult, type Runner } from "../../src/system/runner.js";
import { loopDevicesUnder, tearDownPool, withMount } from "../support/kernel.js";

const MiB = 1024 ** 2;
const POOL_SIZE = 2048 * MiB;
const real = new ExecaRunner();

class Crash extends Error {
  override name = "Crash";
}

/** Runs commands until its budget is spent; from then on every command fails, as in a dead process. */
class CrashingRunner implements Runner {
  budget = Number.POSITIVE_INFINITY;
  crashed = false;
  async run(command: string, args: readonly string[], options?: RunOptions): Promise<RunResult> {
    if (this.budget <= 0) {
      this.crashed = true;
      throw new Crash(`crashed before ${command} ${args.join(" ")}`);
    }
    this.budget--;
    return real.run(command, args, options);
  }
}

interface Sweep {
  title: string;
  /** Makes what the operation needs, with the pool that is about to crash. */
  prepare?(pool: LoopPool, name: string): Promise<void>;
  operate(pool: LoopPool, name: string): Promise<void>;
}

describe("loop pool crash sweeps", () => {
  let dir: string;
  let poolDir: string;
  let baseMnt: string;
  let pool: LoopPool;
  let runner: CrashingRunner;

  const open = async () => {
    runner = new CrashingRunner();
    pool = new LoopPool({ runner, dir: poolDir, dataSizeBytes: POOL_SIZE, log: silentLogger });
    await pool.open();
  };

  before(async () => {
    dir = await mkdtemp(join(process.env["THINVOL_TEST_TMP"] ?? tmpdir(), "thinvol-crash-"));
    poolDir = join(dir, "pool");
    baseMnt = join(dir, "base");
    await mkdir(poolDir);
    await mkdir(baseMnt);
    await open();
    await pool.create("base", 64 * MiB);
    const dev = await pool.activate("base");
    await formatFilesystem(real, dev, "ext4", "base");
    await mountDevice(real, dev, baseMnt, "ext4", []);
    await writeFile(join(baseMnt, "kept"), "acknowledged before every crash");
  });

  after(async () => {
    await unmount(real, baseMnt).catch(() => undefined);
    await tearDownPool(poolDir);
    await rm(dir, { recursive: true, force: true });
  });

  /** After the crash: a new process opens the pool and does what the volume layer's start-up does. */
  async function restartAndCheck(name: string, label: string): Promise<void> {
    await pool.close().catch(() => undefined); // the dead process's watcher stops; its commands fail
    // A clone cut short can leave the origin frozen; the volume layer thaws it at start-up.
    await thawFilesystem(real, baseMnt).catch(() => undefined);
    await open();
    assert.equal(await readFile(join(baseMnt, "kept"), "utf8"), "acknowledged before every crash", `${label}: the mounted volume's data`);
    await writeFile(join(baseMnt, "written-after"), label); // would hang on a frozen filesystem
    // The volume layer undoes an interrupted create or clone and finishes an interrupted remove alike.
    await pool.remove(name);
    assert.equal((await pool.list()).includes(name), false, `${label}: the volume is gone after the start-up's cleanup`);
    assert.deepEqual(
      (await loopDevicesUnder(poolDir)).filter((l) => !/pool\.img$|base\.img$/.test(l)),
      [],
      `${label}: no loop device is left for the volume`,
    );
    // The reserve: the host backs no more than the pool can use (all of it but the balloon),
    // and the headroom is back.
    const [file, balloon] = await Promise.all([stat(join(poolDir, "pool.img")), stat(join(poolDir, "mnt", "reserve.balloon"))]);
    const usable = file.size - balloon.size;
    assert.ok(file.blocks * 512 <= usable + 48 * MiB, `${label}: the host backs ${file.blocks * 512} bytes of a pool that can use ${usable}`);
    const usage = await pool.usage();
    assert.ok(usage.dataTotalBytes - usage.dataUsedBytes > 1024 * MiB, `${label}: the pool's free space is still counted as free`);
  }

  const sweeps: Sweep[] = [
    { title: "create", operate: (p, name) => p.create(name, 64 * MiB) },
    { title: "clone of a mounted volume", operate: (p, name) => p.clone(name, "base", { originMountpoint: baseMnt }) },
    {
      title: "remove of a volume holding data",
      async prepare(p, name) {
        await p.create(name, 96 * MiB);
        const dev = await p.activate(name);
        await formatFilesystem(real, dev, "ext4", name);
        await withMount(dev, dir, (m) => writeFile(join(m, "blob"), Buffer.alloc(48 * MiB, 9)));
      },
      operate: (p, name) => p.remove(name),
    },
    {
      title: "deactivate of a volume that was written to",
      async prepare(p, name) {
        await p.create(name, 96 * MiB);
        const dev = await p.activate(name);
        await formatFilesystem(real, dev, "ext4", name);
        await withMount(dev, dir, (m) => writeFile(join(m, "blob"), Buffer.alloc(32 * MiB, 5)));
      },
      operate: (p, name) => p.deactivate(name),
    },
  ];

  for (const sweep of sweeps) {
    test(`${sweep.title}: a crash at every command, then start-up`, async () => {
      let completed = false;
      for (let k = 0; k < 40 && !completed; k++) {
        const name = `${sweep.title.split(" ")[0]}${k}`;
        await sweep.prepare?.(pool, name);
        runner.budget = k;
        try {
          await sweep.operate(pool, name);
          completed = !runner.crashed;
        } catch (err) {
          if (!runner.crashed) throw err;
        }
        await restartAndCheck(name, `${sweep.title}, crash before command ${k}`);
      }
      assert.ok(completed, `${sweep.title} never ran to its end`);
    });
  }

  test("a crash after the host backed more of the pool but before the balloon was cut short holds no host space after the restart", async () => {
    // What the process had done when it died: the balloon's last 256 MiB backed on the host.
    const balloon = join(poolDir, "mnt", "reserve.balloon");
    const poolFile = join(poolDir, "pool.img");
    const before = (await stat(poolFile)).blocks * 512;
    const size = (await stat(balloon)).size;
    for (const e of await fileExtents(real, balloon, { offset: size - 256 * MiB, length: 256 * MiB })) {
      await allocateRange(real, poolFile, { offset: e.deviceOffset, length: e.length });
    }
    assert.ok((await stat(poolFile)).blocks * 512 >= before + 255 * MiB);
    await pool.close();
    await open();
    const after = (await stat(poolFile)).blocks * 512;
    assert.ok(after <= before + 16 * MiB, `the host still backs ${after - before} more bytes than before the crash`);
  });
});
