import { errorMessage, quote } from "../errors.js";

/** What the SDK's errors carry: the service's error code as `name`, the HTTP status in `$metadata`. */
interface SdkError {
  name?: string;
  code?: string;
  message?: string;
  $metadata?: { httpStatusCode?: number };
  errors?: unknown[];
}

function fields(err: unknown): SdkError {
  return typeof err === "object" && err !== null ? (err as SdkError) : {};
}

/** A 404 with the given error code; HEAD replies have no body, so the SDK calls them all "NotFound". */
export function isNotFound(err: unknown, code: string): boolean {
  const e = fields(err);
  return e.name === code && (e.$metadata?.httpStatusCode ?? 404) === 404;
}

const CREDENTIAL_CODES = new Set(["InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "TokenRefreshRequired"]);
/** Socket errors that mean the endpoint is not there, as opposed to one that answered. */
const NETWORK_CODES = new Set(["ECONNREFUSED", "ENOTFOUND", "EAI_AGAIN", "EHOSTUNREACH", "ENETUNREACH", "ECONNRESET", "ETIMEDOUT", "EPIPE"]);

function networkCode(err: unknown): string | undefined {
  const e = fields(err);
  if (e.code !== undefined && NETWORK_CODES.has(e.code)) return e.code;
  // Node's happy eyeballs reports every address it tried in an AggregateError.
  for (const inner of e.errors ?? []) {
    const code = networkCode(inner);
    if (code !== undefined) return code;
  }
  return undefined;
}

/**
 * An S3 failure in words a user can act on: the bucket that is missing, the credentials that
 * were refused or not found, the endpoint that did not answer. Anything else keeps the
 * service's own code and message.
 */
export function describeS3Error(err: unknown, where: { bucket: string; endpoint: string }): string {
  const e = fields(err);
  const status = e.$metadata?.httpStatusCode;
  const said = `${e.name ?? "Error"}${status !== undefined ? ` (HTTP ${status})` : ""}: ${errorMessage(err)}`;
  const net = networkCode(err);
  if (net !== undefined) return `cannot reach ${where.endpoint} (${net}); check S3_ENDPOINT and that the server is up`;
  if (e.name === "TimeoutError") return `${where.endpoint} did not answer in time (${errorMessage(err)}); check S3_ENDPOINT and the network`;
  if (e.name === "NoSuchBucket") return `bucket ${quote(where.bucket)} does not exist at ${where.endpoint}; create it first`;
  if (e.name !== undefined && CREDENTIAL_CODES.has(e.name)) return `${where.endpoint} refused the credentials (${said}); check S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY`;
  if (e.name === "AccessDenied" || status === 403) return `access denied to bucket ${quote(where.bucket)} (${said}); check the credentials and the bucket's policy`;
  if (e.name === "CredentialsProviderError") return `no S3 credentials found: set S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY (${errorMessage(err)})`;
  if (/region is missing/i.test(errorMessage(err))) return "no S3 region: set S3_REGION (or AWS_REGION)";
  return said;
}
