import { open } from "node:fs";
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { StateDirTakenError } from "../errors.js";
import type { Runner } from "./runner.js";

/** The file in STATE_DIR whose lock marks the one process that owns the pool. */
export const OWNER_LOCK_FILE = "owner.lock";
/** Our own exit code for "someone else holds the lock", apart from flock's usage errors (1, 64). */
const LOCK_HELD_EXIT_CODE = 75;

/**
 * Takes an exclusive flock(2) on the open file `fd` without waiting; false if another open
 * file description holds it. Node has no flock, so util-linux `flock` does it on the
 * descriptor it inherits: the lock belongs to the open file description, which outlives
 * the short `flock` process for as long as we keep `fd` open.
 */
export async function lockExclusiveNow(runner: Runner, fd: number): Promise<boolean> {
  const { exitCode } = await runner.run(
    "flock",
    ["--exclusive", "--nonblock", "--conflict-exit-code", String(LOCK_HELD_EXIT_CODE), "3"],
    { inheritFds: [fd], okExitCodes: [LOCK_HELD_EXIT_CODE] },
  );
  return exitCode === 0;
}

/**
 * Makes this process the only owner of `stateDir` for the rest of its life. The descriptor
 * is never closed: the kernel drops the lock when the process ends, even by SIGKILL or a
 * crash, so a stale lock cannot block the next start. It is a plain number (not a
 * FileHandle, which Node closes when it is garbage-collected) and close-on-exec, so no tool
 * the server runs later keeps the lock alive after the server is gone.
 */
export async function claimStateDir(runner: Runner, stateDir: string): Promise<void> {
  await mkdir(stateDir, { recursive: true });
  const fd = await promisify(open)(join(stateDir, OWNER_LOCK_FILE), "a", 0o600);
  if (await lockExclusiveNow(runner, fd)) return;
  throw new StateDirTakenError(
    `the pool directory STATE_DIR=${stateDir} is taken: another thinvol instance (another plugin ` +
      `name or tag, or another Docker engine on this host) owns it, and a pool has one owner only. ` +
      `Give this one its own directory: docker plugin disable <name>, then ` +
      `docker plugin set <name> state.source=/other/dir (or STATE_DIR=<another directory>), ` +
      `then docker plugin enable <name>; or stop the other instance`,
  );
}
