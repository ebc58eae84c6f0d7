/** The admin API over the real volume layer (on a fake pool): routes, validation, error kinds, progress, metrics. */
import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, test } from "node:test";
import { createAdminApp } from "../../src/api/admin.js";
import { createApp } from "../../src/api/app.js";
import { silentLogger } from "../../src/log.js";
import { RequestMetrics } from "../../src/metrics.js";
import type { VolumeManager } from "../../src/volumes/manager.js";
import type { FakePool } from "../support/fake-pool.js";
import type { FakeRunner } from "../support/fake-runner.js";
import { managerFixture, type ManagerFixture } from "../support/manager-fixture.js";

const MiB = 1024 ** 2;

describe("the admin API", () => {
  let f: ManagerFixture;
  let pool: FakePool;
  let runner: FakeRunner;
  let manager: VolumeManager;
  let metrics: RequestMetrics;
  let admin: ReturnType<typeof createAdminApp>;
  let docker: ReturnType<typeof createApp>;

  beforeEach(async () => {
    f = await managerFixture({ defaultSizeBytes: 64 * MiB, minFreePercent: 5 });
    ({ pool, runner, manager } = f);
    metrics = new RequestMetrics();
    admin = createAdminApp(async () => manager, silentLogger, metrics);
    docker = createApp(manager, silentLogger, metrics);
    await manager.create("db", null);
  });
  afterEach(() => f.cleanup());

  const send = async (method: string, path: string, body?: unknown, accept = "application/json") => {
    const init: RequestInit = { method, headers: { Accept: accept, "Content-Type": "application/json" } };
    if (body !== undefined) init.body = typeof body === "string" ? body : JSON.stringify(body);
    const res = await admin.request(path, init);
    const text = await res.text();
    return { status: res.status, type: res.headers.get("content-type") ?? "", text, json: () => JSON.parse(text) as Record<string, unknown> };
  };

  test("volumes, one volume and the pool", async () => {
    const list = await send("GET", "/v1/volumes");
    assert.equal(list.status, 200);
    const [v] = list.json()["volumes"] as Record<string, unknown>[];
    assert.equal(v?.["name"], "db");
    assert.equal(v?.["sizeBytes"], 64 * MiB);
    assert.equal(v?.["filesystem"], "ext4");
    assert.equal(v?.["mounted"], false);
    assert.deepEqual(v?.["snapshots"], []);
    assert.equal((await send("GET", "/v1/volumes/db")).json()["name"], "db");
    const p = (await send("GET", "/v1/pool")).json();
    assert.equal(p["driver"], "loop");
    assert.equal(p["volumes"], 1);
    assert.equal(p["minFreePercent"], 5);
  });

  test("resize takes a size with a unit or in bytes, and inspect through Docker's API shows the new size", async () => {
    const r = await send("POST", "/v1/volumes/db/resize", { size: "128M" });
    assert.equal(r.status, 200);
    assert.deepEqual(r.json(), { name: "db", previousSizeBytes: 64 * MiB, sizeBytes: 128 * MiB });
    assert.equal((await send("POST", "/v1/volumes/db/resize", { size: 256 * MiB })).status, 200);
    const got = await docker.request("/VolumeDriver.Get", { method: "POST", body: JSON.stringify({ Name: "db" }) });
    assert.equal(((await got.json()) as { Volume: { Status: Record<string, unknown> } }).Volume.Status["size"], "256 MiB");
  });

  test("each kind of failure has its status and kind, and a refused request runs nothing", async () => {
    const before = runner.calls.length;
    const cases: [string, string, unknown, number, string, RegExp][] = [
      ["POST", "/v1/volumes/db/resize", { size: "32M" }, 409, "conflict", /a volume never shrinks/],
      ["POST", "/v1/volumes/db/resize", { size: "lots" }, 400, "invalid", /size "lots" is not a size/],
      ["POST", "/v1/volumes/db/resize", { size: "1G", force: true }, 400, "invalid", /unknown field "force"/],
      ["POST", "/v1/volumes/db/resize", {}, 400, "invalid", /the request has no size/],
      ["POST", "/v1/volumes/db/resize", "{not json", 400, "invalid", /not JSON/],
      ["POST", "/v1/volumes/-db/resize", { size: "1G" }, 400, "invalid", /invalid volume name "-db"/],
      ["POST", "/v1/volumes/ghost/resize", { size: "1G" }, 404, "not-found", /volume "ghost" does not exist/],
      ["POST", "/v1/volumes/db/snapshots", { name: "a b" }, 400, "invalid", /invalid snapshot name "a b"/],
      ["DELETE", "/v1/volumes/db/snapshots/none", undefined, 404, "not-found", /volume "db" has no snapshot "none"/],
      ["POST", "/v1/volumes/db/rollback", { snapshot: "none" }, 404, "not-found", /volume "db" has no snapshot "none"/],
      ["GET", "/v1/snapshots?volume=%2Fetc", undefined, 400, "invalid", /invalid volume name "\/etc"/],
      ["GET", "/v1/nothing", undefined, 404, "not-found", /has no GET "\/v1\/nothing"/],
    ];
    for (const [method, path, body, status, kind, message] of cases) {
      const r = await send(method, path, body);
      assert.equal(r.status, status, `${method} ${path}: ${r.text}`);
      assert.equal(r.json()["kind"], kind, `${method} ${path}`);
      assert.match(String(r.json()["error"]), message);
    }
    assert.equal(runner.calls.length, before, "no command ran for a refused request");
    assert.equal(await pool.sizeOf("db"), 64 * MiB);
  });

  test("snapshots: create, list, refuse a Docker remove, roll back while unmounted only, remove", async () => {
    const made = await send("POST", "/v1/volumes/db/snapshots", { name: "s1" });
    assert.equal(made.status, 200);
    assert.equal(made.json()["name"], "s1");
    assert.deepEqual(
      ((await send("GET", "/v1/snapshots?volume=db")).json()["snapshots"] as { name: string }[]).map((s) => s.name),
      ["s1"],
    );
    const rm = await docker.request("/VolumeDriver.Remove", { method: "POST", body: JSON.stringify({ Name: "db" }) });
    assert.match(((await rm.json()) as { Err: string }).Err, /it has a snapshot "s1"; remove it first with thinvol snapshot rm db s1/);
    await manager.mount("db", "c1");
    const refused = await send("POST", "/v1/volumes/db/rollback", { snapshot: "s1" });
    assert.equal(refused.status, 409);
    await manager.unmount("db", "c1");
    const rolled = await send("POST", "/v1/volumes/db/rollback", { snapshot: "s1" });
    assert.equal(rolled.status, 200);
    assert.deepEqual(rolled.json()["snapshots"], ["s1"]);
    assert.equal((await send("DELETE", "/v1/volumes/db/snapshots/s1")).status, 200);
    assert.deepEqual((await send("GET", "/v1/snapshots")).json()["snapshots"], []);
  });

  test("with Accept: application/x-ndjson the reply streams progress, then the result or the error", async () => {
    const ok = await send("POST", "/v1/volumes/db/resize", { size: "128M" }, "application/x-ndjson");
    assert.equal(ok.status, 200);
    assert.match(ok.type, /application\/x-ndjson/);
    const events = ok.text.trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);
    assert.ok(events.length >= 2);
    assert.ok(events.slice(0, -1).every((e) => e["event"] === "progress" && typeof e["message"] === "string"));
    assert.match(String(events[0]?.["message"]), /growing the device of volume "db" to 128 MiB/);
    assert.deepEqual(events.at(-1), { event: "result", result: { name: "db", previousSizeBytes: 64 * MiB, sizeBytes: 128 * MiB } });
    const bad = await send("POST", "/v1/volumes/db/resize", { size: "64M" }, "application/x-ndjson");
    const last = JSON.parse(bad.text.trim().split("\n").at(-1) ?? "{}") as Record<string, unknown>;
    assert.equal(last["event"], "error");
    assert.equal(last["kind"], "conflict");
  });

  test("/metrics is Prometheus text with the pool, each volume and the requests of both APIs", async () => {
    await send("POST", "/v1/volumes/db/snapshots", { name: "s1" });
    await send("POST", "/v1/volumes/db/resize", { size: "32M" });
    await docker.request("/VolumeDriver.List", { method: "POST", body: "{}" });
    const r = await send("GET", "/metrics");
    assert.equal(r.status, 200);
    assert.match(r.type, /^text\/plain; version=0\.0\.4/);
    const lines = r.text.split("\n");
    for (const expected of [
      'thinvol_pool_data_bytes_total{driver="loop"} 107374182400',
      "thinvol_volumes 1",
      "thinvol_snapshots 1",
      `thinvol_volume_size_bytes{volume="db"} ${64 * MiB}`,
      'thinvol_volume_snapshots{volume="db"} 1',
      'thinvol_requests_total{api="admin",method="snapshot.create",outcome="ok"} 1',
      'thinvol_requests_total{api="admin",method="resize",outcome="error"} 1',
      'thinvol_requests_total{api="docker",method="VolumeDriver.List",outcome="ok"} 1',
      'thinvol_request_duration_seconds_count{api="docker",method="VolumeDriver.List",outcome="ok"} 1',
      'thinvol_request_duration_seconds_bucket{api="docker",method="VolumeDriver.List",outcome="ok",le="+Inf"} 1',
    ]) {
      assert.ok(lines.includes(expected), `missing: ${expected}`);
    }
    // Every sample line is NAME{LABELS} VALUE, and every metric has its TYPE.
    const samples = lines.filter((l) => l !== "" && !l.startsWith("#"));
    for (const l of samples) assert.match(l, /^[a-z_]+(\{[^}]*\})? -?[0-9.e+]+$/, l);
    const typed = new Set(lines.filter((l) => l.startsWith("# TYPE ")).map((l) => l.split(" ")[2]));
    for (const l of samples) assert.ok(typed.has(l.split(/[{ ]/)[0]?.replace(/_(bucket|sum|count)$/, "")), `no TYPE for ${l}`);
  });
});
