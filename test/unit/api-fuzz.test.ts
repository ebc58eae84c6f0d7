/**
 * Thousands of malformed and hostile requests against the real protocol layer:
 * every reply is the right success shape or a non-200 `{Err}`, no error or log
 * line quotes more than the cap, and the volume layer is never asked to act on
 * anything invalid. Reproduce a failure with THINVOL_FUZZ_SEED=<seed from the message>.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { MAX_BODY_BYTES, MAX_MOUNT_ID_CHARS, createApp } from "../../src/api/app.js";
import { NotFoundError, QUOTE_MAX_CHARS } from "../../src/errors.js";
import { createLogger } from "../../src/log.js";
import { checkVolumeName, parseCreateOptions } from "../../src/volumes/options.js";
import type { VolumeInfo, VolumeService, VolumeSummary } from "../../src/volumes/types.js";
import { MAX_ERR_CHARS, UNPRINTABLE, prng, quotesPastCap, type Rng } from "../support/hostile.js";

const SEED = Number(process.env["THINVOL_FUZZ_SEED"] ?? 20261125);
const REQUESTS = 5000;
const MAX_LOG_LINE_CHARS = 3000;


/** Records what the protocol layer asks for, and every request it should never have passed on. */
class RecordingVolumes implements VolumeService {
  readonly volumes = new Set<string>();
  readonly creates: { name: string; options: Readonly<Record<string, string>> | null }[] = [];
  readonly invalid: string[] = [];

  private checkName(method: string, name: string) {
    try {
      checkVolumeName(name);
    } catch (err) {
      this.invalid.push(`${method} with ${(err as Error).message}`);
    }
  }
  private checkId(method: string, id: string) {
    if (id.length > MAX_MOUNT_ID_CHARS || /[\u0000-\u001f\u007f]/.test(id)) this.invalid.push(`${method} with ID ${JSON.stringify(id.slice(0, 80))}`);
  }
  async create(name: string, options: Readonly<Record<string, string>> | null) {
    this.checkName("create", name);
    try {
      parseCreateOptions(name, options);
    } catch (err) {
      this.invalid.push(`create with ${(err as Error).message}`);
    }
    this.creates.push({ name, options });
    this.volumes.add(name);
  }
  async remove(name: string) {
    this.checkName("remove", name);
    this.volumes.delete(name);
  }
  private need(name: string) {
    if (!this.volumes.has(name)) throw new NotFoundError(`volume "${name}" does not exist`);
  }
  async mount(name: string, id: string) {
    this.checkName("mount", name);
    this.checkId("mount", id);
    this.need(name);
    return `/mnt/thinvol/${name}`;
  }
  async unmount(name: string, id: string) {
    this.checkName("unmount", name);
    this.checkId("unmount", id);
    this.need(name);
  }
  async path(name: string) {
    this.checkName("path", name);
    this.need(name);
    return undefined;
  }
  async get(name: string): Promise<VolumeInfo> {
    this.checkName("get", name);
    this.need(name);
    return { name, createdAt: "2026-01-02T03:04:05.000Z", status: {} };
  }
  async list(): Promise<VolumeSummary[]> {
    return [...this.volumes].map((name) => ({ name, createdAt: "2026-01-02T03:04:05.000Z" }));
  }
}

const METHODS = [
  "Plugin.Activate",
  "VolumeDriver.Capabilities",
  "VolumeDriver.Create",
  "VolumeDriver.Remove",
  "VolumeDriver.Mount",
  "VolumeDriver.Unmount",
  "VolumeDriver.Path",
  "VolumeDriver.Get",
  "VolumeDriver.List",
] as const;
const WITH_ARGUMENTS = new Set<string>(["VolumeDriver.Create", "VolumeDriver.Remove", "VolumeDriver.Mount", "VolumeDriver.Unmount", "VolumeDriver.Path", "VolumeDriver.Get"]);

/** Strings a hostile or careless caller sends: long, control characters, unicode, traversal, prototype keys. */
function hostileString(r: Rng): string {
  switch (r.int(14)) {
    case 0:
      return r.pick(["db", "v1", "a", "data-1.x", "A_b"]);
    case 1:
      return "";
    case 2:
      return r.pick(["..", "../etc", "a/b", "/", ".hidden", "-x", "a b", "x\u0000y", "ä", "😀", "a\nb"]);
    case 3:
      return r.pick(["__proto__", "constructor", "prototype", "toString", "hasOwnProperty", "valueOf"]);
    case 4:
      return "x".repeat(r.pick([64, 65, 96, 97, 256, 257, 5000, 100_000]));
    case 5:
      return "\u001b[31m" + "\n".repeat(r.int(5)) + "forged log line 2026-01-01T00:00:00Z info ready";
    case 6:
      return "1" + " ".repeat(r.pick([10, 1000, 50_000])) + "x"; // quadratic for a naive size pattern
    case 7:
      return "\u202e\u2028\u2029\ufeff\u0085" + "b".repeat(r.int(200));
    case 8:
      return String.fromCharCode(...Array.from({ length: r.int(100) }, () => r.int(0x10000)));
    case 9:
      return "\ud800" + "z".repeat(r.int(100));
    case 10:
      return r.pick(["1G", "64M", "ext4", "xfs", "755", "noatime,nodev", "1000", "-1", "1e9", "99999999999999"]);
    case 11:
      return r.pick(["a", "f"]).repeat(64);
    case 12:
      return "%s%n%x${x}`id`$(id);" + "q".repeat(r.int(80));
    default:
      return Array.from({ length: r.int(40) }, () => String.fromCharCode(32 + r.int(95))).join("");
  }
}

function hostileValue(r: Rng, depth = 0): unknown {
  switch (r.int(depth > 2 ? 6 : 9)) {
    case 0:
      return null;
    case 1:
      return r.pick([0, -1, 1.5, 1e308, Number.MAX_SAFE_INTEGER]);
    case 2:
      return r.pick([true, false]);
    case 3:
    case 4:
    case 5:
      return hostileString(r);
    case 6:
      return Array.from({ length: r.int(4) }, () => hostileValue(r, depth + 1));
    default:
      return hostileOpts(r, depth + 1);
  }
}

const OPTION_KEYS = ["size", "fs", "from", "uid", "gid", "mode", "mountopts"];

function hostileOpts(r: Rng, depth = 0): unknown {
  const kind = r.int(10);
  if (kind === 0) return null;
  if (kind === 1) return r.pick([[], ["size", "1G"], "size=1G", 7]);
  const opts: Record<string, unknown> = {};
  for (let i = r.int(kind === 2 ? 300 : 4); i > 0; i--) {
    const key = r.next() < 0.6 ? r.pick(OPTION_KEYS) : hostileString(r);
    // Defined, not assigned: as JSON.parse does, so `__proto__` is an own key.
    Object.defineProperty(opts, key, { value: r.next() < 0.7 ? hostileString(r) : hostileValue(r, depth), enumerable: true, configurable: true, writable: true });
  }
  return opts;
}

function nested(r: Rng): string {
  const depth = r.pick([100, 10_000, 100_000]);
  return r.next() < 0.5 ? "[".repeat(depth) + "]".repeat(depth) : '{"Name":'.repeat(depth) + '"x"' + "}".repeat(depth);
}

interface Sent {
  method: string;
  httpMethod: string;
  body: string | Uint8Array;
  /** The object sent, when it was a JSON object. */
  json?: Record<string, unknown>;
  /** Every string in it, to check that none is quoted past the cap. */
  strings: string[];
}

function collectStrings(x: unknown, out: string[]): void {
  if (typeof x === "string") out.push(x);
  else if (Array.isArray(x)) for (const i of x) collectStrings(i, out);
  else if (typeof x === "object" && x !== null) {
    for (const [k, val] of Object.entries(x)) {
      out.push(k);
      collectStrings(val, out);
    }
  }
}

function hostileRequest(r: Rng): Sent {
  const method = r.next() < 0.05 ? r.pick(["VolumeDriver.Frobnicate", "", "volumedriver.create", "VolumeDriver.Create/..", hostileString(r).replace(/[^\x21-\x7e]/g, "")]) : r.pick(METHODS);
  const httpMethod = r.next() < 0.05 ? r.pick(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"]) : "POST";
  const kind = r.int(20);
  if (kind === 0) return { method, httpMethod, body: "", strings: [] };
  if (kind === 1) return { method, httpMethod, body: r.pick(["[]", "null", "42", '"db"', "true", "{", '{"Name":', "\u0000", " \n\t "]), strings: [] };
  if (kind === 2) return { method, httpMethod, body: Uint8Array.from({ length: r.int(300) }, () => r.int(256)), strings: [] };
  if (kind === 3) return { method, httpMethod, body: nested(r), strings: [] };
  if (kind === 4 && r.next() < 0.2) return { method, httpMethod, body: "{" + " ".repeat(MAX_BODY_BYTES) + "}", strings: [] };
  const json: Record<string, unknown> = {};
  const roll = r.next();
  json["Name"] = roll < 0.45 ? r.pick(["db", "v1", "data-1.x", "A_b"]) : roll < 0.9 ? hostileString(r) : hostileValue(r);
  if (r.next() < 0.7) {
    const opts: Record<string, unknown> = { size: r.pick(["1G", "64M", "2T"]), ...(r.next() < 0.5 ? { fs: "xfs" } : {}) };
    // Valid options but for one key a schema library might drop on the way.
    if (r.next() < 0.2) Object.defineProperty(opts, r.pick(["__proto__", "constructor", "prototype"]), { value: "x", enumerable: true });
    json["Opts"] = r.next() < 0.5 ? opts : hostileOpts(r);
  }
  if (r.next() < 0.7) json["ID"] = r.next() < 0.5 ? r.pick(["c1", "f".repeat(64), "a".repeat(MAX_MOUNT_ID_CHARS)]) : r.next() < 0.7 ? hostileString(r) : hostileValue(r);
  if (r.next() < 0.1) json["Extra"] = hostileValue(r);
  let body = JSON.stringify(json);
  if (kind === 5) body = body.slice(0, r.int(body.length)); // truncated
  if (kind === 6) body = body.replace("{", `{"Name":${JSON.stringify(hostileString(r))},`); // duplicate key
  const strings: string[] = [];
  collectStrings(json, strings);
  return { method, httpMethod, body, json, strings };
}

/** What a successful reply to each method must look like. */
function isSuccessShape(method: string, body: Record<string, unknown>): boolean {
  const keys = Object.keys(body).sort().join(",");
  switch (method) {
    case "Plugin.Activate":
      return JSON.stringify(body) === '{"Implements":["VolumeDriver"]}';
    case "VolumeDriver.Capabilities":
      return JSON.stringify(body) === '{"Capabilities":{"Scope":"local"}}';
    case "VolumeDriver.Create":
    case "VolumeDriver.Remove":
    case "VolumeDriver.Unmount":
      return keys === "";
    case "VolumeDriver.Mount":
      return keys === "Mountpoint" && typeof body["Mountpoint"] === "string";
    case "VolumeDriver.Path":
      return keys === "" || (keys === "Mountpoint" && typeof body["Mountpoint"] === "string");
    case "VolumeDriver.Get": {
      const v = body["Volume"] as Record<string, unknown> | undefined;
      return keys === "Volume" && typeof v?.["Name"] === "string" && typeof v["CreatedAt"] === "string";
    }
    case "VolumeDriver.List":
      return keys === "Volumes" && Array.isArray(body["Volumes"]);
    default:
      return false;
  }
}

/** Whether `text` holds more than the cap of consecutive characters of `input`, raw or JSON-escaped. */


test(`${REQUESTS} hostile requests: each gets the right reply shape or a short {Err}, and nothing invalid reaches the volume layer`, async () => {
  const r = prng(SEED);
  const svc = new RecordingVolumes();
  const lines: string[] = [];
  const app = createApp(svc, createLogger("info", (l) => lines.push(l)));
  const at = (i: number, sent: Sent) =>
    `seed ${SEED}, request ${i}: ${sent.httpMethod} /${sent.method} ${typeof sent.body === "string" ? JSON.stringify(sent.body.slice(0, 120)) : `<${sent.body.length} bytes>`}`;
  let served = 0;

  for (let i = 0; i < REQUESTS; i++) {
    const sent = hostileRequest(r);
    const creates = svc.creates.length;
    const logged = lines.length;
    const init: RequestInit = { method: sent.httpMethod, headers: { Accept: "application/vnd.docker.plugins.v1.2+json" } };
    if (sent.httpMethod !== "GET") init.body = sent.body;
    const res = await app.request(`/${sent.method}`, init);
    const text = await res.text();
    let body: Record<string, unknown>;
    try {
      body = JSON.parse(text) as Record<string, unknown>;
    } catch {
      assert.fail(`${at(i, sent)}: the reply is not JSON: ${text.slice(0, 200)}`);
    }

    const size = typeof sent.body === "string" ? Buffer.byteLength(sent.body) : sent.body.length;
    if (size > MAX_BODY_BYTES && sent.httpMethod === "POST" && res.status !== 404) assert.equal(res.status, 413, `${at(i, sent)}: a body over the limit`);
    if (res.status === 200) {
      assert.ok(isSuccessShape(sent.method, body), `${at(i, sent)}: a 200 with the wrong shape: ${text.slice(0, 300)}`);
      if (WITH_ARGUMENTS.has(sent.method)) served++;
      if (sent.method === "VolumeDriver.Create") {
        // Every option sent reached the volume layer: none was dropped on the way (`__proto__`).
        const got = svc.creates.at(-1);
        const opts = sent.json?.["Opts"];
        assert.equal(svc.creates.length, creates + 1, at(i, sent));
        assert.deepEqual({ ...(got?.options ?? {}) }, { ...(opts === null || opts === undefined ? {} : (opts as object)) }, at(i, sent));
      }
    } else {
      assert.ok(res.status >= 400, `${at(i, sent)}: status ${res.status}`);
      const err = body["Err"];
      assert.ok(typeof err === "string" && err.trim() !== "", `${at(i, sent)}: no Err in ${text.slice(0, 200)}`);
      assert.ok(err.length <= MAX_ERR_CHARS, `${at(i, sent)}: an Err of ${err.length} characters: ${err.slice(0, 300)}`);
      assert.ok(!UNPRINTABLE.test(err), `${at(i, sent)}: Err holds an unprintable character: ${JSON.stringify(err.slice(0, 300))}`);
      for (const s of sent.strings) assert.ok(!quotesPastCap(err, s), `${at(i, sent)}: Err quotes more than ${QUOTE_MAX_CHARS} characters of input: ${err.slice(0, 300)}`);
      assert.equal(svc.creates.length, creates, `${at(i, sent)}: a refused request created something`);
    }

    for (const line of lines.slice(logged)) {
      assert.ok(line.length <= MAX_LOG_LINE_CHARS, `${at(i, sent)}: a log line of ${line.length} characters`);
      assert.ok(!UNPRINTABLE.test(line), `${at(i, sent)}: a log line holds an unprintable character: ${JSON.stringify(line.slice(0, 300))}`);
      for (const s of sent.strings) assert.ok(!quotesPastCap(line, s), `${at(i, sent)}: the log quotes more than ${QUOTE_MAX_CHARS} characters of input`);
    }
    assert.deepEqual(svc.invalid, [], at(i, sent));
  }
  // The generator must reach past the parser often enough for the test to mean something.
  assert.ok(served > REQUESTS / 20, `seed ${SEED}: only ${served} requests with arguments succeeded`);
  assert.ok(svc.creates.length > 50, `seed ${SEED}: only ${svc.creates.length} volumes created`);
});
