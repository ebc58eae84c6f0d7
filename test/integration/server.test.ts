/**
 * The real server bundle, as root, on real loop devices: what a user of the
 * plugin sees, checked through the protocol and the kernel.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createConnection } from "node:net";
import { mkdtemp, readFile, readdir, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { readMounts } from "../../src/system/mount.js";
import { dmDevicesNamed, loopDevicesUnder, mountsUnder, tearDownPool } from "../support/kernel.js";
import { BUNDLE, callOk, callPlugin, startServer, stopServer, serverEnv, type ServerProcess } from "../support/plugin-client.js";

const MiB = 1024 ** 2;
/** loop here; the VM tier (and a host with dm-thin) runs the same tests with dm-thin. */
const driver = process.env["THINVOL_TEST_POOL_DRIVER"] === "dm-thin" ? "dm-thin" : "loop";
/** The dm-thin driver names its devices `thinvol-pool` and `thinvol-<volume>`. */
const DM_PREFIX = "thinvol-";
/** The files on the host that hold the pool's data. */
const poolDataFile = (dir: string) =>
  driver === "loop" ? join(dir, "state", "pool-loop", "pool.img") : join(dir, "state", "pool-dm-thin", "data.img");

describe(`thinvol server with the ${driver} pool`, () => {
  let dir: string;
  let env: Record<string, string>;
  let server: ServerProcess;
  let sock: string;

  const create = (Name: string, Opts: Record<string, string> | null = null) => callOk(sock, "VolumeDriver.Create", { Name, Opts });
  const mount = async (Name: string, ID: string) => String((await callOk(sock, "VolumeDriver.Mount", { Name, ID }))["Mountpoint"]);
  const unmount = (Name: string, ID: string) => callOk(sock, "VolumeDriver.Unmount", { Name, ID });
  const isMounted = async (path: string) => (await readMounts()).some((m) => m.mountPoint === path);
  const deviceOf = async (path: string) => (await readMounts()).find((m) => m.mountPoint === path)?.source ?? "";

  before(async () => {
    dir = await mkdtemp(join(process.env["THINVOL_TEST_TMP"] ?? tmpdir(), "thinvol-server-"));
    sock = join(dir, "thinvol.sock");
    env = serverEnv(dir, { POOL_DRIVER: driver, POOL_SIZE: "3G" });
    server = await startServer(BUNDLE, env);
  });

  after(async () => {
    if (server) await stopServer(server);
    // A failed freeze test must not leave a writer blocked for ever.
    for (const m of await mountsUnder(join(dir, "volumes"))) {
      try {
        execFileSync("fsfreeze", ["--unfreeze", m], { stdio: "ignore" });
      } catch {
        // not frozen
      }
    }
    for (const m of (await mountsUnder(join(dir, "volumes"))).reverse()) execFileSync("umount", [m]);
    await tearDownPool(dir, driver === "dm-thin" ? DM_PREFIX : undefined);
    await rm(dir, { recursive: true, force: true });
  });

  test("requests with an empty Host header or none at all, as dockerd sends them, are answered", async () => {
    for (const hostLine of ["Host: \r\n", ""]) {
      const raw = await new Promise<string>((resolve, reject) => {
        const conn = createConnection(sock);
        let text = "";
        conn.on("data", (d) => (text += d.toString()));
        conn.on("end", () => resolve(text));
        conn.on("error", reject);
        conn.end(`POST /Plugin.Activate HTTP/1.1\r\n${hostLine}Content-Length: 0\r\nConnection: close\r\n\r\n`);
      });
      assert.match(raw, /^HTTP\/1\.1 200/);
      assert.match(raw, /\{"Implements":\["VolumeDriver"\]\}/);
    }
  });

  test("a volume is a block device of the requested size with an empty root", async () => {
    await create("sized", { size: "100M" });
    const mp = await mount("sized", "c1");
    assert.ok(await isMounted(mp));
    const bytes = Number(execFileSync("blockdev", ["--getsize64", await deviceOf(mp)]).toString().trim());
    assert.equal(bytes, 100 * MiB);
    assert.deepEqual(await readdir(mp), [], "no lost+found");
    await unmount("sized", "c1");
    assert.equal(await isMounted(mp), false);
  });

  test("a new volume is thin: 200 GiB in a 3 GiB pool, taking only its journal's worth of space", async () => {
    await create("huge", { size: "200G" });
    const status = ((await callOk(sock, "VolumeDriver.Get", { Name: "huge" }))["Volume"] as { Status: Record<string, number> }).Status;
    assert.equal(status["sizeBytes"], 200 * 1024 * MiB);
    // The journal (capped at 128 MiB) is written out so a full pool cannot abort it; little else is.
    assert.ok((status["allocatedBytes"] ?? Infinity) < 160 * MiB, `a fresh 200 GiB volume holds ${status["allocatedBytes"]} bytes`);
    await callOk(sock, "VolumeDriver.Remove", { Name: "huge" });
  });

  test("data written survives unmount and mount", async () => {
    await create("keep");
    let mp = await mount("keep", "c1");
    await writeFile(join(mp, "row"), "committed");
    await unmount("keep", "c1");
    mp = await mount("keep", "c2");
    assert.equal(await readFile(join(mp, "row"), "utf8"), "committed");
    await unmount("keep", "c2");
  });

  test("a write past the volume's size fails with ENOSPC", async () => {
    await create("small", { size: "32M" });
    const mp = await mount("small", "c1");
    await assert.rejects(writeFile(join(mp, "big"), Buffer.alloc(48 * MiB, 1)), { code: "ENOSPC" });
    await rm(join(mp, "big"), { force: true });
    await unmount("small", "c1");
  });

  test("xfs volumes and root ownership and mode work", async () => {
    await create("x", { fs: "xfs", size: "320M", uid: "1000", gid: "1001", mode: "0770" });
    const mp = await mount("x", "c1");
    const s = await stat(mp);
    assert.deepEqual([s.uid, s.gid, s.mode & 0o7777], [1000, 1001, 0o770]);
    assert.equal((await readMounts()).find((m) => m.mountPoint === mp)?.fsType, "xfs");
    await writeFile(join(mp, "f"), "xfs data");
    await unmount("x", "c1");
  });

  test("a clone holds the origin's data and diverges on write", async () => {
    await create("orig");
    const omp = await mount("orig", "c1");
    await writeFile(join(omp, "f"), "v1");
    await create("copy", { from: "orig" }); // while the origin is mounted and in use
    await writeFile(join(omp, "f"), "v2 in origin");
    const cmp = await mount("copy", "c2");
    assert.equal(await readFile(join(cmp, "f"), "utf8"), "v1");
    await writeFile(join(cmp, "f"), "v3 in copy");
    assert.equal(await readFile(join(omp, "f"), "utf8"), "v2 in origin");
    const got = await callOk(sock, "VolumeDriver.Get", { Name: "copy" });
    assert.equal((got["Volume"] as { Status: Record<string, unknown> }).Status["origin"], "orig");
    await unmount("copy", "c2");
    await unmount("orig", "c1");
  });

  test("two mount IDs (one twice) share one mount; the last Unmount unmounts", async () => {
    await create("shared");
    const a = await mount("shared", "c1");
    const b = await mount("shared", "c2");
    await mount("shared", "c1");
    assert.equal(a, b);
    assert.equal((await readMounts()).filter((m) => m.mountPoint === a).length, 1);
    await unmount("shared", "c1");
    await unmount("shared", "c2");
    assert.ok(await isMounted(a), "c1 mounted twice and still holds one reference");
    await unmount("shared", "c1");
    assert.equal(await isMounted(a), false);
  });

  test("bad requests give clear errors and create nothing", async () => {
    const cases: [unknown, RegExp][] = [
      [{ Name: "../etc", Opts: null }, /invalid volume name "..\/etc"/],
      [{ Name: "v1", Opts: { colour: "red" } }, /unknown option "colour"; allowed options are size, fs, from/],
      [{ Name: "v2", Opts: { size: "big" } }, /size "big" is not a size/],
      [{ Name: "v3", Opts: { from: "nothing-here" } }, /volume "nothing-here" does not exist/],
    ];
    for (const [body, pattern] of cases) {
      const reply = await callPlugin(sock, "VolumeDriver.Create", body);
      assert.equal(reply.status, 500);
      assert.match(String(reply.body["Err"]), pattern);
    }
    const names = ((await callOk(sock, "VolumeDriver.List"))["Volumes"] as { Name: string }[]).map((v) => v.Name);
    for (const n of ["v1", "v2", "v3"]) assert.equal(names.includes(n), false);
  });

  test("after SIGTERM and after kill -9 the volumes, their data and live mounts are all still there", async () => {
    await create("durable");
    const mp = await mount("durable", "c1");
    await writeFile(join(mp, "f"), "before restart");

    assert.equal(await stopServer(server, "SIGTERM"), 0);
    server = await startServer(BUNDLE, env);
    assert.ok(await isMounted(mp), "a running container's volume stays mounted across a plugin restart");
    assert.equal(await readFile(join(mp, "f"), "utf8"), "before restart");

    await stopServer(server, "SIGKILL");
    server = await startServer(BUNDLE, env);
    assert.ok(await isMounted(mp));
    assert.deepEqual((await callOk(sock, "VolumeDriver.Path", { Name: "durable" }))["Mountpoint"], mp);
    await unmount("durable", "c1");
    assert.equal(await isMounted(mp), false, "the reference taken before the crash is still counted");
    const again = await mount("durable", "c9");
    assert.equal(await readFile(join(again, "f"), "utf8"), "before restart");
    await unmount("durable", "c9");
    const names = ((await callOk(sock, "VolumeDriver.List"))["Volumes"] as { Name: string }[]).map((v) => v.Name);
    for (const n of ["sized", "keep", "small", "x", "orig", "copy", "shared", "durable"]) assert.ok(names.includes(n), n);
  });

  test("a filesystem left frozen by a crash in the middle of a clone is thawed at the next start", { timeout: 60_000 }, async () => {
    await create("frozen");
    const mp = await mount("frozen", "c1");
    execFileSync("fsfreeze", ["--freeze", mp]);
    await stopServer(server, "SIGKILL");
    server = await startServer(BUNDLE, env);
    await writeFile(join(mp, "after"), "writable again"); // would block for ever on a frozen filesystem
    assert.match(server.output(), /thawed a filesystem left frozen by an interrupted clone volume=frozen/);
    await unmount("frozen", "c1");
  });

  test("after a reboot (pool torn down, mounts gone) everything comes back and stale references are dropped", async () => {
    const mp = await mount("keep", "c-before-reboot");
    await stopServer(server, "SIGKILL");
    // What a host reboot leaves: no mounts, no loop devices; only the files.
    for (const m of (await mountsUnder(join(dir, "volumes"))).reverse()) execFileSync("umount", [m]);
    await tearDownPool(dir, driver === "dm-thin" ? DM_PREFIX : undefined);
    assert.deepEqual(await loopDevicesUnder(dir), []);
    assert.deepEqual(await dmDevicesNamed(DM_PREFIX), []);
    server = await startServer(BUNDLE, env);
    assert.equal((await callOk(sock, "VolumeDriver.Path", { Name: "keep" }))["Mountpoint"], undefined);
    const again = await mount("keep", "c-after");
    assert.equal(again, mp);
    assert.equal(await readFile(join(again, "row"), "utf8"), "committed");
    await unmount("keep", "c-after");
    assert.equal(await isMounted(again), false, "the pre-reboot reference was dropped, not counted");
  });

  test("start-up starts no process for an idle volume: 30 more volumes, about the same count", { timeout: 120_000 }, async () => {
    const IDLE = 30;
    const processesAtStart = () => {
      const m = / ready .*processes=(\d+)/.exec(server.output());
      assert.ok(m, `no ready line with a process count:\n${server.output()}`);
      return Number(m[1]);
    };
    await stopServer(server);
    server = await startServer(BUNDLE, env);
    const before = processesAtStart();
    for (let i = 0; i < IDLE; i++) await create(`idle${i}`);
    await stopServer(server);
    server = await startServer(BUNDLE, env);
    const after = processesAtStart();
    // The pool's own set-up varies by a few commands with its fill; one per volume would add 30.
    assert.ok(after - before < IDLE / 3, `start-up ran ${before} commands with the earlier volumes and ${after} with ${IDLE} more`);
    for (let i = 0; i < IDLE; i++) await callOk(sock, "VolumeDriver.Remove", { Name: `idle${i}` });
  });

  test("remove leaves no loop device, no mount and no file behind, and returns the space", async () => {
    await create("trash", { size: "256M" });
    const mp = await mount("trash", "c1");
    await writeFile(join(mp, "blob"), Buffer.alloc(128 * MiB, 3));
    await unmount("trash", "c1");
    const pool = poolDataFile(dir);
    const before = (await stat(pool)).blocks * 512;
    await callOk(sock, "VolumeDriver.Remove", { Name: "trash" });
    const afterRemove = (await stat(pool)).blocks * 512;
    if (driver === "loop") assert.ok(before - afterRemove >= 120 * MiB, `the pool file shrank by only ${before - afterRemove} bytes`);
    // dm-thin returns the space to the pool; the data file's host space stays reserved for it (no_discard_passdown).
    else assert.ok(afterRemove >= before, `the dm-thin data file gave back ${before - afterRemove} bytes of its reservation`);
    assert.equal(await isMounted(mp), false);
    assert.deepEqual((await loopDevicesUnder(dir)).filter((l) => l.includes("trash")), []);
    assert.deepEqual(await dmDevicesNamed(`${DM_PREFIX}trash`), []);
    if (driver === "loop") await assert.rejects(stat(join(dir, "state", "pool-loop", "mnt", "volumes", "trash.img")), { code: "ENOENT" });
    await assert.rejects(stat(join(dir, "state", "volumes", "trash.json")), { code: "ENOENT" });
    const reply = await callPlugin(sock, "VolumeDriver.Get", { Name: "trash" });
    assert.match(String(reply.body["Err"]), /volume "trash" does not exist/);
  });

  test("removing every volume leaves only the pool's own devices", async () => {
    const list = (await callOk(sock, "VolumeDriver.List"))["Volumes"] as { Name: string }[];
    for (const v of list) await callOk(sock, "VolumeDriver.Remove", { Name: v.Name });
    assert.deepEqual(await mountsUnder(join(dir, "volumes")), []);
    const loops = (await loopDevicesUnder(dir)).map((l) => l.replace(/^\S+ /, "").replace(dir, ""));
    if (driver === "loop") {
      assert.deepEqual(loops, ["/state/pool-loop/pool.img"]);
    } else {
      assert.deepEqual(loops.sort(), ["/state/pool-dm-thin/data.img", "/state/pool-dm-thin/meta.img"]);
      assert.deepEqual(await dmDevicesNamed(DM_PREFIX), [`${DM_PREFIX}pool`]);
    }
  });

  test("stopping with no volume in use takes the pool down: no device is left on the host", async () => {
    assert.equal(await stopServer(server, "SIGTERM"), 0);
    assert.match(server.output(), /pool taken down/);
    assert.deepEqual(await loopDevicesUnder(dir), []);
    assert.deepEqual(await dmDevicesNamed(DM_PREFIX), []);
    assert.deepEqual(await mountsUnder(dir), []);
    // And the next start sets it up again.
    server = await startServer(BUNDLE, env);
    await create("after-stop");
    const mp = await mount("after-stop", "c1");
    await writeFile(join(mp, "f"), "ok");
    await unmount("after-stop", "c1");
    await callOk(sock, "VolumeDriver.Remove", { Name: "after-stop" });
  });
});
