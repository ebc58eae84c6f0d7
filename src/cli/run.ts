import { escapeUnprintable } from "../errors.js";
import { AdminClient, type AdminSocket } from "./client.js";
import type { Context } from "./command.js";
import { discoverAdminSocket } from "./discovery.js";
import { CliError, EXIT_FAILURE, EXIT_OK, UsageError } from "./errors.js";
import { json } from "./format.js";
import { parseCommandLine, wantsJson, type Globals } from "./parse.js";
import { BackupTarget, check } from "./validate.js";
import { ProgressLine } from "./progress.js";
import { version } from "./version.js";

/** Where the command writes, and what it reads from its surroundings; tests pass their own. */
export interface Io {
  stdout(text: string): void;
  stderr(text: string): void;
  /** Progress lines are drawn only on a terminal. */
  stderrIsTTY: boolean;
  stderrColumns?: number;
  env: Readonly<Record<string, string | undefined>>;
  now(): number;
}

/** Runs one command line; returns the exit status (0 done, 1 failed, 2 usage error). */
export async function run(argv: readonly string[], io: Io): Promise<number> {
  try {
    const { globals, invocation } = parseCommandLine(argv);
    switch (invocation.kind) {
      case "help":
        io.stdout(invocation.text);
        return EXIT_OK;
      case "version":
        io.stdout(`thinvol ${version()}\n`);
        return EXIT_OK;
      case "run": {
        const output = await invocation.command.run(context(globals, io, invocation.command.name), invocation.args);
        io.stdout(globals.json && output.json !== undefined ? json(output.json) : output.text);
        return EXIT_OK;
      }
    }
  } catch (err) {
    return report(err, wantsJson(argv), io);
  }
}

function context(globals: Globals, io: Io, topic: string): Context {
  const locate = (): Promise<AdminSocket> =>
    globals.socket !== undefined ? Promise.resolve({ path: globals.socket }) : discoverAdminSocket(globals.plugin, io.env);
  const showProgress = io.stderrIsTTY && !globals.json;
  return {
    client: new AdminClient(locate),
    target(option) {
      const given = this.maybeTarget(option);
      if (given === undefined) throw new UsageError(`${topic} needs --${option} URL (file:///path or s3://bucket/prefix), or THINVOL_BACKUP_TARGET set`, topic);
      return given;
    },
    maybeTarget(option) {
      const given = globals[option] ?? io.env["THINVOL_BACKUP_TARGET"];
      if (given === undefined || given === "") return undefined;
      const result = check(BackupTarget, given);
      if (!result.ok) throw new UsageError(result.message, topic);
      return result.value;
    },
    async change(label, call) {
      if (!showProgress) return call(undefined);
      const line = new ProgressLine(label, io.stderr, io.now, io.stderrColumns);
      try {
        return await call((event) => line.update(event));
      } finally {
        line.clear();
      }
    },
  };
}

/**
 * Every failure is printed here: `thinvol: MESSAGE` on stderr, plus a pointer to the
 * help for a usage error, plus `{"error", "kind"}` on stdout with --json. Anything
 * that is not a CliError is a bug in the command, and says so.
 */
function report(err: unknown, asJson: boolean, io: Io): number {
  const known = err instanceof CliError;
  const message = known ? err.message : `internal error: ${err instanceof Error ? err.message : String(err)}`;
  const kind = known ? err.kind : "error";
  if (asJson) io.stdout(json({ error: message, kind }));
  // Messages can quote what a peer sent: escaped, so nothing in them can drive the terminal.
  io.stderr(`thinvol: ${escapeUnprintable(message)}\n`);
  if (!known && err instanceof Error && err.stack !== undefined) io.stderr(`${err.stack}\n`);
  if (err instanceof UsageError) io.stderr(`see thinvol help${err.topic === "" ? "" : ` ${err.topic}`}\n`);
  return known ? err.exitCode : EXIT_FAILURE;
}
