import assert from "node:assert/strict";
import { after, describe, test } from "node:test";
import type { DmThinPool } from "../../src/pool/dmthin/index.js";
import { BLOCK, GiB, cleanupFixtures, dmThinFixture, type Backing, type DmThinFixture } from "../support/dmthin-fixture.js";

/*
 * Every crash point of every pool-wide operation: the simulated kernel stops the
 * process at the n-th command (before or after the command takes effect); a new
 * driver then opens the same directory. Whatever the point, the reopened pool
 * must hold exactly the thin ids its state knows, agree on the transaction id,
 * have nothing left suspended, have lost no volume that existed before, and work.
 */

after(cleanupFixtures);

interface Scenario {
  name: string;
  /** Start from a directory with no pool (the operation is the first open). */
  fresh?: boolean;
  /** Only for a pool on a data file (growth). */
  fileOnly?: boolean;
  prepare(f: DmThinFixture): Promise<void>;
  run(pool: DmThinPool, f: DmThinFixture): Promise<void>;
  /** The fewest commands the operation runs (default 3). */
  minPoints?: number;
  /** Volumes that must exist after recovery, whatever the crash point. */
  survivors: string[];
  /** Checks the operation's own volume after recovery (`crashed`: the process died, rather than a command failing). */
  check(f: DmThinFixture, pool: DmThinPool, crashed: boolean): Promise<void>;
}

async function withData(f: DmThinFixture, name: string, blocks: number, keepActive: boolean): Promise<void> {
  await f.pool.create(name, GiB);
  await f.pool.activate(name);
  f.kernel.write(`thinvol-${name}`, 0, blocks * BLOCK);
  if (!keepActive) await f.pool.deactivate(name);
}

const scenarios: Scenario[] = [
  {
    name: "first open",
    fresh: true,
    prepare: async () => {},
    run: (pool) => pool.open(),
    survivors: [],
    check: async (f, pool) => {
      assert.equal((await pool.usage()).dataTotalBytes, GiB);
      void f;
    },
  },
  {
    name: "create",
    prepare: (f) => withData(f, "keep", 3, true),
    run: (pool) => pool.create("db", 2 * GiB),
    survivors: ["keep"],
    check: async (f, pool) => {
      if ((await pool.list()).includes("db")) {
        assert.equal(await pool.sizeOf("db"), 2 * GiB);
        assert.equal(await pool.activate("db"), "/dev/mapper/thinvol-db");
      } else {
        await pool.create("db", 2 * GiB); // the user retries
      }
      void f;
    },
  },
  ...[true, false].map(
    (active): Scenario => ({
      name: `clone of an ${active ? "active, mounted" : "inactive"} origin`,
      prepare: async (f) => {
        await withData(f, "db", 4, active);
        if (active) f.kernel.hold("thinvol-db");
      },
      run: (pool) => pool.clone("copy", "db"),
      survivors: ["db"],
      check: async (f, pool) => {
        if (!(await pool.list()).includes("copy")) await pool.clone("copy", "db");
        const s = await f.state();
        const origin = f.kernel.mappedDataBlocks(f.metaFile, s.volumes["db"]?.id ?? -1);
        assert.equal(origin.length, 4, "the origin's data is intact");
        assert.deepEqual(f.kernel.mappedDataBlocks(f.metaFile, s.volumes["copy"]?.id ?? -1), origin, "the clone has the origin's data");
        assert.equal(await pool.sizeOf("copy"), GiB);
      },
    }),
  ),
  ...[true, false].map(
    (active): Scenario => ({
      name: `remove of an ${active ? "active" : "inactive"} volume`,
      prepare: async (f) => {
        await withData(f, "keep", 2, false);
        await withData(f, "db", 5, active);
      },
      run: (pool) => pool.remove("db"),
      survivors: ["keep"],
      check: async (f, pool, crashed) => {
        // The intent is journalled before the first command, so recovery always finishes the delete.
        // A failed command before the delete message leaves the volume, and the user retries.
        if (!crashed) await pool.remove("db");
        assert.ok(!(await pool.list()).includes("db"));
        assert.equal(f.kernel.device("thinvol-db"), undefined);
      },
    }),
  ),
  ...[true, false].map(
    (active): Scenario => ({
      name: `resize of an ${active ? "active, mounted" : "inactive"} volume`,
      prepare: async (f) => {
        await withData(f, "db", 3, active);
        if (active) f.kernel.hold("thinvol-db");
      },
      run: (pool) => pool.resize("db", 2 * GiB),
      // Inactive: only the look at the device name, before and after the journal is written.
      minPoints: active ? 5 : 2,
      survivors: ["db"],
      check: async (f, pool) => {
        const deviceAgrees = async () => {
          const t = f.kernel.device("thinvol-db")?.live;
          if (!active) return assert.equal(t, undefined);
          assert.ok(t?.kind === "thin", "the device is still there");
          assert.equal(t.length * 512, await pool.sizeOf("db"), "device and state agree on the size");
          assert.equal(f.kernel.device("thinvol-db")?.openCount, 1, "still mounted");
        };
        const size = await pool.sizeOf("db");
        assert.ok(size === GiB || size === 2 * GiB, `the old size or the new one, not ${size}`);
        await deviceAgrees();
        if (size !== 2 * GiB) await pool.resize("db", 2 * GiB); // the user retries
        assert.equal(await pool.sizeOf("db"), 2 * GiB);
        await deviceAgrees();
        assert.equal((await f.blocksOf("db")).length, 3, "the data is intact");
      },
    }),
  ),
  ...[true, false].map(
    (active): Scenario => ({
      name: `snapshot of an ${active ? "active, mounted" : "inactive"} volume`,
      prepare: async (f) => {
        await withData(f, "db", 4, active);
        if (active) f.kernel.hold("thinvol-db");
      },
      run: (pool) => pool.snapshot("db", "s1"),
      survivors: ["db"],
      check: async (f, pool) => {
        if (!(await pool.snapshots()).has("db")) await pool.snapshot("db", "s1");
        assert.deepEqual(await pool.snapshots(), new Map([["db", ["s1"]]]));
        assert.equal((await f.blocksOf("db")).length, 4, "the volume's data is intact");
        assert.deepEqual(await f.blocksOf("db@s1"), await f.blocksOf("db"), "the snapshot has the volume's data");
        assert.equal(await pool.snapshotSizeOf("db", "s1"), GiB);
      },
    }),
  ),
  {
    name: "snapshot removal",
    prepare: async (f) => {
      await withData(f, "db", 4, true);
      await f.pool.snapshot("db", "s1");
      f.kernel.write("thinvol-db", 0, 2 * BLOCK);
      await f.pool.deactivate("db");
    },
    run: (pool) => pool.removeSnapshot("db", "s1"),
    minPoints: 2, // delete, set_transaction_id
    survivors: ["db"],
    check: async (f, pool, crashed) => {
      // Journalled before its first command: recovery always finishes it.
      if (!crashed) await pool.removeSnapshot("db", "s1");
      assert.deepEqual(await pool.snapshots(), new Map());
      assert.equal((await f.blocksOf("db")).length, 4, "the volume's data is intact");
      assert.equal((await pool.usage()).dataUsedBytes, 4 * BLOCK, "the snapshot's own blocks are freed");
    },
  },
  {
    name: "rollback",
    prepare: async (f) => {
      await withData(f, "db", 4, true);
      await f.pool.snapshot("db", "s1");
      f.kernel.write("thinvol-db", 0, 6 * BLOCK);
      await f.pool.resize("db", 2 * GiB);
      await f.pool.deactivate("db");
    },
    run: (pool) => pool.rollback("db", "s1"),
    survivors: ["db"],
    check: async (f, pool) => {
      const snap = await f.blocksOf("db@s1");
      const now = await f.blocksOf("db");
      if (now.join() !== snap.join()) {
        assert.equal(now.length, 6, "not rolled back: the old data is intact");
        assert.equal(await pool.sizeOf("db"), 2 * GiB, "and its size");
        await pool.rollback("db", "s1"); // the user retries
      }
      assert.deepEqual(await f.blocksOf("db"), snap, "the snapshot's data");
      assert.equal(await pool.sizeOf("db"), GiB, "the snapshot's size");
      assert.deepEqual(await pool.snapshots(), new Map([["db", ["s1"]]]), "the snapshot stays");
      assert.equal((await pool.usage()).dataUsedBytes, 4 * BLOCK, "the old data is freed");
    },
  },
  {
    name: "clone from a snapshot of a mounted volume",
    prepare: async (f) => {
      await withData(f, "db", 3, true);
      f.kernel.hold("thinvol-db");
      await f.pool.snapshot("db", "s1");
      f.kernel.write("thinvol-db", 0, 5 * BLOCK);
    },
    run: (pool) => pool.clone("copy", "db", { snapshot: "s1" }),
    survivors: ["db"],
    check: async (f, pool) => {
      if (!(await pool.list()).includes("copy")) await pool.clone("copy", "db", { snapshot: "s1" });
      assert.deepEqual(await f.blocksOf("copy"), await f.blocksOf("db@s1"), "the clone has the snapshot's data");
      assert.equal((await f.blocksOf("db")).length, 5, "the volume's data is intact");
      assert.equal(await pool.sizeOf("copy"), GiB);
    },
  },
  {
    name: "pool grow at run time",
    prepare: async (f) => {
      await withData(f, "keep", 2, true);
      f.kernel.hold("thinvol-keep");
      if (f.disk) f.kernel.disk(f.disk).sizeBytes = 3 * GiB;
    },
    run: (pool) => pool.grow(3 * GiB),
    survivors: ["keep"],
    check: async (f, pool) => {
      // Reopened with the old POOL_SIZE: the grown maximum is kept, or the grow never happened.
      const total = (await pool.usage()).dataTotalBytes;
      assert.ok(total === GiB || total === 3 * GiB, `the old maximum or the new one, not ${total}`);
      if (total !== 3 * GiB) await pool.grow(3 * GiB);
      assert.equal((await pool.usage()).dataTotalBytes, 3 * GiB);
      if (f.disk) assert.equal(f.kernel.device("thinvol-pool")?.live?.length, (3 * GiB) / 512, "the pool takes the device's new space");
      assert.equal(f.kernel.device("thinvol-keep")?.openCount, 1, "the mounted volume is undisturbed");
    },
  },
  {
    name: "grow",
    fileOnly: true,
    prepare: (f) => withData(f, "keep", 2, true),
    run: async (_pool, f) => {
      await f.newPool({ dataSizeBytes: 3 * GiB }).open();
    },
    survivors: ["keep"],
    check: async (f) => {
      const grown = await f.reopen({ dataSizeBytes: 3 * GiB });
      assert.equal((await grown.usage()).dataTotalBytes, 3 * GiB);
    },
  },
];

async function assertConsistent(f: DmThinFixture, pool: DmThinPool, s: Scenario, where: string): Promise<void> {
  const state = await f.state();
  assert.equal(state.pending, undefined, `${where}: journal cleared`);
  const ids = await f.ids();
  assert.deepEqual(ids.kernel, ids.state, `${where}: the pool holds exactly the thin ids the state knows`);
  assert.equal(f.kernel.transactionId(f.metaFile), state.transactionId, `${where}: transaction ids agree`);
  assert.deepEqual(f.kernel.suspendedDevices(), [], `${where}: nothing left suspended`);
  const names = await pool.list();
  for (const v of s.survivors) assert.ok(names.includes(v), `${where}: volume ${v} survived`);
}

/** The same sweeps on a pool whose data is a 1 GiB disk (POOL_DEVICE). */
const backings: [string, Backing][] = [
  ["", "file"],
  [" (data on a device)", { disk: GiB }],
];

async function sweep(s: Scenario, mode: "before" | "after" | "fail", backing: Backing): Promise<number> {
  let points = 0;
  for (let k = 1; k < 200; k++) {
    const f = await dmThinFixture({ open: !s.fresh, backing });
    await s.prepare(f);
    const where = `${s.name}, ${mode} command ${k}`;
    if (mode === "fail") {
      f.kernel.failAt(k, "device-mapper: message ioctl on thinvol-pool  failed: Input/output error");
      const before = f.kernel.log.length;
      await s.run(f.pool, f).catch(() => undefined);
      if (f.kernel.log.length - before < k) return points; // every command has been failed once
      // The same process carries on (open again if the failure stopped the first open).
      const pool = s.fresh || s.name === "grow" ? await f.reopen() : f.pool;
      await pool.create("probe", GiB); // settles anything left over
      await assertConsistent(f, pool, s, where);
      await s.check(f, pool, false);
    } else {
      const crashed = f.kernel.crashAt(k, { when: mode }).then(() => "crashed" as const);
      const done = s.run(f.pool, f).then(
        () => "done" as const,
        (err: unknown) => err,
      );
      const outcome = await Promise.race([crashed, done]);
      if (outcome === "done") return points;
      assert.equal(outcome, "crashed", `${where}: the operation failed instead: ${String(outcome)}`);
      f.kernel.revive();
      const pool = await f.reopen();
      await assertConsistent(f, pool, s, where);
      await s.check(f, pool, true);
      // The pool still works after recovery.
      await pool.create("after-crash", GiB);
      await assertConsistent(f, pool, s, `${where}, then a create`);
    }
    points++;
  }
  throw new Error(`${s.name}: did not finish in 200 commands`);
}

for (const [suffix, backing] of backings) {
  for (const s of scenarios.filter((s) => backing === "file" || !s.fileOnly)) {
    describe(`crash during ${s.name}${suffix}`, () => {
      for (const mode of ["before", "after", "fail"] as const) {
        const label =
          mode === "fail" ? "each command failing once leaves a consistent pool" : `a crash ${mode} each command is recovered by the next open`;
        test(label, async () => {
          const points = await sweep(s, mode, backing);
          assert.ok(points >= (s.minPoints ?? 3), `only ${points} points exercised`);
        });
      }
    });
  }
}

describe("crash recovery rules", () => {
  test("crash after create_thin but before the state is saved: the thin id is deleted, nothing leaks", async () => {
    const f = await dmThinFixture();
    const crashed = f.kernel.crashWhen(/create_thin/, { when: "after" });
    void f.pool.create("db", GiB);
    await crashed;
    assert.equal(f.kernel.thinIds(f.metaFile).length, 1, "the kernel made the thin id");
    f.kernel.revive();
    const pool = await f.reopen();
    assert.deepEqual(await pool.list(), []);
    assert.deepEqual(f.kernel.thinIds(f.metaFile), []);
    assert.ok(f.logs.some((l) => /rolled back an interrupted create/.test(l) && l.includes("volume=db")));
  });

  test("crash after set_transaction_id but before the state is saved: the volume is kept", async () => {
    const f = await dmThinFixture();
    const crashed = f.kernel.crashWhen(/set_transaction_id/, { when: "after" });
    void f.pool.create("db", GiB);
    await crashed;
    f.kernel.revive();
    const pool = await f.reopen();
    assert.deepEqual(await pool.list(), ["db"]);
    assert.equal(await pool.sizeOf("db"), GiB);
    assert.ok(f.logs.some((l) => /completed an interrupted create/.test(l)));
  });

  test("crash while a clone's origin is suspended: open resumes it, so its filesystem is not left frozen", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await f.pool.activate("db");
    f.kernel.hold("thinvol-db");
    const crashed = f.kernel.crashWhen(/^dmsetup suspend/, { when: "after" });
    void f.pool.clone("copy", "db");
    await crashed;
    assert.deepEqual(f.kernel.suspendedDevices(), ["thinvol-db"]);
    f.kernel.revive();
    const pool = await f.reopen();
    assert.deepEqual(f.kernel.suspendedDevices(), []);
    assert.deepEqual(await pool.list(), ["db"]);
  });

  test("crash during a delete: open finishes it", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    const crashed = f.kernel.crashWhen(/^dmsetup message thinvol-pool 0 delete/, { when: "before" });
    void f.pool.remove("db");
    await crashed;
    f.kernel.revive();
    const pool = await f.reopen();
    assert.deepEqual(await pool.list(), []);
    assert.deepEqual(f.kernel.thinIds(f.metaFile), []);
    assert.ok(f.logs.some((l) => /completed an interrupted remove/.test(l)));
  });

  test("an interrupted delete of a volume that is now mounted keeps the volume", async () => {
    const f = await dmThinFixture();
    await f.pool.create("db", GiB);
    await f.pool.activate("db");
    const crashed = f.kernel.crashWhen(/^dmsetup remove .*thinvol-db$/, { when: "before" });
    void f.pool.remove("db");
    await crashed;
    f.kernel.revive();
    f.kernel.hold("thinvol-db"); // mounted again before the plugin came back
    const pool = await f.reopen();
    assert.deepEqual(await pool.list(), ["db"]);
    assert.equal((await f.state()).pending, undefined);
  });
});
