import { CommandError } from "../../src/errors.js";
import { formatCommand, type RunOptions, type RunResult, type Runner } from "../../src/system/runner.js";

export type FakeReply = string | Partial<RunResult> | Error | undefined;
export type FakeHandler = (command: string, args: readonly string[], options: RunOptions) => FakeReply | Promise<FakeReply>;

/**
 * A Runner that records every command and answers from a handler. A handler
 * that returns an Error, or a result with a non-zero exit code, makes the
 * command fail the way ExecaRunner does.
 */
export class FakeRunner implements Runner {
  readonly calls: string[][] = [];

  constructor(private readonly handler: FakeHandler = () => "") {}

  async run(command: string, args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
    this.calls.push([command, ...args]);
    const reply = await this.handler(command, args, options);
    if (reply instanceof Error) throw reply;
    const result: RunResult = typeof reply === "string" || reply === undefined
      ? { stdout: reply ?? "", stderr: "", exitCode: 0 }
      : { stdout: reply.stdout ?? "", stderr: reply.stderr ?? "", exitCode: reply.exitCode ?? 0 };
    if (result.exitCode !== 0 && !(options.okExitCodes ?? []).includes(result.exitCode)) {
      throw new CommandError(
        `${formatCommand(command, args)} exited with ${result.exitCode}: ${result.stderr}`,
        [command, ...args],
        result.exitCode,
        result.stderr,
      );
    }
    return result;
  }

  /** The recorded commands as single lines, for readable assertions. */
  lines(): string[] {
    return this.calls.map(([c, ...a]) => formatCommand(c ?? "", a));
  }
}

/** A failure like the one a real tool produces. */
export function commandFailure(stderr: string, exitCode = 1): Partial<RunResult> {
  return { stderr, exitCode };
}
