/**
 * Resize, snapshots, rollback and pool growth through the real server bundle and its admin
 * socket, on real devices: loop here, dm-thin in the VM tier (THINVOL_TEST_POOL_DRIVER).
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { mkdtemp, open, readFile, readdir, rm, statfs, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { CAP_SYS_RESOURCE, hasCapability } from "../../src/system/capabilities.js";
import { readMounts } from "../../src/system/mount.js";
import { adminOk, callAdmin } from "../support/admin-client.js";
import { mountsUnder, tearDownPool } from "../support/kernel.js";
import { BUNDLE, callOk, callPlugin, serverEnv, startServer, stopServer, type ServerProcess } from "../support/plugin-client.js";

const MiB = 1024 ** 2;
const driver = process.env["THINVOL_TEST_POOL_DRIVER"] === "dm-thin" ? "dm-thin" : "loop";
/** Growing a mounted ext4 filesystem needs CAP_SYS_RESOURCE; some hosts (containers) withhold it from root. */
const online = await hasCapability(CAP_SYS_RESOURCE);
const DM_PREFIX = "thinvol-";

const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

/**
 * Writes and fsyncs 1 MiB files in a ring of `files`, each with content of its own, until
 * stopped; every failure is kept. The ring never fills the volume.
 */
function startWriter(dir: string, files = 16) {
  const errors: string[] = [];
  const last = new Map<number, string>();
  let writes = 0;
  let stopped = false;
  const done = (async () => {
    for (let i = 0; !stopped; i++) {
      const slot = i % files;
      const data = randomBytes(MiB);
      try {
        const h = await open(join(dir, `w${slot}`), "w");
        try {
          await h.writeFile(data);
          await h.sync();
        } finally {
          await h.close();
        }
        last.set(slot, sha(data));
        writes++;
      } catch (err) {
        // A writer that fails once has shown what the test looks for; it stops there.
        errors.push(String(err));
        return;
      }
    }
  })();
  return {
    errors,
    /** Waits until `n` more writes have succeeded; fails as soon as one fails. */
    async after(n: number) {
      const target = writes + n;
      while (writes < target) {
        if (errors.length > 0) throw new Error(`the writer failed: ${errors[0]}`);
        await new Promise((r) => setTimeout(r, 10));
      }
    },
    get writes() {
      return writes;
    },
    async stop() {
      stopped = true;
      await done;
      return last;
    },
  };
}

async function checkRing(dir: string, last: Map<number, string>): Promise<void> {
  for (const [slot, digest] of last) assert.equal(sha(await readFile(join(dir, `w${slot}`))), digest, `file w${slot} holds what was last written`);
}

describe(`resize, snapshots and rollback with the ${driver} pool`, () => {
  let dir: string;
  let sock: string;
  let adminSock: string;
  let server: ServerProcess;

  const create = (Name: string, Opts: Record<string, string> | null = null) => callOk(sock, "VolumeDriver.Create", { Name, Opts });
  const mount = async (Name: string, ID: string) => String((await callOk(sock, "VolumeDriver.Mount", { Name, ID }))["Mountpoint"]);
  const unmount = (Name: string, ID: string) => callOk(sock, "VolumeDriver.Unmount", { Name, ID });
  const status = async (Name: string) => ((await callOk(sock, "VolumeDriver.Get", { Name }))["Volume"] as { Status: Record<string, unknown> }).Status;
  const deviceOf = async (path: string) => (await readMounts()).find((m) => m.mountPoint === path)?.source ?? "";
  const fsBytes = async (mp: string) => {
    const s = await statfs(mp);
    return s.blocks * s.bsize;
  };

  before(async () => {
    dir = await mkdtemp(join(process.env["THINVOL_TEST_TMP"] ?? tmpdir(), "thinvol-ops-"));
    sock = join(dir, "thinvol.sock");
    adminSock = join(dir, "state", "admin.sock");
    server = await startServer(BUNDLE, serverEnv(dir, { POOL_DRIVER: driver, POOL_SIZE: "3G" }));
  });

  after(async () => {
    if (server) await stopServer(server);
    for (const m of (await mountsUnder(join(dir, "volumes"))).reverse()) execFileSync("umount", [m]);
    await tearDownPool(dir, driver === "dm-thin" ? DM_PREFIX : undefined);
    await rm(dir, { recursive: true, force: true });
  });

  test("without CAP_SYS_RESOURCE a mounted ext4 volume is not grown, and says why; unmounted it grows offline", { skip: online ? "this host gives CAP_SYS_RESOURCE: the online test runs instead" : false }, async () => {
    await create("ext4-off", { size: "64M" });
    let mp = await mount("ext4-off", "c1");
    await writeFile(join(mp, "f"), "kept");
    const refused = await callAdmin(adminSock, "POST", "/v1/volumes/ext4-off/resize", { size: "160M" });
    assert.equal(refused.status, 409);
    assert.match(String(refused.json["error"]), /cannot resize volume "ext4-off" while it is mounted: growing a mounted ext4 filesystem needs the CAP_SYS_RESOURCE capability/);
    assert.equal(Number(execFileSync("blockdev", ["--getsize64", await deviceOf(mp)]).toString().trim()), 64 * MiB, "the device did not change");
    await unmount("ext4-off", "c1");
    await adminOk(adminSock, "POST", "/v1/volumes/ext4-off/resize", { size: "160M" });
    mp = await mount("ext4-off", "c1");
    assert.equal(await readFile(join(mp, "f"), "utf8"), "kept");
    assert.ok((await fsBytes(mp)) > 140 * MiB);
    await unmount("ext4-off", "c1");
  });

  for (const [fs, from, to] of [
    ["ext4", "64M", 160 * MiB],
    ["xfs", "320M", 640 * MiB],
  ] as const) {
    const skip = fs === "ext4" && !online ? "growing a mounted ext4 filesystem needs CAP_SYS_RESOURCE, which this host withholds (the VM tier runs it)" : false;
    test(`a mounted ${fs} volume grows under a writer that never stops; the new space is usable at once`, { skip }, async () => {
      const name = `grow-${fs}`;
      await create(name, { fs, size: from });
      const mp = await mount(name, "c1");
      const before = await fsBytes(mp);
      const writer = startWriter(mp);
      await writer.after(8);
      const reply = await adminOk(adminSock, "POST", `/v1/volumes/${name}/resize`, { size: String(to) });
      assert.equal(reply["sizeBytes"], to);
      await writer.after(8);
      const last = await writer.stop();
      assert.deepEqual(writer.errors, [], "no write failed while the volume grew");
      assert.equal(Number(execFileSync("blockdev", ["--getsize64", await deviceOf(mp)]).toString().trim()), to, "the device has the new size");
      const after = await fsBytes(mp);
      assert.ok(after > before + (to - before) * 0.8, `the filesystem grew from ${before} to ${after} bytes, for a ${to}-byte device`);
      // More than the old size could ever hold, written at once.
      const big = randomBytes(Number(from.slice(0, -1)) * MiB);
      await writeFile(join(mp, "big"), big);
      assert.equal(sha(await readFile(join(mp, "big"))), sha(big));
      await checkRing(mp, last);
      const s = await status(name);
      assert.equal(s["sizeBytes"], to, "docker volume inspect shows the new size");
      await unmount(name, "c1");
      // Still whole after an unmount and a mount, and a shrink is refused.
      const again = await mount(name, "c2");
      assert.equal(sha(await readFile(join(again, "big"))), sha(big));
      const shrink = await callAdmin(adminSock, "POST", `/v1/volumes/${name}/resize`, { size: from });
      assert.equal(shrink.status, 409);
      assert.match(String(shrink.json["error"]), new RegExp(`cannot resize volume "${name}" to .*a volume never shrinks`));
      await unmount(name, "c2");
    });
  }

  test("an unmounted volume grows too, and keeps its data", async () => {
    await create("cold", { size: "64M" });
    let mp = await mount("cold", "c1");
    await writeFile(join(mp, "f"), "kept");
    await unmount("cold", "c1");
    await adminOk(adminSock, "POST", "/v1/volumes/cold/resize", { size: "200M" });
    mp = await mount("cold", "c1");
    assert.equal(await readFile(join(mp, "f"), "utf8"), "kept");
    assert.ok((await fsBytes(mp)) > 150 * MiB);
    await unmount("cold", "c1");
  });

  test("snapshot, write, rollback: the snapshot's bytes come back, in place, under the same name", async () => {
    await create("db", { size: "128M" });
    let mp = await mount("db", "c1");
    const original = randomBytes(8 * MiB);
    await writeFile(join(mp, "table"), original);
    const snap = await adminOk(adminSock, "POST", "/v1/volumes/db/snapshots", { name: "before" });
    assert.equal(snap["name"], "before");
    await writeFile(join(mp, "table"), randomBytes(8 * MiB));
    await writeFile(join(mp, "new-file"), "after the snapshot");
    // A volume made from the snapshot holds the snapshot's data.
    await create("db-copy", { from: "db@before" });
    const cmp = await mount("db-copy", "c9");
    assert.equal(sha(await readFile(join(cmp, "table"))), sha(original));
    assert.deepEqual((await readdir(cmp)).sort(), ["table"]);
    await unmount("db-copy", "c9");

    const refused = await callAdmin(adminSock, "POST", "/v1/volumes/db/rollback", { snapshot: "before" });
    assert.equal(refused.status, 409, "refused while mounted");
    assert.match(String(refused.json["error"]), /cannot roll back volume "db" to snapshot "before": it is mounted/);
    await unmount("db", "c1");
    await adminOk(adminSock, "POST", "/v1/volumes/db/rollback", { snapshot: "before" });
    mp = await mount("db", "c1");
    assert.equal(sha(await readFile(join(mp, "table"))), sha(original));
    assert.deepEqual((await readdir(mp)).sort(), ["table"]);
    await unmount("db", "c1");

    // Docker cannot remove a volume that has snapshots, and says how.
    const rm1 = await callPlugin(sock, "VolumeDriver.Remove", { Name: "db" });
    assert.match(String(rm1.body["Err"]), /cannot remove volume "db": it has a snapshot "before"; remove it first with thinvol snapshot rm db before/);
    const list = await adminOk(adminSock, "GET", "/v1/snapshots?volume=db");
    assert.deepEqual((list["snapshots"] as { name: string }[]).map((s) => s.name), ["before"]);
    await adminOk(adminSock, "DELETE", "/v1/volumes/db/snapshots/before");
    await callOk(sock, "VolumeDriver.Remove", { Name: "db" });
    await callOk(sock, "VolumeDriver.Remove", { Name: "db-copy" });
  });

  test("a snapshot taken under write load is a clean filesystem", async () => {
    await create("busy", { size: "128M" });
    const mp = await mount("busy", "c1");
    const writer = startWriter(mp);
    await writer.after(8);
    await adminOk(adminSock, "POST", "/v1/volumes/busy/snapshots", { name: "hot" });
    const last = await writer.stop();
    assert.deepEqual(writer.errors, []);
    // Checked as it was taken, never mounted (a mount would replay a journal and hide a torn snapshot).
    // The loop pool's snapshot is an image file; dm-thin's are checked in the VM tier (test/vm/dmthin-ops.test.ts).
    if (driver === "loop") execFileSync("e2fsck", ["-f", "-n", join(dir, "state", "pool-loop", "mnt", "snapshots", "busy@hot.img")], { stdio: "pipe" });
    await create("busy-copy", { from: "busy@hot" });
    const cmp = await mount("busy-copy", "c2");
    assert.ok((await readdir(cmp)).filter((f) => f.startsWith("w")).length >= 8, "the copy holds what was written before the snapshot");
    await unmount("busy-copy", "c2");
    await checkRing(mp, last);
    await unmount("busy", "c1");
  });

  test("a pool short of space refuses a resize and changes nothing; after the pool grows, the resize works while in use", async () => {
    const fill = "filler";
    await create(fill, { size: "4G" });
    const fmp = await mount(fill, "f1");
    // xfs grows mounted on every host (ext4 needs CAP_SYS_RESOURCE).
    await create("tight", { fs: "xfs", size: "320M" });
    const mp = await mount("tight", "t1");
    await writeFile(join(mp, "keep"), "kept");
    // Fill the pool past its MIN_FREE_SPACE (5%).
    // Until the pool is under its MIN_FREE_SPACE (5%), or full: either way, short of space.
    const chunk = randomBytes(64 * MiB);
    const h = await open(join(fmp, "fill"), "w");
    try {
      for (;;) {
        const p = await adminOk(adminSock, "GET", "/v1/pool");
        if (Number(p["dataUsedBytes"]) > Number(p["dataTotalBytes"]) * 0.96) break;
        await h.write(chunk);
        await h.sync();
      }
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOSPC") throw err;
    } finally {
      await h.close().catch(() => undefined);
    }
    const refused = await callAdmin(adminSock, "POST", "/v1/volumes/tight/resize", { size: "400M" });
    assert.equal(refused.status, 507, refused.text);
    assert.equal(refused.json["kind"], "no-space");
    assert.match(String(refused.json["error"]), /cannot resize (thin )?volume "tight"/);
    assert.equal((await status("tight"))["sizeBytes"], 320 * MiB);
    assert.equal(Number(execFileSync("blockdev", ["--getsize64", await deviceOf(mp)]).toString().trim()), 320 * MiB);

    const writer = startWriter(mp, 4);
    const grown = await adminOk(adminSock, "POST", "/v1/pool/grow", { size: "6G" });
    assert.ok(Number(grown["dataTotalBytes"]) >= 5.5 * 1024 * MiB, `the pool has ${String(grown["dataTotalBytes"])} bytes`);
    await adminOk(adminSock, "POST", "/v1/volumes/tight/resize", { size: "400M" });
    const last = await writer.stop();
    assert.deepEqual(writer.errors, []);
    await checkRing(mp, last);
    assert.equal(await readFile(join(mp, "keep"), "utf8"), "kept");
    const shrink = await callAdmin(adminSock, "POST", "/v1/pool/grow", { size: "1G" });
    assert.equal(shrink.status, 409);
    await rm(join(fmp, "fill"));
    await unmount("tight", "t1");
    await unmount(fill, "f1");
  });

  test("the admin API lists volumes with usage, and serves metrics", async () => {
    const mp = await mount("cold", "c1");
    const vols = (await adminOk(adminSock, "GET", "/v1/volumes"))["volumes"] as Record<string, unknown>[];
    const cold = vols.find((v) => v["name"] === "cold");
    assert.ok(cold);
    assert.equal(cold["mounted"], true);
    assert.equal(cold["mountpoint"], mp);
    assert.ok(Number(cold["usedBytes"]) > 0);
    assert.ok(Number(cold["allocatedBytes"]) > 0);
    const metrics = await callAdmin(adminSock, "GET", "/metrics");
    assert.equal(metrics.status, 200);
    assert.match(metrics.text, new RegExp(`^thinvol_pool_data_bytes_total\\{driver="${driver}"\\} \\d+$`, "m"));
    assert.match(metrics.text, /^thinvol_volume_size_bytes\{volume="cold"\} 209715200$/m);
    assert.match(metrics.text, /^thinvol_requests_total\{api="admin",method="resize",outcome="ok"\} [1-9]/m);
    await unmount("cold", "c1");
  });

  test("sizes and snapshots outlive a restart of the plugin", async () => {
    await adminOk(adminSock, "POST", "/v1/volumes/cold/snapshots", { name: "keep" });
    await stopServer(server);
    server = await startServer(BUNDLE, serverEnv(dir, { POOL_DRIVER: driver, POOL_SIZE: "3G" }));
    const cold = await adminOk(adminSock, "GET", "/v1/volumes/cold");
    assert.equal(cold["sizeBytes"], 200 * MiB);
    assert.deepEqual(cold["snapshots"], ["keep"]);
    const pool = await adminOk(adminSock, "GET", "/v1/pool");
    assert.ok(Number(pool["dataTotalBytes"]) >= 5.5 * 1024 * MiB, "the grown pool keeps its size although POOL_SIZE is smaller");
    await adminOk(adminSock, "DELETE", "/v1/volumes/cold/snapshots/keep");
  });
});
