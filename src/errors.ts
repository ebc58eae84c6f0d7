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
