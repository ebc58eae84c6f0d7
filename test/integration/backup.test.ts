/**
 * Backups and restores through the real server bundle and its admin socket, on real devices:
 * the loop pool here, dm-thin in the VM tier (THINVOL_TEST_POOL_DRIVER). The target is a
 * directory (file:///...); the S3 store is proved against a real S3 server in the unit tier.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { createReadStream } from "node:fs";
import { mkdtemp, open, readdir, readFile, rm, unlink, writeFile } from "node:fs/promises";
import { request } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { adminOk, callAdmin } from "../support/admin-client.js";
import { mountsUnder, tearDownPool } from "../support/kernel.js";
import { BUNDLE, callOk, callPlugin, serverEnv, startServer, stopServer, type ServerProcess } from "../support/plugin-client.js";
import { startS3Server, type S3Server } from "../support/s3-server.js";

const MiB = 1024 ** 2;
const driver = process.env["THINVOL_TEST_POOL_DRIVER"] === "dm-thin" ? "dm-thin" : "loop";
const DM_PREFIX = "thinvol-";

async function shaOfFile(path: string): Promise<string> {
  const h = createHash("sha256");
  for await (const chunk of createReadStream(path, { highWaterMark: 4 * MiB })) h.update(chunk as Buffer);
  return h.digest("hex");
}

/** Every regular file under `dir` with its digest: what a container would see. */
async function tree(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const e of await readdir(dir, { recursive: true, withFileTypes: true })) {
    if (!e.isFile()) continue;
    const path = join(e.parentPath, e.name);
    out[path.slice(dir.length + 1)] = await shaOfFile(path);
  }
  return out;
}

/**
 * Calls an admin route with progress (ndjson) and calls `onProgress` for each message; the
 * promise ends with the result, or rejects with the error event or a broken connection.
 */
function streamAdmin(socketPath: string, method: string, path: string, body: unknown, onProgress: (message: string) => void): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, path, method, headers: { "Content-Type": "application/json", Accept: "application/x-ndjson" } }, (res) => {
      let buffered = "";
      let result: Record<string, unknown> | undefined;
      let error: string | undefined;
      res.setEncoding("utf8");
      res.on("data", (chunk: string) => {
        buffered += chunk;
        for (let nl = buffered.indexOf("\n"); nl >= 0; nl = buffered.indexOf("\n")) {
          const event = JSON.parse(buffered.slice(0, nl)) as { event: string; message?: string; result?: Record<string, unknown>; error?: string };
          buffered = buffered.slice(nl + 1);
          if (event.event === "progress") onProgress(event.message ?? "");
          else if (event.event === "result") result = event.result;
          else error = event.error;
        }
      });
      res.on("end", () => (result ? resolve(result) : reject(new Error(error ?? "the reply ended without a result"))));
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end(JSON.stringify(body));
  });
}

describe(`backups and restores with the ${driver} pool`, () => {
  let dir: string;
  let sock: string;
  let adminSock: string;
  let server: ServerProcess;
  let target: string;
  let targetDir: string;
  let s3: S3Server;
  const env = () =>
    serverEnv(dir, {
      POOL_DRIVER: driver,
      POOL_SIZE: "6G",
      S3_ENDPOINT: s3.settings.endpoint ?? "",
      S3_REGION: s3.settings.region ?? "",
      S3_ACCESS_KEY_ID: s3.settings.accessKeyId ?? "",
      S3_SECRET_ACCESS_KEY: s3.settings.secretAccessKey ?? "",
    });

  const create = (Name: string, Opts: Record<string, string> | null = null) => callOk(sock, "VolumeDriver.Create", { Name, Opts });
  const mount = async (Name: string, ID: string) => String((await callOk(sock, "VolumeDriver.Mount", { Name, ID }))["Mountpoint"]);
  const unmount = (Name: string, ID: string) => callOk(sock, "VolumeDriver.Unmount", { Name, ID });
  const volumeNames = async () => ((await callOk(sock, "VolumeDriver.List"))["Volumes"] as { Name: string }[]).map((v) => v.Name).sort();
  /** The loop pool keeps each volume and snapshot as an image file: compared byte for byte. */
  const image = (name: string) => join(dir, "state", "pool-loop", "mnt", "volumes", `${name}.img`);
  const snapshotImage = (volume: string, snap: string) => join(dir, "state", "pool-loop", "mnt", "snapshots", `${volume}@${snap}.img`);
  const backup = (volume: string) => adminOk(adminSock, "POST", `/v1/volumes/${volume}/backups`, { to: target });
  const restore = (id: string, volume: string) => adminOk(adminSock, "POST", "/v1/restore", { from: target, id, volume });
  const fsck = (name: string) => {
    // e2fsck -n on the image file of an unmounted volume: it must be clean.
    const out = execFileSync("e2fsck", ["-f", "-n", image(name)], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
    return out;
  };

  /** The data of the first backup, and of the second (after 1% of the volume changed). */
  const at: Record<string, Record<string, string>> = {};
  const ids: string[] = [];
  const full: Record<string, number> = {};

  before(async () => {
    dir = await mkdtemp(join(process.env["THINVOL_TEST_TMP"] ?? tmpdir(), "thinvol-backup-"));
    sock = join(dir, "thinvol.sock");
    adminSock = join(dir, "state", "admin.sock");
    targetDir = join(dir, "target");
    target = `file://${targetDir}`;
    s3 = await startS3Server();
    server = await startServer(BUNDLE, env());
  });

  after(async () => {
    if (server) await stopServer(server);
    await s3?.stop();
    for (const m of (await mountsUnder(join(dir, "volumes"))).reverse()) execFileSync("umount", [m]);
    await tearDownPool(dir, driver === "dm-thin" ? DM_PREFIX : undefined);
    await rm(dir, { recursive: true, force: true });
  });

  test("a full backup of a mounted 1 GiB volume stores only its data; 1% changed, the next stores about 1%", async () => {
    await create("db", { size: "1G" });
    const mp = await mount("db", "c1");
    // 160 MiB of incompressible data in 20 files, as a database's files would be.
    for (let i = 0; i < 20; i++) await writeFile(join(mp, `table${i}`), randomBytes(8 * MiB));
    execFileSync("sync", ["-f", join(mp, "table0")]);
    at["first"] = await tree(mp);
    let t = Date.now();
    const first = await backup("db");
    const fullMs = Date.now() - t;
    ids.push(String(first["id"]));
    Object.assign(full, first);
    assert.equal(first["incremental"], false);
    assert.equal(first["volume"], "db");
    assert.ok(Number(first["bytesUploaded"]) >= 160 * MiB, `the data is stored: ${String(first["bytesUploaded"])} bytes`);
    assert.ok(Number(first["bytesRead"]) < 260 * MiB, `only what the volume holds is read, not its 1 GiB: ${String(first["bytesRead"])} bytes`);

    // Change 1% of the volume: 10 MiB rewritten in place, in five places.
    for (let i = 0; i < 5; i++) {
      const h = await open(join(mp, `table${i * 4}`), "r+");
      await h.write(randomBytes(2 * MiB), 0, 2 * MiB, 2 * MiB);
      await h.sync();
      await h.close();
    }
    at["second"] = await tree(mp);
    t = Date.now();
    const second = await backup("db");
    const incrementalMs = Date.now() - t;
    ids.push(String(second["id"]));
    assert.equal(second["incremental"], true, "the snapshot of the first backup told what changed");
    assert.equal(second["previous"], first["id"]);
    const sent = Number(second["bytesUploaded"]);
    assert.ok(sent >= 10 * MiB && sent <= 30 * MiB, `about the 10 MiB changed is stored: ${sent} bytes`);
    assert.ok(Number(second["blocksRead"]) <= 20, `only changed blocks are read: ${String(second["blocksRead"])}`);
    console.log(
      `  # ${driver}: full backup of a 1 GiB volume holding 160 MiB: ${fullMs} ms, ${first["blocksRead"]} blocks read, ${first["bytesUploaded"]} bytes stored; ` +
        `1% changed (10 MiB): incremental ${incrementalMs} ms, ${second["blocksRead"]} blocks read, ${second["blocksChanged"]} changed, ${sent} bytes stored`,
    );
    await unmount("db", "c1");

    const listed = await adminOk(adminSock, "GET", `/v1/backups?to=${encodeURIComponent(target)}`);
    assert.deepEqual((listed["backups"] as { id: string }[]).map((b) => b.id), ids, "both are listed, oldest first");
    // The volume keeps one snapshot, the newest backup's, to tell the next backup what changed.
    const snaps = await adminOk(adminSock, "GET", "/v1/snapshots?volume=db");
    assert.deepEqual((snaps["snapshots"] as { name: string }[]).map((s) => s.name), [`backup-${ids[1]}`]);
  });

  test("each backup restores, byte for byte and thin, through the admin API and through docker volume create -o backup=", async () => {
    const t = Date.now();
    const r1 = await restore(ids[0] ?? "", "db-at-first");
    const restoreMs = Date.now() - t;
    assert.equal(r1["sizeBytes"], 1024 * MiB);
    assert.equal(r1["filesystem"], "ext4");
    await create("db-at-second", { backup: `${target}#${ids[1]}` });
    if (driver === "loop") {
      // Before any mount (which writes to the filesystem): the restored image is the newest
      // backup's snapshot, still kept for the next backup, byte for byte.
      assert.equal(await shaOfFile(image("db-at-second")), await shaOfFile(snapshotImage("db", `backup-${ids[1]}`)));
    }
    for (const [name, when] of [
      ["db-at-first", "first"],
      ["db-at-second", "second"],
    ] as const) {
      const mp = await mount(name, "r");
      assert.deepEqual(await tree(mp), at[when], `${name} holds the files as they were at the ${when} backup`);
      await unmount(name, "r");
      const vol = await adminOk(adminSock, "GET", `/v1/volumes/${name}`);
      assert.ok(Number(vol["allocatedBytes"]) < 300 * MiB, `${name} is thin: ${String(vol["allocatedBytes"])} bytes allocated of 1 GiB`);
    }
    if (driver === "loop") fsck("db-at-first");
    console.log(`  # ${driver}: restore of the full backup (160 MiB of data in 1 GiB): ${restoreMs} ms`);
  });

  test("a clone's backup to the same target stores next to nothing: blocks are stored once per target", async () => {
    await create("db-clone", { from: "db" });
    const r = await backup("db-clone");
    assert.ok(Number(r["bytesUploaded"]) < 8 * MiB, `the clone's blocks are already there: ${String(r["bytesUploaded"])} bytes stored of ${String(r["bytesRead"])} read`);
  });

  test("killed during a backup: nothing half-made is listed; run again, it completes and restores", async () => {
    await create("big", { size: "1G" });
    const mp = await mount("big", "c1");
    for (let i = 0; i < 24; i++) await writeFile(join(mp, `f${i}`), randomBytes(10 * MiB));
    const files = await tree(mp);
    await unmount("big", "c1");
    const before = (await readdir(join(targetDir, "backups"))).sort();
    let killed = false;
    const running = streamAdmin(adminSock, "POST", "/v1/volumes/big/backups", { to: target }, (message) => {
      if (!killed && /^read \d+\/\d+ blocks/.test(message)) {
        killed = true;
        server.child.kill("SIGKILL");
      }
    });
    await assert.rejects(running);
    assert.ok(killed, "the plugin was killed while it read blocks");
    await stopServer(server);
    server = await startServer(BUNDLE, env());
    assert.deepEqual((await readdir(join(targetDir, "backups"))).sort(), before, "no record of the killed backup");
    const again = await backup("big");
    assert.equal(again["incremental"], false);
    const r = await restore(String(again["id"]), "big-back");
    assert.equal(r["sizeBytes"], 1024 * MiB);
    const back = await mount("big-back", "r");
    assert.deepEqual(await tree(back), files);
    await unmount("big-back", "r");
    // The killed run's snapshot went when the next backup to the same target completed.
    const snaps = await adminOk(adminSock, "GET", "/v1/snapshots?volume=big");
    assert.deepEqual((snaps["snapshots"] as { name: string }[]).map((s) => s.name), [`backup-${String(again["id"])}`]);
  });

  test("killed during a restore: the volume does not exist after the restart; run again, it is whole", async () => {
    const id = ids[1] ?? "";
    let killed = false;
    const running = streamAdmin(adminSock, "POST", "/v1/restore", { from: target, id, volume: "half" }, (message) => {
      if (!killed && /^restored \d+\/\d+ blocks/.test(message)) {
        killed = true;
        server.child.kill("SIGKILL");
      }
    });
    await assert.rejects(running);
    assert.ok(killed, "the plugin was killed while it wrote blocks");
    await stopServer(server);
    server = await startServer(BUNDLE, env());
    assert.ok(!(await volumeNames()).includes("half"), "Docker does not see a half-restored volume");
    assert.equal((await callAdmin(adminSock, "GET", "/v1/volumes/half")).status, 404);
    await restore(id, "half");
    const mp = await mount("half", "r");
    assert.deepEqual(await tree(mp), at["second"]);
    await unmount("half", "r");
  });

  test("backup rm collects the blocks no other backup names; verify finds a missing block", async () => {
    const files = async () => (await readdir(join(targetDir, "blocks"), { recursive: true, withFileTypes: true })).filter((e) => e.isFile());
    // Stored blocks; files starting with "." are puts in flight, or left by the backup killed above.
    const blocks = async () => (await files()).filter((e) => !e.name.startsWith(".")).length;
    const beforeRm = await blocks();
    const leftovers = (await files()).length - beforeRm;
    const removed = await adminOk(adminSock, "DELETE", `/v1/backups/${ids[0]}?to=${encodeURIComponent(target)}`);
    assert.equal(removed["volume"], "db");
    assert.ok(Number(removed["blocksDeleted"]) >= 1, `the blocks only the first backup had are deleted: ${String(removed["blocksDeleted"])}`);
    assert.equal(await blocks(), beforeRm - Number(removed["blocksDeleted"]));
    assert.equal(removed["leftoversRemoved"], leftovers, "the killed backup's half-written files are gone too");
    assert.equal((await files()).length, await blocks());
    assert.equal((await callAdmin(adminSock, "POST", "/v1/restore", { from: target, id: ids[0], volume: "gone" })).status, 404);
    // The second backup is complete on its own.
    const ok = await adminOk(adminSock, "POST", `/v1/backups/${ids[1]}/verify`, { to: target });
    assert.equal(ok["ok"], true);
    await restore(ids[1] ?? "", "after-rm");
    const mp = await mount("after-rm", "r");
    assert.deepEqual(await tree(mp), at["second"]);
    await unmount("after-rm", "r");
    // Take one of its blocks away: verify names it.
    const manifest = JSON.parse(await readFile(join(targetDir, "backups", "db", `${ids[1]}.json`), "utf8")) as { blocks: [number, string][] };
    const [index, digest] = manifest.blocks[0] ?? [0, ""];
    await unlink(join(targetDir, "blocks", digest.slice(0, 2), digest.slice(2, 4), digest));
    const bad = await adminOk(adminSock, "POST", `/v1/backups/${ids[1]}/verify`, { to: target });
    assert.equal(bad["ok"], false);
    assert.deepEqual(bad["missing"], [index]);
  });

  test("bad requests name the problem and change nothing", async () => {
    const volumesBefore = await volumeNames();
    const cases: [string, string, unknown, number, RegExp][] = [
      ["POST", "/v1/volumes/nope/backups", { to: target }, 404, /volume "nope" does not exist/],
      ["POST", "/v1/volumes/db/backups", { to: "ftp://x/y" }, 400, /"ftp:\/\/x\/y" is not supported/],
      ["POST", "/v1/volumes/db/backups", { to: target, extra: 1 }, 400, /unknown field/],
      ["POST", "/v1/restore", { from: target, id: "../../etc", volume: "x" }, 400, /is not a backup id/],
      ["POST", "/v1/restore", { from: target, id: "20200101T000000000Z-00000000", volume: "x" }, 404, /backup "20200101T000000000Z-00000000" is not at/],
      ["POST", "/v1/restore", { from: target, id: ids[1], volume: "db" }, 409, /volume "db" exists: restore into a new name/],
    ];
    for (const [method, path, body, status, re] of cases) {
      const reply = await callAdmin(adminSock, method, path, body);
      assert.equal(reply.status, status, `${method} ${path} ${JSON.stringify(body)}: ${reply.text}`);
      assert.match(String(reply.json["error"]), re);
    }
    const dockerBad = await callPlugin(sock, "VolumeDriver.Create", { Name: "x", Opts: { backup: `${target}#nonsense` } });
    assert.match(String(dockerBad.body["Err"]), /backup .* is not URL#ID/);
    assert.deepEqual(await volumeNames(), volumesBefore);
  });

  test("docker volume rm of a backed-up volume takes its backup snapshot with it", async () => {
    await callOk(sock, "VolumeDriver.Remove", { Name: "db-clone" });
    assert.ok(!(await volumeNames()).includes("db-clone"));
    if (driver === "loop") {
      const left = (await readdir(join(dir, "state", "pool-loop", "mnt", "snapshots"))).filter((f) => f.startsWith("db-clone@"));
      assert.deepEqual(left, []);
    }
    // Its backups stay at the target.
    const listed = await adminOk(adminSock, "GET", `/v1/backups?to=${encodeURIComponent(target)}&volume=db-clone`);
    assert.equal((listed["backups"] as unknown[]).length, 1);
  });

  test("to S3: a backup and its restore through the plugin's S3 settings, byte for byte", async () => {
    await create("s3vol", { size: "320M", fs: "xfs" });
    const mp = await mount("s3vol", "c1");
    for (let i = 0; i < 4; i++) await writeFile(join(mp, `f${i}`), randomBytes(6 * MiB));
    const files = await tree(mp);
    await unmount("s3vol", "c1");
    const b = await adminOk(adminSock, "POST", "/v1/volumes/s3vol/backups", { to: s3.url });
    assert.ok(Number(b["bytesUploaded"]) >= 24 * MiB);
    const listed = await adminOk(adminSock, "GET", `/v1/backups?to=${encodeURIComponent(s3.url)}&volume=s3vol`);
    assert.deepEqual((listed["backups"] as { id: string }[]).map((x) => x.id), [b["id"]]);
    await create("s3back", { backup: `${s3.url}#${String(b["id"])}` });
    if (driver === "loop") assert.equal(await shaOfFile(image("s3back")), await shaOfFile(snapshotImage("s3vol", `backup-${String(b["id"])}`)));
    const back = await mount("s3back", "r");
    assert.deepEqual(await tree(back), files);
    await unmount("s3back", "r");
    const wrong = await callAdmin(adminSock, "POST", "/v1/volumes/s3vol/backups", { to: "s3://no-such-bucket/x" });
    assert.equal(wrong.status, 500);
    assert.match(String(wrong.json["error"]), /cannot back up volume "s3vol" to s3:\/\/no-such-bucket\/x: .*bucket/i);
  });
});
