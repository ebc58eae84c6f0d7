import {
  DeleteObjectCommand,
  GetObjectCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  type S3ClientConfig,
} from "@aws-sdk/client-s3";
import { quote, ThinvolError } from "../errors.js";
import { checkS3Settings, parseS3Url, type S3Settings } from "./s3-settings.js";
import { describeS3Error, isNotFound } from "./s3-errors.js";
import { checkKey, checkPrefix, isKey, type BackupStore } from "./store.js";

/** S3's most keys per list request. */
export const S3_LIST_PAGE_MAX = 1000;
/** A TCP connection not made by then is a dead or filtered endpoint. */
export const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
/** A request that sends or receives nothing for this long has stalled (not merely a slow link). */
export const DEFAULT_IDLE_TIMEOUT_MS = 60_000;

export interface S3StoreOptions extends S3Settings {
  /** Keys per list request: S3's 1000, fewer to page through a small bucket in tests. */
  listPageSize?: number;
  connectTimeoutMs?: number;
  idleTimeoutMs?: number;
  /** Tries per request, the first included; the SDK's default is 3, with backoff. */
  maxAttempts?: number;
}

/**
 * A store in an S3 bucket, under a key prefix: `s3://bucket/prefix`. One object per key. A
 * PutObject is atomic (a reader sees the old object or the new one) and S3 reads after
 * writes consistently, which is all BackupStore asks.
 */
export class S3Store implements BackupStore {
  readonly bucket: string;
  /** "" or ending in "/": the store's keys are relative to it. */
  readonly prefix: string;
  private readonly client: S3Client;
  private readonly listPageSize: number;
  private readonly endpoint: string;

  constructor(readonly url: string, options: S3StoreOptions = {}) {
    ({ bucket: this.bucket, prefix: this.prefix } = parseS3Url(url));
    const { listPageSize, connectTimeoutMs, idleTimeoutMs, maxAttempts, ...rest } = options;
    const settings = checkS3Settings(rest);
    this.listPageSize = listPageSize ?? S3_LIST_PAGE_MAX;
    if (!Number.isSafeInteger(this.listPageSize) || this.listPageSize < 1 || this.listPageSize > S3_LIST_PAGE_MAX) {
      throw new ThinvolError(`S3 list page size ${this.listPageSize} is not from 1 to ${S3_LIST_PAGE_MAX}`);
    }
    // For messages only: the endpoint the SDK will use when none is given (see S3Settings).
    this.endpoint = settings.endpoint ?? process.env.AWS_ENDPOINT_URL_S3 ?? process.env.AWS_ENDPOINT_URL ?? "S3";
    const config: S3ClientConfig = {
      requestHandler: { connectionTimeout: connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS, socketTimeout: idleTimeoutMs ?? DEFAULT_IDLE_TIMEOUT_MS },
      // Every block carries its SHA-256, checked on each restore and verify; the SDK's extra
      // CRC headers only make servers other than AWS refuse the upload.
      requestChecksumCalculation: "WHEN_REQUIRED",
      responseChecksumValidation: "WHEN_REQUIRED",
      ...(maxAttempts !== undefined ? { maxAttempts } : {}),
      ...(settings.endpoint !== undefined ? { endpoint: settings.endpoint } : {}),
      ...(settings.region !== undefined ? { region: settings.region } : {}),
      ...(settings.forcePathStyle !== undefined ? { forcePathStyle: settings.forcePathStyle } : {}),
      ...(settings.accessKeyId !== undefined && settings.secretAccessKey !== undefined
        ? { credentials: { accessKeyId: settings.accessKeyId, secretAccessKey: settings.secretAccessKey } }
        : {}),
    };
    this.client = new S3Client(config);
  }

  async put(key: string, data: Uint8Array): Promise<void> {
    const name = this.objectKey(key);
    await this.send("store", key, () => this.client.send(new PutObjectCommand({ Bucket: this.bucket, Key: name, Body: data, ContentLength: data.byteLength })));
  }

  async get(key: string): Promise<Uint8Array | undefined> {
    const name = this.objectKey(key);
    return this.send("read", key, async () => {
      try {
        const reply = await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key: name }));
        return await (reply.Body?.transformToByteArray() ?? new Uint8Array());
      } catch (err) {
        if (isNotFound(err, "NoSuchKey")) return undefined;
        throw err;
      }
    });
  }

  /** A HEAD reply has no body: a missing bucket reads as a missing object here, and fails at the first put or list. */
  async has(key: string): Promise<boolean> {
    const name = this.objectKey(key);
    return this.send("look up", key, async () => {
      try {
        await this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: name }));
        return true;
      } catch (err) {
        if (isNotFound(err, "NotFound") || isNotFound(err, "NoSuchKey")) return false;
        throw err;
      }
    });
  }

  /** Every key under `prefix`, page by page. Objects no thinvol could have written (a console's `folder/` marker) are left out. */
  async list(prefix: string): Promise<string[]> {
    checkPrefix(prefix);
    const keys: string[] = [];
    let token: string | undefined;
    do {
      const page = await this.send("list", prefix, () =>
        this.client.send(new ListObjectsV2Command({ Bucket: this.bucket, Prefix: this.prefix + prefix, MaxKeys: this.listPageSize, ...(token !== undefined ? { ContinuationToken: token } : {}) })),
      );
      for (const o of page.Contents ?? []) {
        const key = o.Key?.slice(this.prefix.length);
        if (key !== undefined && isKey(key)) keys.push(key);
      }
      token = page.IsTruncated === true ? page.NextContinuationToken : undefined;
    } while (token !== undefined);
    return keys.sort();
  }

  /** S3 answers a delete of an absent object with success too. */
  async delete(key: string): Promise<void> {
    const name = this.objectKey(key);
    await this.send("delete", key, () => this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key: name })));
  }

  /** Closes the client's idle connections. */
  close(): void {
    this.client.destroy();
  }

  private objectKey(key: string): string {
    checkKey(key);
    return this.prefix + key;
  }

  /** Runs one request; a failure names the target, the key and what went wrong in words a user can act on. */
  private async send<T>(what: string, key: string, request: () => Promise<T>): Promise<T> {
    try {
      return await request();
    } catch (err) {
      const object = what === "list" ? `keys under ${quote(key)}` : quote(key);
      throw new ThinvolError(`cannot ${what} ${object} at ${this.url}: ${describeS3Error(err, { bucket: this.bucket, endpoint: this.endpoint })}`, { cause: err });
    }
  }
}
