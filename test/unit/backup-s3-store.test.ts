import assert from "node:assert/strict";
import { createServer, type Server, type Socket } from "node:net";
import { after, before, test } from "node:test";
import { s3SettingsFromEnv, parseS3Url } from "../../src/backup/s3-settings.js";
import { S3Store } from "../../src/backup/s3-store.js";
import { openStore } from "../../src/backup/store.js";
import { InvalidRequestError, ThinvolError } from "../../src/errors.js";
import { SettingsError } from "../../src/settings.js";
import { startS3Server, type S3Server } from "../support/s3-server.js";
import { BAD_KEYS, backupStoreContract } from "../support/store-contract.js";

let server: S3Server;
before(async () => {
  server = await startS3Server();
});
after(() => server.stop());

/** Each store gets its own prefix in the one bucket: an empty store, as a new target is. */
let stores = 0;
/** Few keys per list request, so that 30 keys take several pages. */
const PAGE = 7;
backupStoreContract("an S3 store", async () => {
  const store = new S3Store(`${server.url}/contract-${++stores}`, { ...server.settings, listPageSize: PAGE });
  return { store, close: async () => store.close() };
});

test("an S3 store keeps its keys under its prefix; another prefix in the bucket does not see them", async () => {
  const a = new S3Store(`s3://${server.bucket}/team-a/nightly`, server.settings);
  const b = new S3Store(`s3://${server.bucket}/team-b`, server.settings);
  const whole = new S3Store(`s3://${server.bucket}`, { ...server.settings, listPageSize: 2 });
  try {
    await a.put("blocks/aa/bb/x", Buffer.from("a"));
    await b.put("blocks/aa/bb/x", Buffer.from("b"));
    assert.deepEqual(await a.list(""), ["blocks/aa/bb/x"]);
    assert.equal(Buffer.from((await b.get("blocks/aa/bb/x")) ?? []).toString(), "b");
    const all = await whole.list("");
    assert.ok(all.includes("team-a/nightly/blocks/aa/bb/x") && all.includes("team-b/blocks/aa/bb/x"), all.join(" "));
    await a.delete("blocks/aa/bb/x");
    assert.equal(await b.has("blocks/aa/bb/x"), true);
  } finally {
    for (const s of [a, b, whole]) s.close();
  }
});

test("an S3 store checks keys before any request: a bad key is refused as such even with no server", async () => {
  const store = new S3Store("s3://nowhere/x", { endpoint: "http://127.0.0.1:1", region: "us-east-1", accessKeyId: "a", secretAccessKey: "b", maxAttempts: 1 });
  try {
    for (const key of BAD_KEYS) await assert.rejects(store.put(key, Buffer.from("x")), InvalidRequestError, key);
    await assert.rejects(store.list("blocks"), InvalidRequestError);
  } finally {
    store.close();
  }
});

test("a missing bucket is named as such, with the target and the key", async () => {
  const store = new S3Store("s3://no-such-bucket/p", server.settings);
  try {
    const missing = /^ThinvolError: cannot store "locks\/x\.json" at s3:\/\/no-such-bucket\/p: bucket "no-such-bucket" does not exist at http:\/\/127\.0\.0\.1:\d+; create it first$/;
    await assert.rejects(store.put("locks/x.json", Buffer.from("{}")), missing);
    await assert.rejects(store.list("backups/"), /cannot list keys under "backups\/" at s3:\/\/no-such-bucket\/p: bucket "no-such-bucket" does not exist/);
    await assert.rejects(store.get("backups/v/1.json"), /cannot read "backups\/v\/1\.json" at .*does not exist/);
  } finally {
    store.close();
  }
});

test("credentials the server does not know are named as the problem", async () => {
  const store = new S3Store(server.url, { ...server.settings, accessKeyId: "NOBODY", maxAttempts: 1 });
  try {
    await assert.rejects(store.put("locks/x.json", Buffer.from("{}")), (err: Error) => {
      assert.ok(err instanceof ThinvolError);
      assert.match(err.message, /^cannot store "locks\/x\.json" at s3:\/\/thinvol-test\/backups: http:\/\/127\.0\.0\.1:\d+ refused the credentials \(InvalidAccessKeyId \(HTTP 403\): .*\); check S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY$/);
      assert.doesNotMatch(err.message, /S3RVER/); // the secret is never shown
      return true;
    });
  } finally {
    store.close();
  }
});

test("an endpoint that refuses connections fails quickly and says so, after the SDK's retries", async () => {
  const store = new S3Store("s3://bucket/p", { ...server.settings, endpoint: "http://127.0.0.1:1" });
  const started = Date.now();
  try {
    await assert.rejects(store.has("blocks/aa/bb/c"), /^ThinvolError: cannot look up "blocks\/aa\/bb\/c" at s3:\/\/bucket\/p: cannot reach http:\/\/127\.0\.0\.1:1 \(ECONNREFUSED\); check S3_ENDPOINT and that the server is up$/);
  } finally {
    store.close();
  }
  const ms = Date.now() - started;
  console.log(`connection refused: failed after ${ms} ms (3 attempts)`);
  assert.ok(ms < 5000, `${ms} ms`);
});

test("an endpoint that accepts connections and never answers times out instead of hanging", async () => {
  const sockets = new Set<Socket>();
  const silent: Server = createServer((s) => sockets.add(s));
  await new Promise<void>((r) => silent.listen(0, "127.0.0.1", r));
  const { port } = silent.address() as { port: number };
  const store = new S3Store("s3://bucket/p", { ...server.settings, endpoint: `http://127.0.0.1:${port}`, idleTimeoutMs: 300, maxAttempts: 2 });
  const started = Date.now();
  try {
    await assert.rejects(store.get("backups/v/1.json"), /^ThinvolError: cannot read "backups\/v\/1\.json" at s3:\/\/bucket\/p: http:\/\/127\.0\.0\.1:\d+ did not answer in time/);
  } finally {
    store.close();
    for (const s of sockets) s.destroy();
    silent.close();
  }
  const ms = Date.now() - started;
  console.log(`silent endpoint: failed after ${ms} ms (2 attempts, 300 ms idle timeout)`);
  assert.ok(ms < 5000, `${ms} ms`);
});

test("no region and no credentials anywhere are named as the problem, before any connection", async () => {
  // Nothing for the SDK to find: no AWS_* variables, no ~/.aws files, no instance metadata.
  const saved = { ...process.env };
  for (const name of Object.keys(process.env)) if (name.startsWith("AWS_")) delete process.env[name];
  Object.assign(process.env, { AWS_CONFIG_FILE: "/nonexistent", AWS_SHARED_CREDENTIALS_FILE: "/nonexistent", AWS_EC2_METADATA_DISABLED: "true" });
  const noRegion = new S3Store("s3://bucket/p", { endpoint: server.endpoint, accessKeyId: "S3RVER", secretAccessKey: "S3RVER" });
  const noKeys = new S3Store("s3://bucket/p", { endpoint: server.endpoint, region: "us-east-1" });
  try {
    await assert.rejects(noRegion.has("a/b"), /^ThinvolError: cannot look up "a\/b" at s3:\/\/bucket\/p: no S3 region: set S3_REGION \(or AWS_REGION\)$/);
    await assert.rejects(noKeys.put("a/b", Buffer.from("x")), /^ThinvolError: cannot store "a\/b" at s3:\/\/bucket\/p: no S3 credentials found: set S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY/);
  } finally {
    noRegion.close();
    noKeys.close();
    for (const name of Object.keys(process.env)) if (!(name in saved)) delete process.env[name];
    Object.assign(process.env, saved);
  }
});

test("s3:// URLs: bucket and prefix are checked before any request", () => {
  assert.deepEqual(parseS3Url("s3://my-bucket"), { bucket: "my-bucket", prefix: "" });
  assert.deepEqual(parseS3Url("s3://my-bucket/"), { bucket: "my-bucket", prefix: "" });
  assert.deepEqual(parseS3Url("s3://my.bucket.1/thinvol"), { bucket: "my.bucket.1", prefix: "thinvol/" });
  assert.deepEqual(parseS3Url("s3://abc/a/b_c/d-e.f/"), { bucket: "abc", prefix: "a/b_c/d-e.f/" });
  const bad: [string, RegExp][] = [
    ["s3://ab/x", /bucket "ab" is not a valid name \(3 to 63 lowercase letters/],
    [`s3://${"a".repeat(64)}`, /is not a valid name/],
    ["s3://My-Bucket/x", /bucket "My-Bucket" is not a valid name/],
    ["s3://my_bucket/x", /is not a valid name/],
    ["s3://-bucket/x", /is not a valid name/],
    ["s3://bucket-/x", /is not a valid name/],
    ["s3://my..bucket/x", /is not a valid name/],
    ["s3://192.168.1.1/x", /is not a valid name/],
    ["s3:///x", /bucket "" is not a valid name/],
    ["s3://bucket/a//b", /the prefix "a\/\/b" must be segments/],
    ["s3://bucket/.hidden", /the prefix ".hidden" must be segments/],
    ["s3://bucket/a%20b", /the prefix "a%20b" must be segments/],
    ["s3://key:secret@bucket/x", /credentials do not go in the URL/],
    ["s3://bucket:9000/x", /the endpoint and its port go in S3_ENDPOINT/],
    ["s3://bucket/x?versionId=1", /no query or fragment/],
    ["s3://bucket/x#y", /no query or fragment/],
    ["file:///x", /use s3:\/\/bucket or s3:\/\/bucket\/prefix/],
  ];
  for (const [url, message] of bad) assert.throws(() => parseS3Url(url), (err: Error) => err instanceof InvalidRequestError && message.test(err.message), url);
  // openStore refuses them the same way, and bad settings too, before making a client.
  assert.throws(() => openStore("s3://ab/x"), /is not a valid name/);
  assert.throws(() => openStore("s3://bucket/x", { s3: { accessKeyId: "only-half" } }), /invalid S3 settings: give both the access key id and the secret access key, or neither/);
  assert.throws(() => openStore("s3://bucket/x", { s3: { endpoint: "ftp://host" } }), /invalid S3 settings: endpoint must start with http:\/\/ or https:\/\//);
});

test("S3 settings from the environment: names, defaults and clear refusals", () => {
  assert.deepEqual(s3SettingsFromEnv({}), {});
  assert.deepEqual(s3SettingsFromEnv({ S3_REGION: "eu-west-1", S3_ENDPOINT: "" }), { region: "eu-west-1" });
  // With an endpoint, path style unless told otherwise: MinIO, Ceph and the like want it.
  assert.deepEqual(s3SettingsFromEnv({ S3_ENDPOINT: "http://minio:9000", S3_ACCESS_KEY_ID: "AKID", S3_SECRET_ACCESS_KEY: "s3cr3t/+=" }), {
    endpoint: "http://minio:9000",
    accessKeyId: "AKID",
    secretAccessKey: "s3cr3t/+=",
    forcePathStyle: true,
  });
  assert.deepEqual(s3SettingsFromEnv({ S3_ENDPOINT: "https://s3.example.com", S3_FORCE_PATH_STYLE: "false" }), { endpoint: "https://s3.example.com", forcePathStyle: false });
  assert.deepEqual(s3SettingsFromEnv({ S3_FORCE_PATH_STYLE: " true " }), { forcePathStyle: true });
  // Other variables (the SDK's own AWS_* among them) are not read here.
  assert.deepEqual(s3SettingsFromEnv({ AWS_REGION: "us-west-2", AWS_ACCESS_KEY_ID: "x" }), {});

  const refused: [Record<string, string>, RegExp][] = [
    [{ S3_ENDPOINT: "minio:9000" }, /^invalid settings: S3_ENDPOINT="minio:9000": must (be a URL|start with http)/],
    [{ S3_ENDPOINT: "not a url" }, /S3_ENDPOINT="not a url": must be a URL such as https:\/\/s3\.example\.com/],
    [{ S3_ENDPOINT: "ftp://host" }, /S3_ENDPOINT="ftp:\/\/host": must start with http:\/\/ or https:\/\//],
    [{ S3_ENDPOINT: "http://k:s@host" }, /must not carry credentials/],
    [{ S3_REGION: "eu west" }, /S3_REGION="eu west": must be a region name/],
    [{ S3_FORCE_PATH_STYLE: "yes" }, /S3_FORCE_PATH_STYLE="yes": must be true or false/],
    [{ S3_ACCESS_KEY_ID: "AKID" }, /set both S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY, or neither/],
    [{ S3_SECRET_ACCESS_KEY: "s3cr3t" }, /set both S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY, or neither/],
    [{ S3_ACCESS_KEY_ID: "has space", S3_SECRET_ACCESS_KEY: "x" }, /S3_ACCESS_KEY_ID="has space": must be 1 to 128 printable characters/],
  ];
  for (const [env, message] of refused) assert.throws(() => s3SettingsFromEnv(env), (err: Error) => err instanceof SettingsError && message.test(err.message), JSON.stringify(env));
  // A bad secret is named, never shown.
  assert.throws(() => s3SettingsFromEnv({ S3_ACCESS_KEY_ID: "AKID", S3_SECRET_ACCESS_KEY: "top secret" }), (err: Error) => {
    assert.match(err.message, /S3_SECRET_ACCESS_KEY: must be 1 to 256 printable characters/);
    assert.doesNotMatch(err.message, /top secret/);
    return true;
  });
});
