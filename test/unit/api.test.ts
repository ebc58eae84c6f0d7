import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { MAX_BODY_BYTES, MAX_MOUNT_ID_CHARS, createApp } from "../../src/api/app.js";
import { NoSpaceError, NotFoundError, QUOTE_MAX_CHARS } from "../../src/errors.js";
import { silentLogger } from "../../src/log.js";
import { checkVolumeName, parseCreateOptions } from "../../src/volumes/options.js";
import type { VolumeInfo, VolumeService, VolumeSummary } from "../../src/volumes/types.js";

/** A volume service that keeps volumes in memory and validates like the real one. */
class FakeVolumes implements VolumeService {
  readonly calls: string[] = [];
  readonly volumes = new Map<string, { mounts: Map<string, number> }>();

  async create(name: string, options: Readonly<Record<string, string>> | null) {
    this.calls.push(`create ${name} ${JSON.stringify(options)}`);
    checkVolumeName(name);
    parseCreateOptions(name, options);
    if (!this.volumes.has(name)) this.volumes.set(name, { mounts: new Map() });
  }
  async remove(name: string) {
    this.calls.push(`remove ${name}`);
    this.volumes.delete(checkVolumeName(name));
  }
  private need(name: string) {
    const v = this.volumes.get(checkVolumeName(name));
    if (!v) throw new NotFoundError(`volume "${name}" does not exist`);
    return v;
  }
  async mount(name: string, id: string) {
    this.calls.push(`mount ${name} ${id}`);
    const v = this.need(name);
    v.mounts.set(id, (v.mounts.get(id) ?? 0) + 1);
    return `/mnt/thinvol/${name}`;
  }
  async unmount(name: string, id: string) {
    this.calls.push(`unmount ${name} ${id}`);
    this.need(name).mounts.delete(id);
  }
  async path(name: string) {
    return this.need(name).mounts.size > 0 ? `/mnt/thinvol/${name}` : undefined;
  }
  async get(name: string): Promise<VolumeInfo> {
    const v = this.need(name);
    const info: VolumeInfo = { name, createdAt: "2026-01-02T03:04:05.000Z", status: { size: "64 MiB", filesystem: "ext4" } };
    if (v.mounts.size > 0) info.mountpoint = `/mnt/thinvol/${name}`;
    return info;
  }
  async list(): Promise<VolumeSummary[]> {
    return [...this.volumes.keys()].map((name) => ({ name, createdAt: "2026-01-02T03:04:05.000Z" }));
  }
}

/** Sends a request the way the Docker daemon does: POST, no Content-Type, the plugin Accept header. */
async function call(app: ReturnType<typeof createApp>, method: string, body?: string) {
  const init: RequestInit = { method: "POST", headers: { Accept: "application/vnd.docker.plugins.v1.2+json" } };
  if (body !== undefined) init.body = body;
  const res = await app.request(`/${method}`, init);
  return { status: res.status, json: (await res.json()) as Record<string, unknown> };
}

describe("Docker VolumeDriver protocol", () => {
  test("Plugin.Activate with an empty body says it implements VolumeDriver", async () => {
    const app = createApp(new FakeVolumes(), silentLogger);
    assert.deepEqual(await call(app, "Plugin.Activate"), { status: 200, json: { Implements: ["VolumeDriver"] } });
  });

  test("Capabilities are local", async () => {
    const app = createApp(new FakeVolumes(), silentLogger);
    assert.deepEqual((await call(app, "VolumeDriver.Capabilities", "{}")).json, { Capabilities: { Scope: "local" } });
  });

  test("Create without Content-Type and with Opts null creates the volume", async () => {
    const svc = new FakeVolumes();
    const app = createApp(svc, silentLogger);
    const res = await call(app, "VolumeDriver.Create", JSON.stringify({ Name: "db", Opts: null }));
    assert.deepEqual(res, { status: 200, json: {} });
    assert.ok(svc.volumes.has("db"));
  });

  test("Create passes the options through", async () => {
    const svc = new FakeVolumes();
    const app = createApp(svc, silentLogger);
    await call(app, "VolumeDriver.Create", JSON.stringify({ Name: "db", Opts: { size: "1G", fs: "xfs" } }));
    assert.deepEqual(svc.calls, [`create db {"size":"1G","fs":"xfs"}`]);
  });

  test("an unknown option is an error that lists the allowed options, and nothing is created", async () => {
    const svc = new FakeVolumes();
    const app = createApp(svc, silentLogger);
    const res = await call(app, "VolumeDriver.Create", JSON.stringify({ Name: "db", Opts: { color: "red" } }));
    assert.equal(res.status, 500);
    assert.match(String(res.json["Err"]), /unknown option "color".*size, fs, from, backup, uid, gid, mode, mountopts/);
    assert.equal(svc.volumes.size, 0);
  });

  for (const bad of ["../x", "a/b", "", ".hidden", "-x", "a b", "x".repeat(97)]) {
    test(`the name ${JSON.stringify(bad.length > 20 ? bad.slice(0, 8) + "…" : bad)} is refused with a clear error`, async () => {
      const svc = new FakeVolumes();
      const app = createApp(svc, silentLogger);
      const res = await call(app, "VolumeDriver.Create", JSON.stringify({ Name: bad }));
      assert.equal(res.status, 500);
      assert.match(String(res.json["Err"]), /invalid volume name/);
      assert.equal(svc.volumes.size, 0);
    });
  }

  test("malformed JSON is an error, not a crash", async () => {
    const app = createApp(new FakeVolumes(), silentLogger);
    const res = await call(app, "VolumeDriver.Create", "{not json");
    assert.equal(res.status, 500);
    assert.match(String(res.json["Err"]), /not JSON/);
  });

  test("a missing Name is an error", async () => {
    const app = createApp(new FakeVolumes(), silentLogger);
    const res = await call(app, "VolumeDriver.Get", "");
    assert.equal(res.status, 500);
    assert.match(String(res.json["Err"]), /Name/);
  });

  test("Mount returns the mountpoint, Path reports it, Unmount and Path then omit it", async () => {
    const svc = new FakeVolumes();
    const app = createApp(svc, silentLogger);
    await call(app, "VolumeDriver.Create", JSON.stringify({ Name: "v" }));
    assert.deepEqual((await call(app, "VolumeDriver.Mount", JSON.stringify({ Name: "v", ID: "c1" }))).json, { Mountpoint: "/mnt/thinvol/v" });
    assert.deepEqual((await call(app, "VolumeDriver.Path", JSON.stringify({ Name: "v" }))).json, { Mountpoint: "/mnt/thinvol/v" });
    assert.deepEqual((await call(app, "VolumeDriver.Unmount", JSON.stringify({ Name: "v", ID: "c1" }))).json, {});
    assert.deepEqual((await call(app, "VolumeDriver.Path", JSON.stringify({ Name: "v" }))).json, {});
  });

  test("Get returns the volume with an RFC 3339 CreatedAt and a Status", async () => {
    const svc = new FakeVolumes();
    const app = createApp(svc, silentLogger);
    await call(app, "VolumeDriver.Create", JSON.stringify({ Name: "v" }));
    const res = await call(app, "VolumeDriver.Get", JSON.stringify({ Name: "v" }));
    assert.deepEqual(res.json, {
      Volume: { Name: "v", CreatedAt: "2026-01-02T03:04:05.000Z", Status: { size: "64 MiB", filesystem: "ext4" } },
    });
  });

  test("Get of a missing volume is an error naming it", async () => {
    const app = createApp(new FakeVolumes(), silentLogger);
    const res = await call(app, "VolumeDriver.Get", JSON.stringify({ Name: "nope" }));
    assert.equal(res.status, 500);
    assert.equal(res.json["Err"], 'volume "nope" does not exist');
  });

  test("List returns every volume", async () => {
    const svc = new FakeVolumes();
    const app = createApp(svc, silentLogger);
    await call(app, "VolumeDriver.Create", JSON.stringify({ Name: "a" }));
    await call(app, "VolumeDriver.Create", JSON.stringify({ Name: "b" }));
    const res = await call(app, "VolumeDriver.List", "{}");
    assert.deepEqual(res.json, {
      Volumes: [
        { Name: "a", CreatedAt: "2026-01-02T03:04:05.000Z" },
        { Name: "b", CreatedAt: "2026-01-02T03:04:05.000Z" },
      ],
    });
  });

  test("Remove is idempotent", async () => {
    const svc = new FakeVolumes();
    const app = createApp(svc, silentLogger);
    await call(app, "VolumeDriver.Create", JSON.stringify({ Name: "a" }));
    assert.equal((await call(app, "VolumeDriver.Remove", JSON.stringify({ Name: "a" }))).status, 200);
    assert.equal((await call(app, "VolumeDriver.Remove", JSON.stringify({ Name: "a" }))).status, 200);
  });

  test("an unknown method gets a 404 with an Err", async () => {
    const app = createApp(new FakeVolumes(), silentLogger);
    const res = await call(app, "VolumeDriver.Frobnicate", "{}");
    assert.equal(res.status, 404);
    assert.match(String(res.json["Err"]), /does not implement/);
  });

  test("every request is logged with method, volume, outcome and duration", async () => {
    const lines: string[] = [];
    const { createLogger } = await import("../../src/log.js");
    const app = createApp(new FakeVolumes(), createLogger("info", (l) => lines.push(l)));
    await call(app, "VolumeDriver.Get", JSON.stringify({ Name: "ghost" }));
    assert.equal(lines.length, 1);
    assert.match(lines[0] ?? "", /request method=VolumeDriver.Get volume=ghost outcome=error ms=\d+ error=/);
  });

  test("an error thrown by the service reaches the user word for word", async () => {
    const svc = new FakeVolumes();
    svc.create = async () => {
      throw new NoSpaceError('cannot create volume "x": the loop pool has 3.0% free');
    };
    const res = await call(createApp(svc, silentLogger), "VolumeDriver.Create", JSON.stringify({ Name: "x", Opts: { size: "1G" } }));
    assert.equal(res.json["Err"], 'cannot create volume "x": the loop pool has 3.0% free');
  });
});

/** A body of `total` bytes that is produced only as it is read, counting what was read. */
function lazyBody(total: number, chunk = 64 * 1024) {
  const counter = { pulled: 0 };
  const stream = new ReadableStream<Uint8Array>({
    pull(controller) {
      if (counter.pulled >= total) return controller.close();
      const n = Math.min(chunk, total - counter.pulled);
      counter.pulled += n;
      controller.enqueue(new Uint8Array(n).fill(0x20));
    },
  });
  return { stream, counter };
}

describe("hostile requests at the edge", () => {
  test("a Content-Length over 1 MiB is refused with 413 and {Err} naming the limit, before the body is read", async () => {
    const svc = new FakeVolumes();
    const { stream, counter } = lazyBody(250 * 1024 ** 2);
    const res = await createApp(svc, silentLogger).request("/VolumeDriver.Create", {
      method: "POST",
      headers: { "Content-Length": String(250 * 1024 ** 2) },
      body: stream,
      duplex: "half",
    } as RequestInit);
    assert.equal(res.status, 413);
    assert.match(String(((await res.json()) as Record<string, unknown>)["Err"]), /over thinvol's limit of 1048576 bytes \(1 MiB\)/);
    assert.equal(counter.pulled <= 64 * 1024, true, `read ${counter.pulled} bytes of a body refused by its length`);
    assert.deepEqual(svc.calls, []);
  });

  test("a chunked body is cut off just past 1 MiB, never read whole, and the reply says the limit", async () => {
    const svc = new FakeVolumes();
    const { stream, counter } = lazyBody(250 * 1024 ** 2);
    const res = await createApp(svc, silentLogger).request("/VolumeDriver.Create", { method: "POST", body: stream, duplex: "half" } as RequestInit);
    assert.equal(res.status, 413);
    assert.match(String(((await res.json()) as Record<string, unknown>)["Err"]), /more than 1048576 bytes, over thinvol's limit/);
    assert.ok(counter.pulled < 2 * MAX_BODY_BYTES, `read ${counter.pulled} bytes of a 250 MiB body`);
    assert.deepEqual(svc.calls, []);
  });

  test("the limit holds for methods that take no arguments too; a body at the limit is accepted", async () => {
    const app = createApp(new FakeVolumes(), silentLogger);
    assert.equal((await call(app, "VolumeDriver.List", " ".repeat(MAX_BODY_BYTES + 1))).status, 413);
    const padded = JSON.stringify({ Name: "ok" }).padEnd(MAX_BODY_BYTES, " ");
    assert.deepEqual(await call(app, "VolumeDriver.Create", padded), { status: 200, json: {} });
  });

  for (const [label, body, pattern] of [
    ["an array", "[]", /must be a JSON object, not an array/],
    ["null", "null", /must be a JSON object, not null/],
    ["a number", "42", /must be a JSON object, not a number/],
    ["a string", '"db"', /must be a JSON object, not a string/],
    ["invalid UTF-8", Buffer.from([0x7b, 0x22, 0x4e, 0x61, 0x6d, 0x65, 0x22, 0x3a, 0x22, 0xff, 0xfe, 0x22, 0x7d]), /not valid UTF-8/],
    ["Opts that is a list", JSON.stringify({ Name: "db", Opts: ["size", "1G"] }), /Opts must be an object/],
    ["a number as an option value", JSON.stringify({ Name: "db", Opts: { size: 1073741824 } }), /the value of option "size" must be a string/],
    ["__proto__ as an option", '{"Name":"db","Opts":{"__proto__":"x"}}', /unknown option "__proto__"/],
    ["constructor as an option", '{"Name":"db","Opts":{"constructor":"x","size":"1G"}}', /unknown option "constructor"/],
    ["a Name that is a number", JSON.stringify({ Name: 7 }), /Name must be a string/],
  ] as const) {
    test(`Create with ${label} is refused with {Err} and creates nothing`, async () => {
      const svc = new FakeVolumes();
      const res = await createApp(svc, silentLogger).request("/VolumeDriver.Create", { method: "POST", body });
      assert.equal(res.status, 500);
      assert.match(String(((await res.json()) as Record<string, unknown>)["Err"]), pattern);
      assert.deepEqual(svc.calls, []);
    });
  }

  test("Mount and Unmount refuse an over-long ID or one with control characters, and accept one at the cap or none (older callers)", async () => {
    const svc = new FakeVolumes();
    const app = createApp(svc, silentLogger);
    await call(app, "VolumeDriver.Create", JSON.stringify({ Name: "v" }));
    for (const [body, pattern] of [
      [{ Name: "v", ID: "x".repeat(MAX_MOUNT_ID_CHARS + 1) }, /ID is 257 characters long; the most is 256/],
      [{ Name: "v", ID: "a\nb" }, /ID "a\\nb" must not contain control characters/],
    ] as const) {
      for (const method of ["VolumeDriver.Mount", "VolumeDriver.Unmount"]) {
        const res = await call(app, method, JSON.stringify(body));
        assert.equal(res.status, 500, `${method} ${JSON.stringify(body).slice(0, 40)}`);
        assert.match(String(res.json["Err"]), pattern);
      }
    }
    assert.deepEqual(svc.calls, ["create v null"]);
    const id = "f".repeat(MAX_MOUNT_ID_CHARS);
    assert.deepEqual(await call(app, "VolumeDriver.Mount", JSON.stringify({ Name: "v", ID: id })), { status: 200, json: { Mountpoint: "/mnt/thinvol/v" } });
    for (const body of [{ Name: "v" }, { Name: "v", ID: "" }]) {
      assert.deepEqual(await call(app, "VolumeDriver.Mount", JSON.stringify(body)), { status: 200, json: { Mountpoint: "/mnt/thinvol/v" } });
    }
  });

  test("GET on a protocol method is a 405 with {Err}; an unknown path is a 404 that quotes it capped", async () => {
    const app = createApp(new FakeVolumes(), silentLogger);
    const get = await app.request("/VolumeDriver.List");
    assert.equal(get.status, 405);
    assert.match(String(((await get.json()) as Record<string, unknown>)["Err"]), /"\/VolumeDriver.List" must be called with POST, not "GET"/);
    const res = await app.request(`/${"z".repeat(5000)}`, { method: "POST" });
    assert.equal(res.status, 404);
    const err = String(((await res.json()) as Record<string, unknown>)["Err"]);
    assert.match(err, /does not implement "\/z+…" \(5001 characters\)/);
    assert.ok(err.length < 200, err);
  });

  test("a huge invalid Name is quoted in the error and the log line cut to the cap, with its length", async () => {
    const lines: string[] = [];
    const { createLogger } = await import("../../src/log.js");
    const svc = new FakeVolumes();
    const name = "\u001b[2J" + "n".repeat(500_000);
    const res = await call(createApp(svc, createLogger("info", (l) => lines.push(l))), "VolumeDriver.Create", JSON.stringify({ Name: name }));
    assert.equal(res.status, 500);
    const err = String(res.json["Err"]);
    assert.match(err, /^bad request: invalid volume name "\\u001b\[2Jn+…" \(500004 characters\): use 1 to 96/);
    assert.equal((err.match(/n/g) ?? []).length < QUOTE_MAX_CHARS + 20, true, err);
    assert.equal(lines.length, 1);
    assert.ok((lines[0] ?? "").length < 1000, `a log line of ${(lines[0] ?? "").length} characters`);
    assert.match(lines[0] ?? "", /volume="\\"\\\\u001b\[2Jn+…\\" \(500004 characters\)" outcome=error/);
    assert.equal(lines[0]?.includes("\u001b"), false, "no raw escape character reaches the log");
    assert.deepEqual(svc.calls, []);
  });

  test("a log value with a newline stays on one line, and a runaway value is cut", async () => {
    const lines: string[] = [];
    const { createLogger, LOG_VALUE_MAX_CHARS } = await import("../../src/log.js");
    const log = createLogger("info", (l) => lines.push(l));
    log.warn("x", { error: "first\nforged 2026-01-01T00:00:00Z info ready", big: "b".repeat(100_000) });
    assert.equal(lines.length, 1);
    assert.equal(lines[0]?.includes("\n"), false);
    assert.match(lines[0] ?? "", /error="first\\nforged/);
    assert.ok((lines[0] ?? "").length < LOG_VALUE_MAX_CHARS + 200);
    assert.match(lines[0] ?? "", /… \(100000 characters\)/);
  });
});
