/**
 * Crash sweeps for the volume manager: the N-th step of an operation (a pool call, a
 * command, a record write) is where the process dies; a fresh manager then starts over
 * the same records, pool and mount table. Whatever N, no volume is lost, hidden or half made.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { silentLogger } from "../../src/log.js";
import type { CloneOptions, Pool } from "../../src/pool/types.js";
import type { MountEntry } from "../../src/system/mount.js";
import type { RunOptions, Runner } from "../../src/system/runner.js";
import { VolumeManager } from "../../src/volumes/manager.js";
import { RecordStore, type VolumeRecord } from "../../src/volumes/records.js";
import { FakePool } from "../support/fake-pool.js";
import { FakeRunner, commandFailure } from "../support/fake-runner.js";

class Crash extends Error {
  override name = "Crash";
}

/** Counts steps and dies at step `at`; a dead process takes no further step. */
class Crasher {
  steps = 0;
  crashed = false;
  constructor(private readonly at: number) {}
  step(what: string): void {
    if (this.crashed) throw new Crash(`already dead: ${what}`);
    if (this.steps++ === this.at) {
      this.crashed = true;
      throw new Crash(`crash at step ${this.at}: ${what}`);
    }
  }
}

class CrashingPool implements Pool {
  readonly driver: Pool["driver"];
  constructor(
    private readonly inner: Pool,
    private readonly c: Crasher,
  ) {
    this.driver = inner.driver;
  }
  async open() {
    this.c.step("pool.open");
    return this.inner.open();
  }
  async close() {
    this.c.step("pool.close");
    return this.inner.close();
  }
  async list() {
    this.c.step("pool.list");
    return this.inner.list();
  }
  async create(name: string, sizeBytes: number) {
    this.c.step("pool.create");
    return this.inner.create(name, sizeBytes);
  }
  async clone(name: string, origin: string, options?: CloneOptions) {
    this.c.step("pool.clone");
    return this.inner.clone(name, origin, options);
  }
  async sizeOf(name: string) {
    this.c.step("pool.sizeOf");
    return this.inner.sizeOf(name);
  }
  async activate(name: string) {
    this.c.step("pool.activate");
    return this.inner.activate(name);
  }
  async attached() {
    this.c.step("pool.attached");
    return this.inner.attached();
  }
  async deactivate(name: string) {
    this.c.step("pool.deactivate");
    return this.inner.deactivate(name);
  }
  async remove(name: string) {
    this.c.step("pool.remove");
    return this.inner.remove(name);
  }
  async usage() {
    this.c.step("pool.usage");
    return this.inner.usage();
  }
  async allocatedBytes(name: string) {
    this.c.step("pool.allocatedBytes");
    return this.inner.allocatedBytes(name);
  }
  async resize(name: string, sizeBytes: number) {
    this.c.step("pool.resize");
    return this.inner.resize(name, sizeBytes);
  }
  async snapshot(volume: string, snapshot: string, options?: CloneOptions) {
    this.c.step("pool.snapshot");
    return this.inner.snapshot(volume, snapshot, options);
  }
  async snapshots() {
    this.c.step("pool.snapshots");
    return this.inner.snapshots();
  }
  async snapshotSizeOf(volume: string, snapshot: string) {
    this.c.step("pool.snapshotSizeOf");
    return this.inner.snapshotSizeOf(volume, snapshot);
  }
  async snapshotAllocatedBytes(volume: string, snapshot: string) {
    this.c.step("pool.snapshotAllocatedBytes");
    return this.inner.snapshotAllocatedBytes(volume, snapshot);
  }
  async removeSnapshot(volume: string, snapshot: string) {
    this.c.step("pool.removeSnapshot");
    return this.inner.removeSnapshot(volume, snapshot);
  }
  async rollback(volume: string, snapshot: string) {
    this.c.step("pool.rollback");
    return this.inner.rollback(volume, snapshot);
  }
  async grow(sizeBytes: number) {
    this.c.step("pool.grow");
    return this.inner.grow(sizeBytes);
  }
  async openSnapshot(volume: string, snapshot: string) {
    this.c.step("pool.openSnapshot");
    return this.inner.openSnapshot(volume, snapshot);
  }
  async changedRanges(volume: string, snapshot: string, since?: string) {
    this.c.step("pool.changedRanges");
    return this.inner.changedRanges(volume, snapshot, since);
  }
}

class CrashingRunner implements Runner {
  constructor(
    private readonly inner: Runner,
    private readonly c: Crasher,
  ) {}
  async run(command: string, args: readonly string[], options?: RunOptions) {
    this.c.step(command);
    return this.inner.run(command, args, options);
  }
}

class CrashingRecords extends RecordStore {
  constructor(
    dir: string,
    private readonly c: Crasher,
  ) {
    super(dir);
  }
  override async save(record: VolumeRecord) {
    this.c.step(`save ${record.name} ${record.state}`);
    return super.save(record);
  }
  override async delete(name: string) {
    this.c.step(`delete ${name}`);
    return super.delete(name);
  }
}

/** What outlives the plugin process: the record directory, the pool and the kernel's mount table. */
interface Host {
  dir: string;
  pool: FakePool;
  mounts: MountEntry[];
  runner: FakeRunner;
  /** Device path → the size its filesystem was made or grown to. */
  fsSizes: Map<string, number>;
  /** Whether the plugin may grow a mounted ext4 filesystem (CAP_SYS_RESOURCE). */
  online: boolean;
}

async function newHost(): Promise<Host> {
  const dir = await mkdtemp(join(tmpdir(), "thinvol-crash-"));
  const pool = new FakePool();
  const host: Host = { dir, pool, mounts: [], runner: new FakeRunner(), fsSizes: new Map(), online: true };
  const fsSizes = host.fsSizes;
  // Like the kernel: mkfs formats the device, mount needs an active device with a filesystem.
  host.runner = new FakeRunner((cmd, args) => {
    const last = args[args.length - 1] ?? "";
    if (cmd.startsWith("mkfs.")) pool.format(last);
    // The filesystem fills its device when made or grown: a device and a filesystem that disagree show here.
    if (cmd.startsWith("mkfs.") || cmd === "resize2fs") fsSizes.set(last, pool.volumeAt(last)?.size ?? 0);
    if (cmd === "mount") {
      const device = args[args.length - 2] ?? "";
      const v = pool.volumeAt(device);
      if (!v?.active) return commandFailure(`mount: ${last}: special device ${device} does not exist.`, 32);
      if (!v.formatted) return commandFailure(`mount: ${last}: wrong fs type, bad option, bad superblock on ${device}.`, 32);
      host.mounts.push({ device: "7:0", mountPoint: last, fsType: args[1] ?? "", source: device });
    }
    if (cmd === "umount") {
      if (!host.mounts.some((m) => m.mountPoint === last)) return commandFailure(`umount: ${last}: not mounted.`, 32);
      host.mounts = host.mounts.filter((m) => m.mountPoint !== last);
    }
    // Nothing is ever frozen here: the fake pool's clone needs no freeze.
    if (cmd === "fsfreeze") return commandFailure(`fsfreeze: ${last}: Invalid argument`);
    return "";
  });
  await new RecordStore(join(dir, "volumes")).init();
  return host;
}

function managerOn(host: Host, crasher?: Crasher): VolumeManager {
  const records = crasher ? new CrashingRecords(join(host.dir, "volumes"), crasher) : new RecordStore(join(host.dir, "volumes"));
  return new VolumeManager({
    pool: crasher ? new CrashingPool(host.pool, crasher) : host.pool,
    records,
    runner: crasher ? new CrashingRunner(host.runner, crasher) : host.runner,
    log: silentLogger,
    mountDir: join(host.dir, "mnt"),
    defaultSizeBytes: 64 * 1024 ** 2,
    defaultFs: "ext4",
    minFreePercent: 5,
    readMounts: async () => host.mounts,
    canGrowExt4Online: async () => host.online,
  });
}

const PRECIOUS = "rows a user committed";

interface Scenario {
  name: string;
  /** Brings the host to where the operation starts, with an uncrashable manager. */
  setup(m: VolumeManager, host: Host): Promise<void>;
  run(m: VolumeManager): Promise<unknown>;
  /** The volume the operation makes or removes, which may be there or not after a crash. */
  target: string;
  kind: "create" | "remove" | "other";
  /** What the target holds if a create of it completed. */
  targetData?: string;
  /** Checked once the operation ran to completion without a crash. */
  completed(m: VolumeManager, host: Host): Promise<void>;
  /** The operation is refused, without a crash. */
  refused?: RegExp;
  /** Data in the pool under this name that no record claims: it must outlive everything. */
  orphan?: string;
  /** What "base" may hold after a crash (default: what it held before). */
  baseData?: string[];
  /** Checks of the scenario's own, after any crash and the start-up. */
  check?(m: VolumeManager, host: Host, at: string): Promise<void>;
}

async function withBase(m: VolumeManager, host: Host, mountIds: string[] = []): Promise<void> {
  await m.create("base", null);
  const base = host.pool.volumes.get("base");
  assert.ok(base);
  base.data = PRECIOUS;
  for (const id of mountIds) await m.mount("base", id);
}

const ORPHAN_DATA = "an orphan's bytes";

const scenarios: Scenario[] = [
  {
    name: "create under a name the pool holds without a record",
    async setup(m, host) {
      await withBase(m, host);
      await host.pool.create("orphan", 64 * 1024 ** 2);
      Object.assign(host.pool.volumes.get("orphan") ?? {}, { formatted: true, data: ORPHAN_DATA });
    },
    run: (m) => m.create("orphan", null),
    target: "orphan",
    kind: "other",
    refused: /cannot create volume "orphan": the loop pool already holds data under that name/,
    orphan: "orphan",
    async completed(m) {
      assert.deepEqual((await m.list()).map((v) => v.name), ["base"]);
    },
  },
  {
    name: "create",
    setup: (m, host) => withBase(m, host),
    run: (m) => m.create("fresh", null),
    target: "fresh",
    kind: "create",
    targetData: "",
    async completed(m) {
      assert.ok((await m.list()).some((v) => v.name === "fresh"));
    },
  },
  {
    name: "clone with a mode (mounts to set up the root)",
    setup: (m, host) => withBase(m, host),
    run: (m) => m.create("copy", { from: "base", mode: "0750" }),
    target: "copy",
    kind: "create",
    targetData: PRECIOUS,
    async completed(m) {
      assert.ok((await m.list()).some((v) => v.name === "copy"));
    },
  },
  {
    name: "clone of a mounted volume",
    setup: (m, host) => withBase(m, host, ["c1"]),
    run: (m) => m.create("copy", { from: "base" }),
    target: "copy",
    kind: "create",
    targetData: PRECIOUS,
    async completed(m) {
      assert.equal((await m.get("copy")).status["origin"], "base");
    },
  },
  {
    name: "remove of a mounted volume",
    setup: (m, host) => withBase(m, host, ["c1"]),
    run: (m) => m.remove("base"),
    target: "base",
    kind: "remove",
    async completed(m, host) {
      assert.deepEqual(await m.list(), []);
      assert.deepEqual(await host.pool.list(), []);
    },
  },
  {
    name: "remove of an unmounted volume",
    setup: (m, host) => withBase(m, host),
    run: (m) => m.remove("base"),
    target: "base",
    kind: "remove",
    async completed(m, host) {
      assert.deepEqual(await m.list(), []);
      assert.deepEqual(await host.pool.list(), []);
    },
  },
  {
    name: "remove that the pool refuses (busy device)",
    async setup(m, host) {
      await withBase(m, host, ["c1"]);
      host.pool.failRemoveNext = "device busy";
    },
    run: (m) => m.remove("base"),
    target: "base",
    kind: "remove",
    refused: /cannot remove volume "base": device busy/,
    async completed(m) {
      assert.deepEqual((await m.list()).map((v) => v.name), ["base"]);
    },
  },
  {
    name: "first mount",
    setup: (m, host) => withBase(m, host),
    run: (m) => m.mount("base", "c2"),
    target: "base",
    kind: "other",
    async completed(m) {
      assert.equal((await m.get("base")).status["mounts"], 1);
      assert.ok(await m.path("base"));
    },
  },
  {
    name: "second mount ID on a mounted volume",
    setup: (m, host) => withBase(m, host, ["c1"]),
    run: (m) => m.mount("base", "c2"),
    target: "base",
    kind: "other",
    async completed(m) {
      assert.equal((await m.get("base")).status["mounts"], 2);
    },
  },
  {
    name: "unmount of the last reference",
    setup: (m, host) => withBase(m, host, ["c1"]),
    run: (m) => m.unmount("base", "c1"),
    target: "base",
    kind: "other",
    async completed(m, host) {
      assert.equal(await m.path("base"), undefined);
      assert.deepEqual(host.pool.active(), []);
    },
  },
  {
    name: "unmount of one of two references",
    setup: (m, host) => withBase(m, host, ["c1", "c1"]),
    run: (m) => m.unmount("base", "c1"),
    target: "base",
    kind: "other",
    async completed(m) {
      assert.equal((await m.get("base")).status["mounts"], 1);
      assert.ok(await m.path("base"));
    },
  },
  {
    name: "resize of a mounted volume",
    setup: (m, host) => withBase(m, host, ["c1"]),
    run: (m) => m.resize("base", 128 * 1024 ** 2),
    target: "base",
    kind: "other",
    async completed(m) {
      assert.equal((await m.volume("base")).sizeBytes, 128 * 1024 ** 2);
    },
  },
  {
    name: "resize of an unmounted volume",
    setup: (m, host) => withBase(m, host),
    run: (m) => m.resize("base", 128 * 1024 ** 2),
    target: "base",
    kind: "other",
    async completed(m) {
      assert.equal((await m.get("base")).status["sizeBytes"], 128 * 1024 ** 2);
    },
  },
  {
    name: "resize of an unmounted ext4 volume, offline (no CAP_SYS_RESOURCE)",
    async setup(m, host) {
      host.online = false;
      await withBase(m, host);
    },
    run: (m) => m.resize("base", 128 * 1024 ** 2),
    target: "base",
    kind: "other",
    async completed(m, host) {
      assert.equal((await m.volume("base")).sizeBytes, 128 * 1024 ** 2);
      assert.ok(host.runner.lines().includes("e2fsck -f -p /dev/fake/base"));
    },
  },
  {
    name: "snapshot of a mounted volume",
    setup: (m, host) => withBase(m, host, ["c1"]),
    run: (m) => m.createSnapshot("base", "s1"),
    target: "base",
    kind: "other",
    async completed(m, host) {
      assert.deepEqual((await m.volume("base")).snapshots, ["s1"]);
      assert.equal(host.pool.snaps.get("base@s1")?.data, PRECIOUS);
    },
  },
  {
    name: "snapshot remove",
    async setup(m, host) {
      await withBase(m, host);
      await m.createSnapshot("base", "s1");
    },
    run: (m) => m.removeSnapshot("base", "s1"),
    target: "base",
    kind: "other",
    async completed(m) {
      assert.deepEqual(await m.snapshots(), []);
    },
  },
  {
    name: "rollback to a snapshot",
    async setup(m, host) {
      await withBase(m, host);
      await m.createSnapshot("base", "s1");
      const base = host.pool.volumes.get("base");
      assert.ok(base);
      base.data = "written after the snapshot";
    },
    run: (m) => m.rollback("base", "s1"),
    target: "base",
    kind: "other",
    baseData: [PRECIOUS, "written after the snapshot"],
    async completed(_m, host) {
      assert.equal(host.pool.volumes.get("base")?.data, PRECIOUS);
    },
    async check(m) {
      assert.deepEqual((await m.volume("base")).snapshots, ["s1"], "the snapshot outlives the rollback");
    },
  },
  {
    name: "clone of a snapshot",
    async setup(m, host) {
      await withBase(m, host, ["c1"]);
      await m.createSnapshot("base", "s1");
      const base = host.pool.volumes.get("base");
      assert.ok(base);
      base.data = "written after the snapshot";
    },
    run: (m) => m.create("copy", { from: "base@s1" }),
    target: "copy",
    kind: "create",
    targetData: PRECIOUS,
    baseData: ["written after the snapshot"],
    async completed(m) {
      assert.equal((await m.get("copy")).status["origin"], "base@s1");
    },
  },
];

/** The invariants that hold after any crash and a start-up, with `m` the new manager. */
async function checkAfterRecovery(s: Scenario, m: VolumeManager, host: Host, at: string): Promise<void> {
  const records = new RecordStore(join(host.dir, "volumes"));
  const names = await records.names();
  for (const name of names) {
    assert.equal((await records.get(name))?.state, "ready", `${at}: the record of "${name}" is left in an intermediate state`);
  }
  if (s.orphan !== undefined) {
    assert.equal(host.pool.volumes.get(s.orphan)?.data, ORPHAN_DATA, `${at}: the orphan "${s.orphan}" lost its data`);
    assert.equal(names.includes(s.orphan), false, `${at}: the orphan "${s.orphan}" was given a record`);
  }
  const orphans = s.orphan !== undefined ? [s.orphan] : [];
  assert.deepEqual(await host.pool.list(), [...names, ...orphans].sort(), `${at}: the pool and the records disagree`);
  assert.deepEqual((await m.list()).map((v) => v.name), names, `${at}: a volume is hidden from List`);

  const present = new Set(names);
  if (s.kind !== "remove" || s.target !== "base") assert.ok(present.has("base"), `${at}: an acknowledged volume is lost`);
  if (s.kind === "create" && present.has(s.target)) {
    assert.equal(host.pool.volumes.get(s.target)?.data, s.targetData, `${at}: the new volume "${s.target}" is half made`);
  }

  const mounted = new Set(host.mounts.map((mt) => mt.mountPoint));
  for (const name of names) {
    const v = host.pool.volumes.get(name);
    assert.ok(v?.formatted, `${at}: "${name}" has no filesystem`);
    if (name === "base" && s.baseData) assert.ok(s.baseData.includes(v.data), `${at}: "base" holds ${JSON.stringify(v.data)}`);
    else if (name === "base" || (s.kind === "create" && s.targetData === PRECIOUS)) assert.equal(v.data, PRECIOUS, `${at}: the data of "${name}" changed`);
    const record = await records.get(name);
    assert.equal(record?.sizeBytes, v.size, `${at}: the record of "${name}" and its device disagree on its size`);
    assert.equal(host.fsSizes.get(`/dev/fake/${name}`) ?? v.size, v.size, `${at}: the filesystem of "${name}" does not fill its device`);
    assert.equal(record?.resizeTo, undefined, `${at}: a resize of "${name}" is left unfinished`);
    assert.equal(record?.rollbackTo, undefined, `${at}: a rollback of "${name}" is left unfinished`);
    const snaps = (record?.snapshots ?? []).map((x) => `${x.state}:${x.name}`);
    const inPool = ((await host.pool.snapshots()).get(name) ?? []).map((x) => `ready:${x}`);
    assert.deepEqual(snaps, inPool, `${at}: the snapshots of "${name}" in its record and in the pool disagree`);
    const info = await m.get(name);
    const isMounted = mounted.has(m.mountpointOf(name));
    assert.equal(info.mountpoint !== undefined, isMounted, `${at}: Get of "${name}" disagrees with the mount table`);
    assert.equal(Number(info.status["mounts"]) > 0, isMounted, `${at}: the references of "${name}" do not match its mount`);
  }
  await s.check?.(m, host, at);
  assert.deepEqual(
    host.pool.active().sort(),
    names.filter((n) => mounted.has(m.mountpointOf(n))),
    `${at}: a device is active that no mount uses, or the reverse`,
  );

  // Every volume there mounts and unmounts as a user would expect.
  for (const name of names) {
    const wasMounted = (await m.path(name)) !== undefined;
    const mp = await m.mount(name, "probe");
    assert.ok(host.mounts.some((mt) => mt.mountPoint === mp), `${at}: "${name}" did not mount`);
    await m.unmount(name, "probe");
    assert.equal((await m.path(name)) !== undefined, wasMounted, `${at}: "${name}" did not go back to how it was`);
  }
}

describe("a crash at any step, then a start-up, loses, hides and half-makes nothing", () => {
  for (const s of scenarios) {
    test(s.name, async () => {
      let completedAt: number | undefined;
      for (let n = 0; n < 100 && completedAt === undefined; n++) {
        const host = await newHost();
        try {
          await s.setup(managerOn(host), host);
          const crasher = new Crasher(n);
          try {
            await s.run(managerOn(host, crasher));
            assert.equal(s.refused, undefined, `step ${n}: ${s.name} was not refused`);
          } catch (err) {
            // Any other error must come from the crash itself, not from the operation.
            if (!crasher.crashed && s.refused !== undefined) assert.match(String(err), s.refused);
            else assert.ok(crasher.crashed, `step ${n}: the operation failed without a crash: ${String(err)}`);
          }
          const at = `crash at step ${n} of ${s.name}`;
          const restarted = managerOn(host);
          await restarted.recover();
          if (!crasher.crashed) {
            completedAt = n;
            if (process.env["THINVOL_CRASH_STEPS"]) console.log(`${s.name}: ${n} steps`);
            await s.completed(restarted, host);
          }
          await checkAfterRecovery(s, restarted, host, crasher.crashed ? at : `${s.name} without a crash`);
        } finally {
          await rm(host.dir, { recursive: true, force: true });
        }
      }
      assert.ok(completedAt !== undefined && completedAt > 0, `${s.name} did not complete within 100 steps`);
    });
  }
});
