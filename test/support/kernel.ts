import { mkdtemp, rm } from "node:fs/promises";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import type { FsType } from "../../src/system/filesystem.js";
import { mountDevice, readMounts, unmount } from "../../src/system/mount.js";
import { ExecaRunner } from "../../src/system/runner.js";

const runner = new ExecaRunner();

/** Loop devices whose backing file lies under `dir`, as "device file" lines. */
export async function loopDevicesUnder(dir: string): Promise<string[]> {
  const { stdout } = await runner.run("losetup", ["--list", "--noheadings", "--raw", "--output", "NAME,BACK-FILE"]);
  return stdout
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => {
      const file = l.split(" ")[1] ?? "";
      return l !== "" && (file === dir || file.startsWith(dir + "/"));
    });
}

/** Mount points under `dir`. */
export async function mountsUnder(dir: string): Promise<string[]> {
  return (await readMounts()).map((m) => m.mountPoint).filter((m) => m === dir || m.startsWith(dir + "/"));
}

/** Device-mapper devices whose names start with `prefix` (none where the kernel has no device-mapper). */
export async function dmDevicesNamed(prefix: string): Promise<string[]> {
  const result = await runner.run("dmsetup", ["ls"], { okExitCodes: [1] }).catch(() => ({ stdout: "" }));
  return result.stdout
    .split("\n")
    .map((l) => l.split(/\s+/)[0] ?? "")
    .filter((n) => n.startsWith(prefix));
}

/**
 * What a host reboot does to a pool whose files lie under `dir`: unmount everything under
 * it, remove its device-mapper devices (`dmPrefix`, thin volumes before the pool) and
 * detach its loop devices.
 */
export async function tearDownPool(dir: string, dmPrefix?: string): Promise<void> {
  // Listed before the unmounts: a volume image's path can no longer be shown once the pool is unmounted.
  const devices = (await loopDevicesUnder(dir)).map((l) => l.split(" ")[0] ?? "").filter((d) => d !== "");
  // The pool cannot be unmounted while volume images in it are attached, and its device stays busy
  // while it is mounted: go round, unmounting and detaching what can be, until nothing is left.
  for (let round = 0; round < 50; round++) {
    for (const m of (await mountsUnder(dir)).reverse()) await unmount(runner, m).catch(() => undefined);
    if (dmPrefix !== undefined) {
      const dm = await dmDevicesNamed(dmPrefix);
      const ordered = [...dm.filter((n) => !n.endsWith("-pool")), ...dm.filter((n) => n.endsWith("-pool"))];
      for (const n of ordered) await runner.run("dmsetup", ["remove", "--noudevsync", n]).catch(() => undefined);
    }
    const attached = await allLoopDevices();
    const left = devices.filter((d) => attached.has(d));
    const dmLeft = dmPrefix === undefined ? [] : await dmDevicesNamed(dmPrefix);
    if (left.length === 0 && dmLeft.length === 0 && (await mountsUnder(dir)).length === 0) return;
    for (const dev of left.reverse()) await runner.run("losetup", ["--detach", dev]).catch(() => undefined);
    await sleep(100);
  }
  throw new Error(`loop devices of ${dir} could not be detached: ${devices.join(", ")}`);
}

async function allLoopDevices(): Promise<Set<string>> {
  const { stdout } = await runner.run("losetup", ["--list", "--noheadings", "--output", "NAME"]);
  return new Set(stdout.split("\n").map((l) => l.trim()).filter((l) => l !== ""));
}

/** Mounts `device` on a fresh directory under `parent` for the time of `work`. */
export async function withMount<T>(
  device: string,
  parent: string,
  work: (mnt: string) => Promise<T>,
  { fs = "ext4", options = [] }: { fs?: FsType; options?: readonly string[] } = {},
): Promise<T> {
  const mnt = await mkdtemp(join(parent, "mnt-"));
  await mountDevice(runner, device, mnt, fs, options);
  try {
    return await work(mnt);
  } finally {
    await unmount(runner, mnt);
    await rm(mnt, { recursive: true, force: true });
  }
}
