import type { Command } from "../command.js";
import { backupCreate, backupLs, backupRm, backupVerify, restore } from "./backups.js";
import { df, metrics, poolGrow } from "./pool.js";
import { snapshotCreate, snapshotLs, snapshotRm } from "./snapshots.js";
import { inspect, ls, resize, rollback } from "./volumes.js";

/** Every command, in the order `thinvol help` lists them. */
export const COMMANDS: readonly Command[] = [
  ls,
  df,
  inspect,
  resize,
  snapshotCreate,
  snapshotLs,
  snapshotRm,
  rollback,
  backupCreate,
  backupLs,
  backupRm,
  backupVerify,
  restore,
  poolGrow,
  metrics,
];

/** Words that only lead to subcommands: `snapshot`, `pool`. */
export const GROUPS: readonly string[] = [...new Set(COMMANDS.filter((c) => c.name.includes(" ")).map((c) => c.name.split(" ")[0] ?? ""))];

export function findCommand(name: string): Command | undefined {
  return COMMANDS.find((c) => c.name === name);
}

export function groupCommands(group: string): Command[] {
  return COMMANDS.filter((c) => c.name.startsWith(`${group} `));
}
