import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { createApp } from "../../src/api/app.js";
import { InvalidRequestError, NotFoundError } from "../../src/errors.js";
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
    assert.match(String(res.json["Err"]), /unknown option "color".*size, fs, from, uid, gid, mode, mountopts/);
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

  test("an InvalidRequestError thrown by the service reaches the user word for word", async () => {
    const svc = new FakeVolumes();
    svc.create = async () => {
      throw new InvalidRequestError('cannot create volume "x": size "12Q" is not a size');
    };
    const res = await call(createApp(svc, silentLogger), "VolumeDriver.Create", JSON.stringify({ Name: "x", Opts: { size: "12Q" } }));
    assert.equal(res.json["Err"], 'cannot create volume "x": size "12Q" is not a size');
  });
});
