import { CommandError } from "../errors.js";
import type { Runner } from "./runner.js";

/*
 * Typed wrappers around dmsetup. There is no udev where thinvol runs: the runner
 * sets DM_DISABLE_UDEV=1, commands that would wait for udev get --noudevsync, and
 * nodes under /dev/mapper are made with `dmsetup mknodes`.
 */

export interface DmDevice {
  name: string;
  major: number;
  minor: number;
  suspended: boolean;
  /** How many holders have the device open (a mount, another dm table, blkdiscard...). */
  openCount: number;
}

/** `dmsetup status` of a thin-pool target. */
export interface ThinPoolStatus {
  transactionId: number;
  /** Metadata blocks are always 4 KiB. */
  metaUsedBlocks: number;
  metaTotalBlocks: number;
  /** Data blocks are the pool's block size. */
  dataUsedBlocks: number;
  dataTotalBlocks: number;
  mode: "rw" | "ro" | "out_of_data_space";
  needsCheck: boolean;
  /** A metadata snapshot is reserved (`reserve_metadata_snap`): its held root is shown instead of "-". */
  metadataSnapHeld: boolean;
}

/** `dmsetup status` of a thin target. */
export interface ThinStatus {
  mappedSectors: number;
  /** Undefined when nothing is mapped. */
  highestMappedSector: number | undefined;
}

/** The parsed `dmsetup table` of a thin-pool target. */
export interface ThinPoolTable {
  lengthSectors: number;
  /** major:minor as the kernel prints them. */
  metaDevice: string;
  dataDevice: string;
  blockSizeSectors: number;
  lowWaterBlocks: number;
  features: string[];
}

export const dmPath = (name: string): string => `/dev/mapper/${name}`;

/** `0 <len> <target> <args...>` of a single-segment device. */
function splitSegment(name: string, what: string, text: string): { length: number; target: string; rest: string[] } {
  const line = text.trim().split("\n")[0] ?? "";
  const parts = line.trim().split(/\s+/);
  const [start, length, target, ...rest] = parts;
  if (start !== "0" || length === undefined || target === undefined || !/^\d+$/.test(length)) {
    throw new Error(`dmsetup ${what} ${name} printed something unexpected: ${JSON.stringify(text)}`);
  }
  return { length: Number(length), target, rest };
}

function fraction(s: string | undefined): [number, number] | undefined {
  const m = /^(\d+)\/(\d+)$/.exec(s ?? "");
  return m ? [Number(m[1]), Number(m[2])] : undefined;
}

export function parseThinPoolStatus(name: string, text: string): ThinPoolStatus {
  const { target, rest } = splitSegment(name, "status", text);
  if (target !== "thin-pool") throw new Error(`${name} is a ${target} device, not a thin-pool`);
  if (rest[0] === "Fail") throw new Error(`thin pool ${name} has failed (dmsetup status says Fail); check the kernel log`);
  const [tx, meta, data, held, mode, ...more] = rest;
  const m = fraction(meta);
  const d = fraction(data);
  if (tx === undefined || !/^\d+$/.test(tx) || !m || !d || (mode !== "rw" && mode !== "ro" && mode !== "out_of_data_space")) {
    throw new Error(`cannot read the status of thin pool ${name}: ${JSON.stringify(text)}`);
  }
  return {
    transactionId: Number(tx),
    metaUsedBlocks: m[0],
    metaTotalBlocks: m[1],
    dataUsedBlocks: d[0],
    dataTotalBlocks: d[1],
    mode,
    needsCheck: more.includes("needs_check"),
    metadataSnapHeld: held !== undefined && held !== "-",
  };
}

export function parseThinStatus(name: string, text: string): ThinStatus {
  const { target, rest } = splitSegment(name, "status", text);
  if (target !== "thin") throw new Error(`${name} is a ${target} device, not a thin volume`);
  const [mapped, highest] = rest;
  if (mapped === "Fail") throw new Error(`thin device ${name} has failed (dmsetup status says Fail)`);
  if (mapped === undefined || !/^\d+$/.test(mapped)) throw new Error(`cannot read the status of thin device ${name}: ${JSON.stringify(text)}`);
  return {
    mappedSectors: Number(mapped),
    highestMappedSector: highest !== undefined && /^\d+$/.test(highest) ? Number(highest) : undefined,
  };
}

export function parseThinPoolTable(name: string, text: string): ThinPoolTable {
  const { length, target, rest } = splitSegment(name, "table", text);
  const [meta, data, block, low, , ...features] = rest; // the feature count is implied
  if (target !== "thin-pool" || meta === undefined || data === undefined || !/^\d+$/.test(block ?? "") || !/^\d+$/.test(low ?? "")) {
    throw new Error(`${name} does not have a thin-pool table: ${JSON.stringify(text)}`);
  }
  return {
    lengthSectors: length,
    metaDevice: meta,
    dataDevice: data,
    blockSizeSectors: Number(block),
    lowWaterBlocks: Number(low),
    features,
  };
}

/** A thin-pool table line. Feature args are counted, so the count is derived, never typed. */
export function thinPoolTable(t: Omit<ThinPoolTable, "features"> & { features: readonly string[] }): string {
  return [0, t.lengthSectors, "thin-pool", t.metaDevice, t.dataDevice, t.blockSizeSectors, t.lowWaterBlocks, t.features.length, ...t.features].join(" ");
}

export function thinTable(lengthSectors: number, poolDevice: string, thinId: number): string {
  return `0 ${lengthSectors} thin ${poolDevice} ${thinId}`;
}

/** Every device-mapper device, by name. */
export async function listDevices(runner: Runner): Promise<Map<string, DmDevice>> {
  const { stdout } = await runner.run("dmsetup", [
    "info",
    "-c",
    "--noheadings",
    "--separator",
    "\t",
    "-o",
    "name,major,minor,suspended,open",
  ]);
  const devices = new Map<string, DmDevice>();
  for (const line of stdout.split("\n")) {
    const parts = line.split("\t");
    if (parts.length < 5) continue; // "No devices found"
    const [major, minor, suspended, open] = parts.slice(-4);
    const name = parts.slice(0, -4).join("\t");
    devices.set(name, {
      name,
      major: Number(major),
      minor: Number(minor),
      suspended: suspended?.trim() === "Suspended",
      openCount: Number(open),
    });
  }
  return devices;
}

/** The device, or undefined when it does not exist. */
export async function deviceInfo(runner: Runner, name: string): Promise<DmDevice | undefined> {
  return (await listDevices(runner)).get(name);
}

/** Creates and activates a device; `readOnly`: the kernel refuses every write to it. */
export async function createDevice(runner: Runner, name: string, table: string, options: { readOnly?: boolean } = {}): Promise<void> {
  await runner.run("dmsetup", ["create", name, "--noudevsync", ...(options.readOnly ? ["--readonly"] : []), "--table", table]);
}

/** Loads a table into the inactive slot; `resumeDevice` makes it live. */
export async function loadTable(runner: Runner, name: string, table: string): Promise<void> {
  await runner.run("dmsetup", ["load", name, "--table", table]);
}

/** Suspends a device: I/O is held and a filesystem on it is frozen. */
export async function suspendDevice(runner: Runner, name: string): Promise<void> {
  await runner.run("dmsetup", ["suspend", "--noudevsync", name]);
}

export async function resumeDevice(runner: Runner, name: string): Promise<void> {
  await runner.run("dmsetup", ["resume", "--noudevsync", name]);
}

/** Removes a device; --retry rides out a brief EBUSY from a process that just closed it. */
export async function removeDevice(runner: Runner, name: string): Promise<void> {
  await runner.run("dmsetup", ["remove", "--noudevsync", "--retry", name]);
}

/** Makes /dev/mapper/<name> match the kernel (creates or removes the node). */
export async function makeNodes(runner: Runner, name?: string): Promise<void> {
  await runner.run("dmsetup", name === undefined ? ["mknodes"] : ["mknodes", name]);
}

/** Sends a target message (e.g. `create_thin 5` to a thin pool). */
export async function sendMessage(runner: Runner, name: string, text: string): Promise<void> {
  await runner.run("dmsetup", ["message", name, "0", text]);
}

export async function tableOf(runner: Runner, name: string): Promise<string> {
  return (await runner.run("dmsetup", ["table", name])).stdout;
}

export async function thinPoolStatus(runner: Runner, name: string): Promise<ThinPoolStatus> {
  return parseThinPoolStatus(name, (await runner.run("dmsetup", ["status", name])).stdout);
}

export async function thinStatus(runner: Runner, name: string): Promise<ThinStatus> {
  return parseThinStatus(name, (await runner.run("dmsetup", ["status", name])).stdout);
}

/** The kernel's device-mapper targets and their versions, e.g. thin-pool → v1.23.0. */
export async function listTargets(runner: Runner): Promise<Map<string, string>> {
  const { stdout } = await runner.run("dmsetup", ["targets"]);
  const targets = new Map<string, string>();
  for (const line of stdout.split("\n")) {
    const [name, version] = line.trim().split(/\s+/);
    if (name) targets.set(name, version ?? "");
  }
  return targets;
}

/** The kernel driver's version, or undefined when the kernel has no device-mapper. */
export async function kernelDriverVersion(runner: Runner): Promise<string | undefined> {
  const { stdout } = await runner.run("dmsetup", ["version"]);
  return /^Driver version:\s*(\S+)/m.exec(stdout)?.[1];
}

/** The kernel's reason (errno text) for a failed dmsetup command, e.g. "No data available". */
export function dmFailureReason(err: unknown): string {
  if (!(err instanceof CommandError)) return "";
  const m = /failed:\s*([^\n]+)/.exec(err.stderr);
  return m?.[1]?.trim() ?? err.stderr.trim();
}
