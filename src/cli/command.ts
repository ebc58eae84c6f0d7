import type { AdminClient } from "./client.js";
import type { Progress } from "./replies.js";
import type { ArgSchema } from "./validate.js";

/** A positional argument: its name in the usage line and its validator. */
export interface Arg {
  name: string;
  schema: ArgSchema;
  optional?: boolean;
}

/** What a command prints: `json` with --json (absent: the text either way), else `text`. */
export interface Output {
  json?: unknown;
  text: string;
}

export type OnProgress = (event: Progress) => void;

export interface Context {
  client: AdminClient;
  /**
   * Runs a change. When progress is shown (stderr a terminal, no --json) `call` gets
   * a callback for the plugin's events, drawn on one line labelled `label`.
   */
  change<T>(label: string, call: (onProgress: OnProgress | undefined) => Promise<T>): Promise<T>;
  /** The backup target `--to` (or `--from`) gave, else THINVOL_BACKUP_TARGET; a usage error without one. */
  target(option: "to" | "from"): string;
  /** The same, or undefined when neither is given (the plugin then looks at the targets it knows). */
  maybeTarget(option: "to" | "from"): string | undefined;
}

export interface Command {
  /** The words that invoke it: `ls`, `snapshot create`. */
  name: string;
  args: readonly Arg[];
  summary: string;
  /** Paragraphs for `thinvol help NAME`. */
  description: string;
  examples: readonly string[];
  run(ctx: Context, args: readonly string[]): Promise<Output>;
}

/** `resize VOLUME SIZE`, `snapshot ls [VOLUME]` */
export function usageOf(command: Command): string {
  return [command.name, ...command.args.map((a) => (a.optional ? `[${a.name}]` : a.name))].join(" ");
}

/** Encodes a validated name for a path: names are already safe, this keeps it so if the rules change. */
export const seg = (name: string): string => encodeURIComponent(name);
