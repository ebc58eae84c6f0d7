import * as v from "valibot";
import { InvalidRequestError, quote } from "../errors.js";
import { SettingsError } from "../settings.js";
import { checkPrefix } from "./store.js";

/**
 * How to reach an S3 target. A field left out is looked up by the AWS SDK itself, as any
 * AWS tool does: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID and
 * AWS_SECRET_ACCESS_KEY, then ~/.aws and the instance's role.
 */
export interface S3Settings {
  /** An S3-compatible server (MinIO, Ceph, Garage): `https://host:port`. Absent: AWS. */
  endpoint?: string;
  region?: string;
  accessKeyId?: string;
  secretAccessKey?: string;
  /** `endpoint/bucket/key` instead of `bucket.endpoint/key`, as most servers other than AWS want. */
  forcePathStyle?: boolean;
}

/** What openStore needs beside a target's URL. */
export interface StoreSettings {
  s3?: S3Settings;
}

/** Checked with abortPipeEarly: each check after the first may assume the URL parses. */
const Endpoint = v.pipe(
  v.string(),
  v.check((s) => URL.canParse(s), "must be a URL such as https://s3.example.com or http://127.0.0.1:9000"),
  v.check((s) => ["http:", "https:"].includes(new URL(s).protocol), "must start with http:// or https://"),
  v.check((s) => new URL(s).username === "" && new URL(s).password === "", "must not carry credentials: set the access key settings"),
  v.check((s) => new URL(s).search === "" && new URL(s).hash === "", "must have no query or fragment"),
);
/** AWS's are `eu-west-1` and the like; other servers use names such as `default` or `garage`. */
const Region = v.pipe(v.string(), v.regex(/^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/, "must be a region name such as us-east-1: letters, digits, '-' or '_'"));
/** Printable ASCII without spaces: a key pasted with a newline or a quote is refused here, not by the server. */
const AccessKeyId = v.pipe(v.string(), v.regex(/^[\x21-\x7e]{1,128}$/, "must be 1 to 128 printable characters without spaces"));
const SecretAccessKey = v.pipe(v.string(), v.regex(/^[\x21-\x7e]{1,256}$/, "must be 1 to 256 printable characters without spaces"));

const bothKeysOrNeither = (s: { accessKeyId?: string | undefined; secretAccessKey?: string | undefined }) => (s.accessKeyId === undefined) === (s.secretAccessKey === undefined);

const S3SettingsSchema = v.pipe(
  v.strictObject({
    endpoint: v.optional(Endpoint),
    region: v.optional(Region),
    accessKeyId: v.optional(AccessKeyId),
    secretAccessKey: v.optional(SecretAccessKey),
    forcePathStyle: v.optional(v.boolean("must be true or false")),
  }),
  v.check(bothKeysOrNeither, "give both the access key id and the secret access key, or neither"),
);

/** The S3 settings openStore was given, checked: a bad one is named, never its value when it is the secret. */
export function checkS3Settings(settings: S3Settings): S3Settings {
  const result = v.safeParse(S3SettingsSchema, settings, { abortPipeEarly: true });
  if (result.success) return result.output as S3Settings;
  const problems = result.issues.map((i) => {
    const key = i.path?.[0]?.key;
    return typeof key === "string" ? `${key} ${i.message}` : i.message;
  });
  throw new InvalidRequestError(`invalid S3 settings: ${problems.join("; ")}`);
}

const ENV_NAMES = ["S3_ENDPOINT", "S3_REGION", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY", "S3_FORCE_PATH_STYLE"] as const;
const SECRET_NAMES: ReadonlySet<string> = new Set(["S3_SECRET_ACCESS_KEY"]);

const S3EnvSchema = v.pipe(
  v.object({
    S3_ENDPOINT: v.optional(Endpoint),
    S3_REGION: v.optional(Region),
    S3_ACCESS_KEY_ID: v.optional(AccessKeyId),
    S3_SECRET_ACCESS_KEY: v.optional(SecretAccessKey),
    S3_FORCE_PATH_STYLE: v.optional(v.pipe(v.string(), v.picklist(["true", "false"], "must be true or false"))),
  }),
  v.check((e) => bothKeysOrNeither({ accessKeyId: e.S3_ACCESS_KEY_ID, secretAccessKey: e.S3_SECRET_ACCESS_KEY }), "set both S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY, or neither"),
);

/**
 * The S3 settings from the plugin's environment. Empty values count as unset, as for the
 * other settings. Path style is the default once S3_ENDPOINT is set, since the servers one
 * runs oneself (MinIO, Ceph, Garage) want it; AWS itself wants virtual-host style.
 */
export function s3SettingsFromEnv(env: Readonly<Record<string, string | undefined>> = process.env): S3Settings {
  const picked: Partial<Record<(typeof ENV_NAMES)[number], string>> = {};
  for (const name of ENV_NAMES) {
    const value = env[name]?.trim();
    if (value !== undefined && value !== "") picked[name] = value;
  }
  const result = v.safeParse(S3EnvSchema, picked, { abortPipeEarly: true });
  if (!result.success) {
    const problems = result.issues.map((i) => {
      const key = i.path?.[0]?.key;
      if (typeof key !== "string") return i.message;
      return SECRET_NAMES.has(key) ? `${key}: ${i.message}` : `${key}=${quote(picked[key as (typeof ENV_NAMES)[number]] ?? "")}: ${i.message}`;
    });
    throw new SettingsError(`invalid settings: ${problems.join("; ")}`);
  }
  const e = result.output;
  const pathStyle = e.S3_FORCE_PATH_STYLE === undefined ? (e.S3_ENDPOINT === undefined ? undefined : true) : e.S3_FORCE_PATH_STYLE === "true";
  return {
    ...(e.S3_ENDPOINT !== undefined ? { endpoint: e.S3_ENDPOINT } : {}),
    ...(e.S3_REGION !== undefined ? { region: e.S3_REGION } : {}),
    ...(e.S3_ACCESS_KEY_ID !== undefined ? { accessKeyId: e.S3_ACCESS_KEY_ID } : {}),
    ...(e.S3_SECRET_ACCESS_KEY !== undefined ? { secretAccessKey: e.S3_SECRET_ACCESS_KEY } : {}),
    ...(pathStyle !== undefined ? { forcePathStyle: pathStyle } : {}),
  };
}

/**
 * S3's rules for bucket names that work in both URL styles: 3 to 63 lowercase letters,
 * digits, '.' and '-', starting and ending with a letter or digit, no "..", not an IP address.
 */
const BUCKET = /^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/;
const IPV4 = /^\d{1,3}(\.\d{1,3}){3}$/;

export interface S3Target {
  bucket: string;
  /** "" or segments ending in "/": every key the store writes starts with it. */
  prefix: string;
}

/** The bucket and key prefix of `s3://bucket/prefix`, checked before any request is made. */
export function parseS3Url(url: string): S3Target {
  const usage = "use s3://bucket or s3://bucket/prefix";
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch (err) {
    throw new InvalidRequestError(`invalid backup target ${quote(url)}: ${usage}`, { cause: err });
  }
  if (parsed.protocol !== "s3:") throw new InvalidRequestError(`invalid backup target ${quote(url)}: ${usage}`);
  if (parsed.username !== "" || parsed.password !== "") {
    throw new InvalidRequestError(`invalid backup target ${quote(url)}: credentials do not go in the URL; set S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY`);
  }
  if (parsed.port !== "") throw new InvalidRequestError(`invalid backup target ${quote(url)}: the endpoint and its port go in S3_ENDPOINT, not the URL`);
  if (parsed.search !== "" || parsed.hash !== "") throw new InvalidRequestError(`invalid backup target ${quote(url)}: no query or fragment; ${usage}`);
  const bucket = parsed.hostname;
  if (!BUCKET.test(bucket) || bucket.includes("..") || IPV4.test(bucket)) {
    throw new InvalidRequestError(
      `invalid backup target ${quote(url)}: bucket ${quote(bucket)} is not a valid name (3 to 63 lowercase letters, digits, '.' or '-', starting and ending with a letter or digit)`,
    );
  }
  const path = parsed.pathname.replace(/^\//, "");
  const prefix = path === "" || path.endsWith("/") ? path : `${path}/`;
  try {
    checkPrefix(prefix);
  } catch (err) {
    throw new InvalidRequestError(`invalid backup target ${quote(url)}: the prefix ${quote(path)} must be segments of letters, digits, '_', '.' or '-' joined by '/'`, { cause: err });
  }
  return { bucket, prefix };
}
