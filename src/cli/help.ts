import { usageOf, type Command } from "./command.js";
import { COMMANDS, groupCommands } from "./commands/index.js";

const WIDTH = 80;

const OPTIONS = `Options (anywhere on the line):
  --plugin NAME   the plugin's name in Docker (default: thinvol)
  --socket PATH   use this admin socket; do not ask Docker where it is
  --json          print the API's reply as JSON (errors too, on stdout)
  --to URL        backups: the target (file:///path or s3://bucket/prefix)
  --from URL      restore: where the backup is
  -h, --help      show help
  --version       print the version
`;

function commandList(commands: readonly Command[], extra: readonly [string, string][] = []): string {
  const rows: [string, string][] = [...commands.map((c): [string, string] => [usageOf(c), c.summary]), ...extra];
  const width = Math.max(...rows.map(([usage]) => usage.length));
  return rows.map(([usage, summary]) => `  ${usage.padEnd(width)}   ${summary}\n`).join("");
}

/** Breaks a paragraph into lines of at most WIDTH characters. */
function wrap(text: string): string {
  const lines: string[] = [];
  let line = "";
  for (const word of text.split(/\s+/)) {
    if (line !== "" && line.length + 1 + word.length > WIDTH) {
      lines.push(line);
      line = word;
    } else line = line === "" ? word : `${line} ${word}`;
  }
  if (line !== "") lines.push(line);
  return lines.map((l) => `${l}\n`).join("");
}

export function mainHelp(): string {
  return `Usage: thinvol [OPTIONS] COMMAND [ARGUMENTS]

Volumes, snapshots and the pool of the thinvol Docker volume plugin, through its
admin API.

Commands:
${commandList(COMMANDS, [["help [COMMAND]", "Show help for a command"]])}
${OPTIONS}
Sizes are a number with an optional unit in powers of 1024: 512M, 20G, 1T.
Exit status: 0 done, 1 failed (the API or the plugin said no, or was not
reached), 2 the command line is wrong (nothing was sent).

Without --socket, the admin socket is found by asking the Docker engine at
DOCKER_HOST (default unix:///var/run/docker.sock) about the plugin.
`;
}

export function commandHelp(command: Command): string {
  return `Usage: thinvol ${usageOf(command)} [OPTIONS]

${command.summary}.

${wrap(command.description)}
Example${command.examples.length > 1 ? "s" : ""}:
${command.examples.map((e) => `  ${e}\n`).join("")}
${OPTIONS}`;
}

export function groupHelp(group: string): string {
  return `Usage: thinvol ${group} COMMAND [ARGUMENTS] [OPTIONS]

Commands:
${commandList(groupCommands(group))}
Run thinvol help ${group} COMMAND for one of them.
`;
}
