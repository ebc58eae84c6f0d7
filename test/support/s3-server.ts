import { CreateBucketCommand, S3Client } from "@aws-sdk/client-s3";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import type { S3Settings } from "../../src/backup/s3-settings.js";

const MAIN = fileURLToPath(new URL("./s3rver-main.mjs", import.meta.url));
const START_TIMEOUT_MS = 15_000;

export interface S3Server {
  endpoint: string;
  bucket: string;
  /** `s3://bucket/prefix`: a target in the bucket, under a prefix. */
  url: string;
  /** What openStore needs to reach the server (any credentials will do for s3rver). */
  settings: S3Settings;
  /** Stops the server and removes its directory. */
  stop(): Promise<void>;
}

/** Starts s3rver in its own process, on a free loopback port and a new directory, and creates `bucket` in it. */
export async function startS3Server(bucket = "thinvol-test", prefix = "backups"): Promise<S3Server> {
  const dir = await mkdtemp(join(tmpdir(), "thinvol-s3rver-"));
  // s3rver's ListObjectsV2 continuation tokens are DES-encrypted, which OpenSSL 3 keeps in its
  // legacy provider: without it every second page of a listing is an InternalError.
  const child = spawn(process.execPath, ["--openssl-legacy-provider", MAIN, dir], { stdio: ["pipe", "pipe", "inherit"] });
  const exited = once(child, "exit");
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill("SIGTERM");
      await exited;
    }
    await rm(dir, { recursive: true, force: true });
  };
  try {
    const port = await readPort(child.stdout, exited);
    const endpoint = `http://127.0.0.1:${port}`;
    const settings: S3Settings = { endpoint, region: "us-east-1", accessKeyId: "S3RVER", secretAccessKey: "S3RVER", forcePathStyle: true };
    const client = new S3Client({ endpoint, region: "us-east-1", forcePathStyle: true, credentials: { accessKeyId: "S3RVER", secretAccessKey: "S3RVER" } });
    try {
      await client.send(new CreateBucketCommand({ Bucket: bucket }));
    } finally {
      client.destroy();
    }
    return { endpoint, bucket, url: `s3://${bucket}/${prefix}`, settings, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

/** The first line the server prints, `{"port":N}`; fails if it exits or stays silent first. */
async function readPort(stdout: NodeJS.ReadableStream, exited: Promise<unknown>): Promise<number> {
  const lines = createInterface({ input: stdout });
  let timer: NodeJS.Timeout | undefined;
  try {
    const line = await Promise.race([
      once(lines, "line").then(([l]) => String(l)),
      exited.then(() => Promise.reject(new Error("s3rver exited before it listened"))),
      new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`s3rver did not listen within ${START_TIMEOUT_MS} ms`)), START_TIMEOUT_MS))),
    ]);
    const { port } = JSON.parse(line) as { port: number };
    return port;
  } finally {
    clearTimeout(timer);
    lines.close();
  }
}
