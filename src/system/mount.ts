import { readFile } from "node:fs/promises";
import type { Runner } from "./runner.js";

export interface MountEntry {
  /** major:minor of the mounted device. */
  device: string;
  mountPoint: string;
  fsType: string;
  source: string;
  /** The filesystem's own options (for instance `discard`). */
  superOptions?: string[];
}

/** mountinfo escapes space, tab, newline and backslash as octal. */
function unescapeMountField(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(Number.parseInt(oct, 8)));
}

export function parseMountInfo(text: string): MountEntry[] {
  const entries: MountEntry[] = [];
  for (const line of text.split("\n")) {
    if (!line.trim()) continue;
    const [left, right] = line.split(" - ");
    if (left === undefined || right === undefined) continue;
    const l = left.split(" ");
    const r = right.split(" ");
    const device = l[2];
    const mountPoint = l[4];
    if (device === undefined || mountPoint === undefined) continue;
    entries.push({
      device,
      mountPoint: unescapeMountField(mountPoint),
      fsType: r[0] ?? "",
      source: unescapeMountField(r[1] ?? ""),
      superOptions: (r[2] ?? "").split(","),
    });
  }
  return entries;
}

export async function readMounts(path = "/proc/self/mountinfo"): Promise<MountEntry[]> {
  return parseMountInfo(await readFile(path, "utf8"));
}

export async function mountDevice(runner: Runner, device: string, target: string, fsType: string, options: readonly string[]): Promise<void> {
  const args = ["-t", fsType];
  if (options.length > 0) args.push("-o", options.join(","));
  args.push(device, target);
  await runner.run("mount", args);
}

/**
 * Unmounts `target`. With `detachLoop`, a loop device under it is detached by the same
 * command (umount --detach-loop): one process fewer on a container's stop.
 */
export async function unmount(runner: Runner, target: string, options: { detachLoop?: boolean } = {}): Promise<void> {
  await runner.run("umount", options.detachLoop ? ["--detach-loop", target] : [target]);
}
