import { escapeUnprintable } from "./errors.js";

export type LogLevel = "debug" | "info" | "warn" | "error";

const ORDER: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export type LogFields = Readonly<Record<string, string | number | boolean | undefined>>;

export interface Logger {
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
}

/**
 * A backstop for values no caller capped (user input is quoted shorter where it is
 * read): one field must not turn a log line into megabytes.
 */
export const LOG_VALUE_MAX_CHARS = 4096;

/** Plain printable ASCII stays bare; anything else is JSON-quoted with unprintables escaped, so a value never breaks the line. */
function formatValue(v: string | number | boolean): string {
  let s = String(v);
  if (s.length > LOG_VALUE_MAX_CHARS) s = `${s.slice(0, LOG_VALUE_MAX_CHARS)}… (${s.length} characters)`;
  return /^[!#-<>-[\]-~]+$/.test(s) ? s : escapeUnprintable(JSON.stringify(s));
}

/** One line per event: `time level message key=value ...`, on stdout (Docker collects it). */
export function createLogger(level: LogLevel, write: (line: string) => void = (l) => process.stdout.write(l + "\n")): Logger {
  const min = ORDER[level];
  const emit = (lvl: LogLevel, msg: string, fields?: LogFields) => {
    if (ORDER[lvl] < min) return;
    let line = `${new Date().toISOString()} ${lvl} ${msg}`;
    for (const [k, v] of Object.entries(fields ?? {})) if (v !== undefined) line += ` ${k}=${formatValue(v)}`;
    write(line);
  };
  return {
    debug: (m, f) => emit("debug", m, f),
    info: (m, f) => emit("info", m, f),
    warn: (m, f) => emit("warn", m, f),
    error: (m, f) => emit("error", m, f),
  };
}

export const silentLogger: Logger = { debug() {}, info() {}, warn() {}, error() {} };
