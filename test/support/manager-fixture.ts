import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { silentLogger } from "../../src/log.js";
import type { MountEntry } from "../../src/system/mount.js";
import { VolumeManager } from "../../src/volumes/manager.js";
import { RecordStore } from "../../src/volumes/records.js";
import { FakePool } from "./fake-pool.js";
import { FakeRunner } from "./fake-runner.js";

/**
 * A VolumeManager over a fake pool, a fake runner whose mount and umount change a fake mount
 * table, and records in a temporary directory: the volume layer as it runs, without a kernel.
 */
export interface ManagerFixture {
  dir: string;
  pool: FakePool;
  records: RecordStore;
  runner: FakeRunner;
  mounts: MountEntry[];
  /** Whether the plugin holds CAP_SYS_RESOURCE, which growing a mounted ext4 filesystem needs. */
  online: boolean;
  manager: VolumeManager;
  cleanup(): Promise<void>;
}

export async function managerFixture(o: { defaultSizeBytes: number; minFreePercent: number }): Promise<ManagerFixture> {
  const dir = await mkdtemp(join(tmpdir(), "thinvol-manager-"));
  const records = new RecordStore(join(dir, "volumes"));
  await records.init();
  const f = { dir, pool: new FakePool(), records, mounts: [] as MountEntry[], online: true } as ManagerFixture;
  f.runner = new FakeRunner(async (cmd, args) => {
    const target = args[args.length - 1] ?? "";
    if (cmd === "mount") {
      f.mounts.push({ device: "7:0", mountPoint: target, fsType: args[1] ?? "", source: args[args.length - 2] ?? "" });
      await mkdir(join(target, "lost+found"), { recursive: true });
    }
    if (cmd === "umount") f.mounts = f.mounts.filter((x) => x.mountPoint !== target);
    return "";
  });
  f.manager = new VolumeManager({
    pool: f.pool,
    records,
    runner: f.runner,
    log: silentLogger,
    mountDir: join(dir, "mnt"),
    defaultSizeBytes: o.defaultSizeBytes,
    defaultFs: "ext4",
    minFreePercent: o.minFreePercent,
    readMounts: async () => f.mounts,
    canGrowExt4Online: async () => f.online,
  });
  f.cleanup = () => rm(dir, { recursive: true, force: true });
  return f;
}
