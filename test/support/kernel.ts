import { readMounts, unmount } from "../../src/system/mount.js";
import { ExecaRunner } from "../../src/system/runner.js";

const runner = new ExecaRunner();

/** Loop devices whose backing file lies under `dir`, as "device file" lines. */
export async function loopDevicesUnder(dir: string): Promise<string[]> {
  const { stdout } = await runner.run("losetup", ["--list", "--noheadings", "--raw", "--output", "NAME,BACK-FILE"]);
  return stdout
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l !== "" && (l.split(" ")[1] ?? "").startsWith(dir));
}

/** Mount points under `dir`. */
export async function mountsUnder(dir: string): Promise<string[]> {
  return (await readMounts()).map((m) => m.mountPoint).filter((m) => m === dir || m.startsWith(dir + "/"));
}

/** What a host reboot does to a loop pool: unmount everything under `dir` and detach its loop devices. */
export async function tearDownLoopPool(dir: string): Promise<void> {
  for (const m of (await mountsUnder(dir)).reverse()) await unmount(runner, m).catch(() => undefined);
  for (const line of await loopDevicesUnder(dir)) {
    const dev = line.split(" ")[0];
    if (dev) await runner.run("losetup", ["--detach", dev]).catch(() => undefined);
  }
}
