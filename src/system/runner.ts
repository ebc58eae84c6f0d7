import { execa } from "execa";
import { CommandError } from "../errors.js";

export interface RunOptions {
  /** Milliseconds before the command is killed; defaults to the runner's. */
  timeoutMs?: number;
  /** Exit codes that are not failures (for tools that use them as answers). */
  okExitCodes?: readonly number[];
  /** Standard input for the command. */
  input?: string;
  /** Extra environment variables. */
  env?: Readonly<Record<string, string>>;
  /**
   * Open file descriptors the command inherits as its descriptors 3, 4, ... (in order), for
   * tools that act on an open file description the caller keeps, such as `flock`.
   */
  inheritFds?: readonly number[];
}

export interface RunResult {
  stdout: string;
  stderr: string;
  exitCode: number;
}

/**
 * The one way thinvol runs a system tool. Arguments are an array and never go
 * through a shell; a failure throws a CommandError that names the command and
 * carries its stderr. Tests substitute a fake.
 */
export interface Runner {
  run(command: string, args: readonly string[], options?: RunOptions): Promise<RunResult>;
}

/** Well under Docker's 60 s timeout for the shortest plugin calls. */
export const DEFAULT_COMMAND_TIMEOUT_MS = 45_000;

export function formatCommand(command: string, args: readonly string[]): string {
  return [command, ...args].map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : JSON.stringify(a))).join(" ");
}

export class ExecaRunner implements Runner {
  /** Commands started so far: the start-up log reports it, so a cost per volume shows. */
  started = 0;

  constructor(private readonly defaultTimeoutMs = DEFAULT_COMMAND_TIMEOUT_MS) {}

  async run(command: string, args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
    this.started++;
    const timeout = options.timeoutMs ?? this.defaultTimeoutMs;
    // execa's types name only descriptors 3-9, but it hands any number to child_process.spawn.
    const fds = (options.inheritFds ?? []) as readonly 3[];
    const result = await execa(command, args, {
      reject: false,
      timeout,
      stripFinalNewline: true,
      ...(options.input !== undefined ? { input: options.input } : {}),
      // Descriptors 0-2 as before; any inherited ones follow as 3, 4, ...
      stdio: [options.input !== undefined ? "pipe" : "ignore", "pipe", "pipe", ...fds],
      env: { LC_ALL: "C", DM_DISABLE_UDEV: "1", ...options.env },
    });
    const exitCode = result.exitCode ?? -1;
    const stdout = String(result.stdout ?? "");
    const stderr = String(result.stderr ?? "");
    const ok = !result.failed || (result.exitCode !== undefined && (options.okExitCodes ?? []).includes(result.exitCode));
    if (!ok) {
      const shown = formatCommand(command, args);
      let why: string;
      if (result.timedOut) why = `timed out after ${timeout} ms`;
      else if (result.exitCode === undefined) why = result.originalMessage ?? "could not be started";
      else why = `exited with ${result.exitCode}`;
      const detail = (stderr || stdout).trim();
      throw new CommandError(`${shown} ${why}${detail ? `: ${detail}` : ""}`, [command, ...args], result.exitCode, stderr, {
        cause: result.cause,
      });
    }
    return { stdout, stderr, exitCode };
  }
}
