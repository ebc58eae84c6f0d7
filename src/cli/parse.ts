import { parseArgs } from "node:util";
import { quote } from "../errors.js";
import { usageOf, type Command } from "./command.js";
import { COMMANDS, GROUPS, findCommand, groupCommands } from "./commands/index.js";
import { UsageError } from "./errors.js";
import { commandHelp, groupHelp, mainHelp } from "./help.js";
import { BackupTarget, PluginName, SocketPath, check, type ArgSchema } from "./validate.js";

export const DEFAULT_PLUGIN = "thinvol";

export interface Globals {
  plugin: string;
  socket?: string;
  json: boolean;
  /** Backup targets: `--to` where backups go, `--from` where a restore reads. */
  to?: string;
  from?: string;
}

export type Invocation =
  | { kind: "help"; text: string }
  | { kind: "version" }
  | { kind: "run"; command: Command; args: string[] };

const OPTIONS = {
  plugin: { type: "string" },
  socket: { type: "string" },
  json: { type: "boolean" },
  to: { type: "string" },
  from: { type: "string" },
  help: { type: "boolean", short: "h" },
  version: { type: "boolean" },
} as const;

/** Whether the line asks for --json, read before parsing so that even a usage error can be printed as JSON. */
export function wantsJson(argv: readonly string[]): boolean {
  const end = argv.indexOf("--");
  return (end < 0 ? argv : argv.slice(0, end)).includes("--json");
}

/**
 * Reads the command line: global options anywhere, then the command's words and its
 * arguments, each validated. Throws UsageError for anything wrong, before any request.
 */
export function parseCommandLine(argv: readonly string[]): { globals: Globals; invocation: Invocation } {
  let parsed;
  try {
    parsed = parseArgs({ args: [...argv], options: OPTIONS, strict: true, allowPositionals: true });
  } catch (err) {
    throw new UsageError(optionProblem(err), topicOf(argv));
  }
  const { values, positionals } = parsed;
  const globals: Globals = { plugin: valid(PluginName, values.plugin ?? DEFAULT_PLUGIN, ""), json: values.json ?? false };
  if (values.socket !== undefined) globals.socket = valid(SocketPath, values.socket, "");
  if (values.to !== undefined) globals.to = valid(BackupTarget, values.to, topicOf(argv));
  if (values.from !== undefined) globals.from = valid(BackupTarget, values.from, topicOf(argv));
  if (values.version) return { globals, invocation: { kind: "version" } };
  return { globals, invocation: resolve(positionals, values.help ?? false) };
}

function resolve(words: readonly string[], help: boolean): Invocation {
  const [first, ...rest] = words;
  if (first === undefined) {
    if (help) return { kind: "help", text: mainHelp() };
    throw new UsageError("no command given");
  }
  if (first === "help") return { kind: "help", text: helpFor(rest) };
  let command: Command | undefined;
  let args: string[];
  if (GROUPS.includes(first)) {
    const [sub, ...subArgs] = rest;
    const choices = orList(groupCommands(first).map((c) => c.name.slice(first.length + 1)));
    if (sub === undefined) {
      if (help) return { kind: "help", text: groupHelp(first) };
      throw new UsageError(`missing ${first} command: use ${choices}`, first);
    }
    command = findCommand(`${first} ${sub}`);
    if (!command) throw new UsageError(`unknown ${first} command ${quote(sub)}: use ${choices}`, first);
    args = subArgs;
  } else {
    command = findCommand(first);
    if (!command) throw new UsageError(`unknown command ${quote(first)}`);
    args = rest;
  }
  if (help) return { kind: "help", text: commandHelp(command) };
  checkArgs(command, args);
  return { kind: "run", command, args };
}

function helpFor(topic: readonly string[]): string {
  const name = topic.join(" ");
  if (name === "") return mainHelp();
  if (GROUPS.includes(name)) return groupHelp(name);
  const command = findCommand(name);
  if (!command) throw new UsageError(`no help for ${quote(name)}: no such command`);
  return commandHelp(command);
}

/** The right number of arguments, each valid: a bad name or size never reaches the plugin. */
function checkArgs(command: Command, args: readonly string[]): void {
  const usage = `usage: thinvol ${usageOf(command)}`;
  const required = command.args.filter((a) => !a.optional);
  if (args.length < required.length) {
    const missing = required.slice(args.length).map((a) => a.name);
    throw new UsageError(`missing ${missing.join(" and ")} (${usage})`, command.name);
  }
  if (args.length > command.args.length) {
    throw new UsageError(`unexpected argument ${quote(args[command.args.length] ?? "")} (${usage})`, command.name);
  }
  command.args.forEach((arg, i) => {
    const value = args[i];
    if (value !== undefined) valid(arg.schema, value, command.name);
  });
}

function valid(schema: ArgSchema, value: string, topic: string): string {
  const result = check(schema, value);
  if (!result.ok) throw new UsageError(result.message, topic);
  return result.value;
}

/** node:util's messages, said the way the rest of the command says things. */
function optionProblem(err: unknown): string {
  const message = err instanceof Error ? err.message : String(err);
  const code = (err as { code?: unknown }).code;
  const option = /'(-[^' ]+)/.exec(message)?.[1] ?? "";
  if (code === "ERR_PARSE_ARGS_UNKNOWN_OPTION") return `unknown option ${quote(option)}`;
  if (code === "ERR_PARSE_ARGS_INVALID_OPTION_VALUE") {
    if (message.includes("does not take an argument")) return `option ${option} takes no value`;
    return `option ${option} needs a value`;
  }
  return message;
}

/** The command a broken line was about, to point its help at. */
function topicOf(argv: readonly string[]): string {
  const words = argv.filter((a) => !a.startsWith("-"));
  const two = words.slice(0, 2).join(" ");
  if (COMMANDS.some((c) => c.name === two)) return two;
  const one = words[0] ?? "";
  return COMMANDS.some((c) => c.name === one) || GROUPS.includes(one) ? one : "";
}

/** `create, ls or rm` */
function orList(items: readonly string[]): string {
  return items.length <= 1 ? items.join("") : `${items.slice(0, -1).join(", ")} or ${items.at(-1) ?? ""}`;
}
