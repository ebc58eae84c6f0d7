/**
 * What the command can fail with. Each error knows its exit status and the `kind`
 * that `--json` prints, so the mapping from failure to output lives in one place (run.ts).
 */

/**
 * The API's kinds (docs/admin-api.md: invalid, not-found, conflict, no-space, error)
 * pass through as they came; the command adds `usage` and `unavailable`.
 */
export type ErrorKind = string;

export const EXIT_OK = 0;
export const EXIT_FAILURE = 1;
export const EXIT_USAGE = 2;

export class CliError extends Error {
  override name = "CliError";
  constructor(
    message: string,
    readonly kind: ErrorKind,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
  get exitCode(): number {
    return EXIT_FAILURE;
  }
}

/**
 * The command line is wrong (unknown command or option, missing or extra arguments,
 * a bad name or size). Found before any request is sent. `topic` is the help to point at.
 */
export class UsageError extends CliError {
  override name = "UsageError";
  constructor(
    message: string,
    readonly topic: string = "",
  ) {
    super(message, "usage");
  }
  override get exitCode(): number {
    return EXIT_USAGE;
  }
}

/** The plugin, the Docker engine or the admin socket could not be reached or found. */
export class UnavailableError extends CliError {
  override name = "UnavailableError";
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, "unavailable", options);
  }
}

/** The admin API refused or failed: its message and kind, as it gave them. */
export class ApiError extends CliError {
  override name = "ApiError";
  constructor(
    message: string,
    kind: string,
    readonly status: number,
  ) {
    super(message, kind);
  }
}
