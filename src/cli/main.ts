#!/usr/bin/env node
// The `thinvol` command: a client of the plugin's admin API (docs/cli.md).
import { run } from "./run.js";

// `thinvol ls | head` closes stdout early: that is not an error worth a stack trace.
process.stdout.on("error", (err: NodeJS.ErrnoException) => {
  if (err.code !== "EPIPE") throw err;
});

process.once("SIGINT", () => {
  // Clear a progress line, and say that interrupting the command does not stop a change.
  if (process.stderr.isTTY) process.stderr.write("\r\x1b[K");
  process.stderr.write("thinvol: interrupted; a change already sent to the plugin is not stopped (look with thinvol ls)\n");
  process.exit(130);
});

process.exitCode = await run(process.argv.slice(2), {
  stdout: (text) => void process.stdout.write(text),
  stderr: (text) => void process.stderr.write(text),
  stderrIsTTY: process.stderr.isTTY === true,
  ...(process.stderr.columns === undefined ? {} : { stderrColumns: process.stderr.columns }),
  env: process.env,
  now: () => Date.now(),
});
