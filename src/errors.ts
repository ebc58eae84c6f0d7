/**
 * Errors a user sees. Every message says what failed, on which volume, and why;
 * the API layer turns them into `{Err}` replies without rewording them.
 */
export class ThinvolError extends Error {
  override name = "ThinvolError";
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

/** The request itself is wrong (bad name, bad option): nothing was changed. */
export class InvalidRequestError extends ThinvolError {
  override name = "InvalidRequestError";
}

/** The volume does not exist. */
export class NotFoundError extends ThinvolError {
  override name = "NotFoundError";
}

/** The volume exists but is in a state that forbids the operation. */
export class ConflictError extends ThinvolError {
  override name = "ConflictError";
}

/** The pool has no room for what was asked. */
export class NoSpaceError extends ThinvolError {
  override name = "NoSpaceError";
}

/** Another thinvol process holds STATE_DIR; this one must not touch the pool. */
export class StateDirTakenError extends ThinvolError {
  override name = "StateDirTakenError";
}

/** STATE_DIR holds a pool in a newer format than this version reads: it must not touch it. */
export class StateFormatError extends ThinvolError {
  override name = "StateFormatError";
}

/** A system command failed; the message carries the command and its stderr. */
export class CommandError extends ThinvolError {
  override name = "CommandError";
  constructor(
    message: string,
    readonly command: readonly string[],
    readonly exitCode: number | undefined,
    readonly stderr: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** The request body is over the limit: nothing was read past it and nothing was changed. */
export class RequestTooLargeError extends InvalidRequestError {
  override name = "RequestTooLargeError";
}

/**
 * The most characters of user-supplied text that a message or a log line quotes:
 * enough for any valid volume name (96) and Docker's mount IDs (64) to show whole.
 */
export const QUOTE_MAX_CHARS = 100;

/**
 * Characters a terminal or log viewer would act on instead of showing: C0 and C1
 * controls, DEL, line and paragraph separators, bidirectional overrides, BOM.
 */
const UNPRINTABLE = /[\u0000-\u001f\u007f-\u009f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff]/g;

const SHORT_ESCAPES: Readonly<Record<string, string>> = { "\n": "\\n", "\r": "\\r", "\t": "\\t" };

/** Escapes unprintable characters as `\uXXXX`, and lone surrogates too, so text stays on one readable line. */
export function escapeUnprintable(text: string): string {
  return text
    .replace(UNPRINTABLE, (ch) => SHORT_ESCAPES[ch] ?? `\\u${ch.charCodeAt(0).toString(16).padStart(4, "0")}`)
    .replace(/[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g, (ch) => `\\u${ch.charCodeAt(0).toString(16)}`);
}

/**
 * Quotes user-supplied text (a name, an option, a mount ID) for an error or a log
 * line: in double quotes, unprintable characters escaped, and cut after `max`
 * characters with "…" and the full length, so hostile input cannot flood either.
 */
export function quote(text: string, max = QUOTE_MAX_CHARS): string {
  const chars = Array.from(text);
  const shown = escapeUnprintable(chars.slice(0, max).join("").replace(/["\\]/g, (ch) => `\\${ch}`));
  return chars.length <= max ? `"${shown}"` : `"${shown}…" (${chars.length} characters)`;
}

/** Quotes at most `max` items of a list and says how many more there are. */
export function quoteList(items: readonly string[], max = 5): string {
  const shown = items.slice(0, max).map((i) => quote(i)).join(", ");
  return items.length <= max ? shown : `${shown} and ${items.length - max} more`;
}

/**
 * `err` with `what` in front of its message, keeping its kind (not found stays not found),
 * so a caller can say which operation failed without losing what the API answers.
 */
export function inContext(err: unknown, what: string): ThinvolError {
  const message = `${what}: ${errorMessage(err)}`;
  for (const Kind of [RequestTooLargeError, InvalidRequestError, NotFoundError, ConflictError, NoSpaceError] as const) {
    if (err instanceof Kind) return new Kind(message, { cause: err });
  }
  return new ThinvolError(message, { cause: err });
}
