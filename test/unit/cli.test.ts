import assert from "node:assert/strict";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, test } from "node:test";
import { runCli, runCliProcess, useFakeAdmin } from "../support/cli-fakes.js";

const MiB = 1024 ** 2;
const GiB = 1024 ** 3;

/** Replies as docs/admin-api.md gives them. */
const DB = {
  name: "db",
  createdAt: "2026-11-29T10:00:00.000Z",
  sizeBytes: 10 * GiB,
  filesystem: "ext4",
  mounted: true,
  mountpoint: "/mnt/thinvol/db",
  mounts: 1,
  usedBytes: 123456789,
  availableBytes: 9876543210,
  allocatedBytes: 234567890,
  snapshots: ["before-upgrade"],
};
const CLONE = {
  name: "db-copy",
  createdAt: "2026-11-29T11:00:00.000Z",
  sizeBytes: 10 * GiB,
  filesystem: "xfs",
  mounted: false,
  mounts: 0,
  allocatedBytes: 4096,
  origin: "db@before-upgrade",
  snapshots: [],
};
const LOOP_POOL = {
  driver: "loop",
  dataTotalBytes: 100 * GiB,
  dataUsedBytes: 1234567,
  metaTotalBytes: 0,
  metaUsedBytes: 0,
  hostReservedBytes: 1234567,
  hostFreeBytes: 98765432,
  minFreePercent: 10,
  volumes: 2,
  snapshots: 1,
};
const DM_POOL = {
  driver: "dm-thin",
  dataTotalBytes: 100 * GiB,
  dataUsedBytes: 25 * GiB,
  metaTotalBytes: 128 * MiB,
  metaUsedBytes: 2 * MiB,
  minFreePercent: 10,
  volumes: 2,
  snapshots: 1,
};
const SNAPSHOT = { volume: "db", name: "before-upgrade", createdAt: "2026-11-29T10:00:00.000Z", sizeBytes: 10 * GiB, allocatedBytes: 234567890 };
const METRICS = '# TYPE thinvol_volumes gauge\nthinvol_volumes 2\nthinvol_pool_data_bytes_total{driver="loop"} 107374182400\n';

const fake = useFakeAdmin();

describe("thinvol ls", () => {
  test("prints a table of the volumes: used only while mounted, - for no origin", async () => {
    fake.admin.on("GET", "/v1/volumes", { json: { volumes: [DB, CLONE] } });
    const r = await runCli(["ls", ...fake.sock]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stderr, "");
    assert.equal(
      r.stdout,
      [
        "NAME        SIZE        USED   ALLOCATED   ORIGIN              SNAPSHOTS   MOUNTS",
        "db        10 GiB   117.7 MiB   223.7 MiB   -                           1        1",
        "db-copy   10 GiB           -       4 KiB   db@before-upgrade           0        0",
        "",
      ].join("\n"),
    );
    assert.deepEqual(fake.admin.requests.map((q) => `${q.method} ${q.path} ${q.accept}`), ["GET /v1/volumes application/json"]);
  });

  test("prints only the header when there is no volume", async () => {
    fake.admin.on("GET", "/v1/volumes", { json: { volumes: [] } });
    const r = await runCli(["ls", ...fake.sock]);
    assert.equal(r.code, 0);
    assert.match(r.stdout, /^NAME\s+SIZE\s+USED\s+ALLOCATED\s+ORIGIN\s+SNAPSHOTS\s+MOUNTS\n$/);
  });

  test("--json prints the API's reply, fields this version does not know included", async () => {
    const reply = { volumes: [{ ...DB, quota: "new field" }, CLONE] };
    fake.admin.on("GET", "/v1/volumes", { json: reply });
    const r = await runCli(["--json", "ls", ...fake.sock]);
    assert.equal(r.code, 0);
    assert.deepEqual(JSON.parse(r.stdout), reply);
    assert.match(r.stdout, /^\{\n {2}"volumes": \[/, "pretty-printed");
  });

  test("a reply that is not what the document says is an error, not a table of undefined", async () => {
    fake.admin.on("GET", "/v1/volumes", { json: { volumes: [{ name: "db" }] } });
    const r = await runCli(["ls", ...fake.sock]);
    assert.equal(r.code, 1);
    assert.equal(r.stdout, "");
    assert.match(r.stderr, /^thinvol: unexpected reply from the admin API to GET \/v1\/volumes: volumes\.0\.sizeBytes: /);
  });
});

describe("thinvol df", () => {
  test("shows a pool kept in files: data, host disk, the free-space threshold, counts; then the volumes", async () => {
    fake.admin.on("GET", "/v1/pool", { json: LOOP_POOL }).on("GET", "/v1/volumes", { json: { volumes: [DB] } });
    const r = await runCli(["df", ...fake.sock]);
    assert.equal(r.code, 0, r.stderr);
    const [pool = "", volumes = ""] = r.stdout.split("\n\n");
    assert.equal(
      pool,
      [
        "driver:    loop",
        "data:      1.18 MiB of 100 GiB used (<0.1%)",
        "host disk: 1.18 MiB reserved for the pool, 94.2 MiB free",
        "min free:  10% (MIN_FREE_SPACE: no new volume when less of the pool is free)",
        "volumes:   2",
        "snapshots: 1",
      ].join("\n"),
    );
    assert.match(volumes, /^NAME\s+SIZE\s+USED\s+ALLOCATED\s+ORIGIN\s+SNAPSHOTS\s+MOUNTS\ndb\s+10 GiB\s+117\.7 MiB/);
    assert.doesNotMatch(r.stdout, /metadata/, "a loop pool has no metadata device");
    assert.deepEqual(fake.admin.requests.map((q) => `${q.method} ${q.path}`), ["GET /v1/pool", "GET /v1/volumes"]);
  });

  test("shows dm-thin metadata use and no host disk line", async () => {
    fake.admin.on("GET", "/v1/pool", { json: DM_POOL }).on("GET", "/v1/volumes", { json: { volumes: [] } });
    const r = await runCli(["df", ...fake.sock]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^driver: {4}dm-thin$/m);
    assert.match(r.stdout, /^data: {6}25 GiB of 100 GiB used \(25%\)$/m);
    assert.match(r.stdout, /^metadata: {2}2 MiB of 128 MiB used \(1\.6%\)$/m);
    assert.doesNotMatch(r.stdout, /host disk/);
    assert.doesNotMatch(r.stdout, /NAME/, "no empty volumes table");
  });

  test("--json prints one document with the pool and the volumes", async () => {
    fake.admin.on("GET", "/v1/pool", { json: DM_POOL }).on("GET", "/v1/volumes", { json: { volumes: [DB] } });
    const r = await runCli(["df", "--json", ...fake.sock]);
    assert.equal(r.code, 0);
    assert.deepEqual(JSON.parse(r.stdout), { pool: DM_POOL, volumes: [DB] });
  });
});

describe("thinvol inspect", () => {
  test("prints the volume as JSON, with or without --json", async () => {
    fake.admin.on("GET", "/v1/volumes/db", { json: DB });
    for (const argv of [["inspect", "db"], ["inspect", "db", "--json"]]) {
      const r = await runCli([...argv, ...fake.sock]);
      assert.equal(r.code, 0);
      assert.deepEqual(JSON.parse(r.stdout), DB);
    }
    assert.deepEqual(fake.admin.requests.map((q) => `${q.method} ${q.path}`), ["GET /v1/volumes/db", "GET /v1/volumes/db"]);
  });
});

describe("thinvol resize", () => {
  test("sends the size as typed and says what changed", async () => {
    fake.admin.on("POST", "/v1/volumes/db/resize", { json: { name: "db", previousSizeBytes: 10 * GiB, sizeBytes: 20 * GiB } });
    const r = await runCli(["resize", "db", "20G", ...fake.sock]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, 'resized volume "db": 10 GiB → 20 GiB\n');
    assert.equal(r.stderr, "", "no progress line when stderr is not a terminal");
    const [req] = fake.admin.requests;
    assert.deepEqual(req, { method: "POST", path: "/v1/volumes/db/resize", accept: "application/json", contentType: "application/json", body: { size: "20G" } });
  });

  test("the same size is success with nothing done", async () => {
    fake.admin.on("POST", "/v1/volumes/db/resize", { json: { name: "db", previousSizeBytes: 20 * GiB, sizeBytes: 20 * GiB } });
    const r = await runCli(["resize", "db", "20G", ...fake.sock]);
    assert.equal(r.code, 0);
    assert.equal(r.stdout, 'volume "db" is already 20 GiB: nothing to do\n');
  });

  test("--json prints the reply", async () => {
    const reply = { name: "db", previousSizeBytes: 10 * GiB, sizeBytes: 20 * GiB };
    fake.admin.on("POST", "/v1/volumes/db/resize", { json: reply });
    const r = await runCli(["resize", "--json", "db", "20G", ...fake.sock]);
    assert.deepEqual(JSON.parse(r.stdout), reply);
  });
});

describe("thinvol pool grow", () => {
  test("posts the size and prints the new data space", async () => {
    fake.admin.on("POST", "/v1/pool/grow", { json: { ...LOOP_POOL, dataTotalBytes: 200 * GiB } });
    const r = await runCli(["pool", "grow", "200G", ...fake.sock]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, "pool data space is now 200 GiB: 1.18 MiB of 200 GiB used (<0.1%)\n");
    assert.deepEqual(fake.admin.requests[0]?.body, { size: "200G" });
    assert.equal(fake.admin.requests[0]?.path, "/v1/pool/grow");
  });
});

describe("thinvol snapshot", () => {
  test("create posts the name and confirms", async () => {
    fake.admin.on("POST", "/v1/volumes/db/snapshots", { json: SNAPSHOT });
    const r = await runCli(["snapshot", "create", "db", "before-upgrade", ...fake.sock]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, 'created snapshot "before-upgrade" of volume "db" (10 GiB)\n');
    assert.deepEqual(fake.admin.requests[0]?.body, { name: "before-upgrade" });
  });

  test("ls lists every snapshot, or one volume's", async () => {
    const other = { volume: "web", name: "v1.2", createdAt: "2026-11-30T08:30:00.000Z", sizeBytes: 64 * MiB, allocatedBytes: 12 * MiB };
    fake.admin.on("GET", "/v1/snapshots", { json: { snapshots: [SNAPSHOT, other] } }).on("GET", "/v1/snapshots?volume=db", { json: { snapshots: [SNAPSHOT] } });
    const all = await runCli(["snapshot", "ls", ...fake.sock]);
    assert.equal(all.code, 0, all.stderr);
    assert.equal(
      all.stdout,
      [
        "VOLUME   NAME             CREATED                  SIZE   ALLOCATED",
        "db       before-upgrade   2026-11-29T10:00:00Z   10 GiB   223.7 MiB",
        "web      v1.2             2026-11-30T08:30:00Z   64 MiB      12 MiB",
        "",
      ].join("\n"),
    );
    const one = await runCli(["snapshot", "ls", "db", ...fake.sock]);
    assert.equal(one.stdout.split("\n").length, 3);
    assert.deepEqual(fake.admin.requests.map((q) => q.path), ["/v1/snapshots", "/v1/snapshots?volume=db"]);
  });

  test("rm deletes the snapshot; --json prints the API's {}", async () => {
    fake.admin.on("DELETE", "/v1/volumes/db/snapshots/before-upgrade", { json: {} });
    const r = await runCli(["snapshot", "rm", "db", "before-upgrade", ...fake.sock]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, 'removed snapshot "before-upgrade" of volume "db"\n');
    assert.equal(fake.admin.requests[0]?.body, undefined);
    const j = await runCli(["snapshot", "rm", "db", "before-upgrade", "--json", ...fake.sock]);
    assert.deepEqual(JSON.parse(j.stdout), {});
  });
});

describe("thinvol rollback", () => {
  test("posts the snapshot and confirms with the volume's size", async () => {
    fake.admin.on("POST", "/v1/volumes/db/rollback", { json: { ...DB, mounted: false, mounts: 0 } });
    const r = await runCli(["rollback", "db", "before-upgrade", ...fake.sock]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, 'rolled volume "db" back to snapshot "before-upgrade" (10 GiB)\n');
    assert.deepEqual(fake.admin.requests[0]?.body, { snapshot: "before-upgrade" });
  });
});

describe("thinvol metrics", () => {
  test("prints the Prometheus text as it is, --json or not", async () => {
    fake.admin.on("GET", "/metrics", { text: METRICS });
    for (const argv of [["metrics"], ["metrics", "--json"]]) {
      const r = await runCli([...argv, ...fake.sock]);
      assert.equal(r.code, 0);
      assert.equal(r.stdout, METRICS);
    }
  });
});

describe("errors from the API", () => {
  const cases = [
    ["invalid", 400, 'cannot resize volume "db": size "20G" is over the limit of 16 TiB'],
    ["not-found", 404, 'volume "db" does not exist'],
    ["conflict", 409, 'cannot shrink volume "db" from 20 GiB to 10 GiB: a volume never shrinks'],
    ["no-space", 507, 'cannot resize volume "db": the pool has 2 GiB free, under MIN_FREE_SPACE (10%)'],
    ["error", 500, 'cannot resize volume "db": resize2fs /dev/mapper/thinvol-db failed: device busy'],
  ] as const;

  for (const [kind, status, message] of cases) {
    test(`${kind} (${status}): the message as the API gave it, exit 1`, async () => {
      fake.admin.on("POST", "/v1/volumes/db/resize", { status, json: { error: message, kind } });
      const r = await runCli(["resize", "db", "10G", ...fake.sock]);
      assert.equal(r.code, 1);
      assert.equal(r.stderr, `thinvol: ${message}\n`);
      assert.equal(r.stdout, "");
      const j = await runCli(["resize", "db", "10G", "--json", ...fake.sock]);
      assert.equal(j.code, 1);
      assert.deepEqual(JSON.parse(j.stdout), { error: message, kind });
      assert.equal(j.stderr, `thinvol: ${message}\n`, "the message goes to stderr with --json too");
    });
  }

  test("a reply that is not JSON is reported with its status", async () => {
    fake.admin.on("GET", "/v1/volumes", { status: 502, text: "<html>bad gateway</html>" });
    const r = await runCli(["ls", ...fake.sock]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^thinvol: unexpected reply from the admin API to GET \/v1\/volumes: status 502, body "<html>bad gateway<\/html>"/);
  });
});

describe("progress", () => {
  const RESIZED = { name: "db", previousSizeBytes: 10 * GiB, sizeBytes: 20 * GiB };

  test("on a terminal a change asks for ndjson and draws each event on one line, cleared at the end", async () => {
    fake.admin.on("POST", "/v1/volumes/db/resize", {
      ndjson: [
        { event: "progress", message: "growing the device" },
        { event: "progress", message: "growing the filesystem", done: 1, total: 4 },
        { event: "result", result: RESIZED },
      ],
    });
    const r = await runCli(["resize", "db", "20G", ...fake.sock], { tty: true });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(fake.admin.requests[0]?.accept, "application/x-ndjson");
    assert.equal(r.stdout, 'resized volume "db": 10 GiB → 20 GiB\n');
    const frames = r.stderr.split("\r\x1b[K");
    assert.equal(frames[0], "", "every frame starts by clearing the line");
    assert.deepEqual(frames.slice(1), [
      'resizing volume "db" to 20G… (1s)',
      'resizing volume "db" to 20G: growing the device (2s)',
      'resizing volume "db" to 20G: growing the filesystem 25% (3s)',
      "",
    ]);
    assert.doesNotMatch(r.stderr, /\n/, "the line is rewritten, never a new one");
  });

  test("every change shows progress: pool grow, snapshot create and rm, rollback", async () => {
    fake.admin
      .on("POST", "/v1/pool/grow", { ndjson: [{ event: "result", result: LOOP_POOL }] })
      .on("POST", "/v1/volumes/db/snapshots", { ndjson: [{ event: "result", result: SNAPSHOT }] })
      .on("DELETE", "/v1/volumes/db/snapshots/s1", { ndjson: [{ event: "result", result: {} }] })
      .on("POST", "/v1/volumes/db/rollback", { ndjson: [{ event: "result", result: DB }] });
    const labels: string[] = [];
    for (const argv of [["pool", "grow", "200G"], ["snapshot", "create", "db", "s1"], ["snapshot", "rm", "db", "s1"], ["rollback", "db", "s1"]]) {
      const r = await runCli([...argv, ...fake.sock], { tty: true });
      assert.equal(r.code, 0, r.stderr);
      labels.push(r.stderr.split("\r\x1b[K")[1] ?? "");
    }
    assert.deepEqual(labels, [
      "growing the pool to 200G… (1s)",
      'taking snapshot "s1" of volume "db"… (1s)',
      'removing snapshot "s1" of volume "db"… (1s)',
      'rolling volume "db" back to snapshot "s1"… (1s)',
    ]);
    assert.ok(fake.admin.requests.every((q) => q.accept === "application/x-ndjson"));
  });

  test("an error event fails the command with its message, after the line is cleared", async () => {
    fake.admin.on("POST", "/v1/volumes/db/rollback", {
      ndjson: [
        { event: "progress", message: "checking the volume" },
        { event: "error", error: 'cannot roll back volume "db": it is mounted by 1 container; stop it first', kind: "conflict" },
      ],
    });
    const r = await runCli(["rollback", "db", "before-upgrade", ...fake.sock], { tty: true });
    assert.equal(r.code, 1);
    assert.equal(r.stdout, "");
    assert.ok(r.stderr.endsWith('\r\x1b[Kthinvol: cannot roll back volume "db": it is mounted by 1 container; stop it first\n'), JSON.stringify(r.stderr));
  });

  test("a stream that ends without a result is a failure that says the outcome is unknown", async () => {
    fake.admin.on("POST", "/v1/pool/grow", { ndjson: [{ event: "progress", message: "growing the data file" }] });
    const r = await runCli(["pool", "grow", "200G", ...fake.sock], { tty: true });
    assert.equal(r.code, 1);
    assert.match(r.stderr, /thinvol: the admin API ended the progress of POST \/v1\/pool\/grow without a result; the change may or may not have been made/);
  });

  test("a line that is not an event is a failure", async () => {
    fake.admin.on("POST", "/v1/pool/grow", { ndjson: ["{not json"] });
    const r = await runCli(["pool", "grow", "200G", ...fake.sock], { tty: true });
    assert.equal(r.code, 1);
    assert.match(r.stderr, /unexpected reply from the admin API to POST \/v1\/pool\/grow: progress line \{not json/);
  });

  test("a plain JSON error is understood even when progress was asked for", async () => {
    fake.admin.on("POST", "/v1/volumes/nope/resize", { status: 404, json: { error: 'volume "nope" does not exist', kind: "not-found" } });
    const r = await runCli(["resize", "nope", "20G", ...fake.sock], { tty: true });
    assert.equal(r.code, 1);
    assert.ok(r.stderr.endsWith('\r\x1b[Kthinvol: volume "nope" does not exist\n'));
  });

  test("no progress with --json, nor for reads, even on a terminal", async () => {
    fake.admin.on("POST", "/v1/volumes/db/resize", { json: RESIZED }).on("GET", "/v1/volumes", { json: { volumes: [] } });
    const j = await runCli(["resize", "db", "20G", "--json", ...fake.sock], { tty: true });
    const l = await runCli(["ls", ...fake.sock], { tty: true });
    assert.equal(j.code + l.code, 0);
    assert.equal(j.stderr + l.stderr, "");
    assert.deepEqual(fake.admin.requests.map((q) => q.accept), ["application/json", "application/json"]);
  });

  test("a line longer than the terminal is cut, so rewriting it never leaves rows behind", async () => {
    fake.admin.on("POST", "/v1/volumes/db/resize", { ndjson: [{ event: "progress", message: "x".repeat(200) }, { event: "result", result: RESIZED }] });
    const r = await runCli(["resize", "db", "20G", ...fake.sock], { tty: true, columns: 40 });
    for (const frame of r.stderr.split("\r\x1b[K")) assert.ok(frame.length < 40, frame);
  });
});

describe("reaching the admin socket", () => {
  test("no socket at the path: exit 1, naming the path", async () => {
    const missing = join(fake.dir, "nothing-here.sock");
    const r = await runCli(["ls", "--socket", missing]);
    assert.equal(r.code, 1);
    assert.equal(r.stderr, `thinvol: no admin socket at ${missing}: is the plugin running, and is this the admin.sock in its STATE_DIR?\n`);
  });

  test("nothing listening: exit 1, the plugin is not running", async () => {
    const stale = join(fake.dir, "stale.sock");
    await writeFile(stale, "");
    const r = await runCli(["snapshot", "ls", "--socket", stale]);
    assert.equal(r.code, 1);
    assert.equal(r.stderr, `thinvol: nothing is listening on ${stale}: the plugin is not running\n`);
  });

  test("--json prints a connection failure as an error document of kind unavailable", async () => {
    const r = await runCli(["ls", "--json", "--socket", join(fake.dir, "none.sock")]);
    assert.equal(r.code, 1);
    assert.equal((JSON.parse(r.stdout) as { kind: string }).kind, "unavailable");
  });
});

describe("as a process", () => {
  test("ls prints the table on stdout and exits 0", async () => {
    fake.admin.on("GET", "/v1/volumes", { json: { volumes: [DB] } });
    const r = await runCliProcess(["ls", "--socket", fake.admin.socketPath]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^NAME .*\ndb +10 GiB/);
    assert.equal(r.stderr, "");
  });

  test("an API error exits 1 with the message on stderr", async () => {
    fake.admin.on("GET", "/v1/volumes/db", { status: 404, json: { error: 'volume "db" does not exist', kind: "not-found" } });
    const r = await runCliProcess(["inspect", "db", "--socket", fake.admin.socketPath]);
    assert.equal(r.code, 1);
    assert.equal(r.stderr, 'thinvol: volume "db" does not exist\n');
    assert.equal(r.stdout, "");
  });

  test("an unreachable socket exits 1", async () => {
    const r = await runCliProcess(["ls", "--socket", join(fake.dir, "none.sock")]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^thinvol: no admin socket at /);
  });
});

describe("what reaches the terminal", () => {
  test("control characters in an API message are shown escaped, never sent to the terminal", async () => {
    fake.admin.on("GET", "/v1/volumes/db", { status: 500, json: { error: "resize2fs said \u001b[2Jboom\r", kind: "error" } });
    const r = await runCli(["inspect", "db", ...fake.sock]);
    assert.equal(r.code, 1);
    assert.equal(r.stderr, "thinvol: resize2fs said \\u001b[2Jboom\\r\n");
  });
});
