/**
 * The real server bundle, as root, on a real loop pool: a failed request never loses,
 * hides or half-makes a volume, and odd mount IDs and ownership options do what they say.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { execFileSync } from "node:child_process";
import { mkdtemp, open, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { readMounts } from "../../src/system/mount.js";
import { mountsUnder, tearDownPool } from "../support/kernel.js";
import { BUNDLE, callOk, callPlugin, startServer, stopServer, serverEnv, type ServerProcess } from "../support/plugin-client.js";

const MiB = 1024 ** 2;

describe("thinvol server: failures leave volumes whole (loop pool)", () => {
  let dir: string;
  let env: Record<string, string>;
  let server: ServerProcess;
  let sock: string;

  const create = (Name: string, Opts: Record<string, string> | null = null) => callOk(sock, "VolumeDriver.Create", { Name, Opts });
  const mount = async (Name: string, ID: string) => String((await callOk(sock, "VolumeDriver.Mount", { Name, ID }))["Mountpoint"]);
  const unmount = (Name: string, ID: string) => callOk(sock, "VolumeDriver.Unmount", { Name, ID });
  const names = async () => ((await callOk(sock, "VolumeDriver.List"))["Volumes"] as { Name: string }[]).map((v) => v.Name);
  const status = async (Name: string) => ((await callOk(sock, "VolumeDriver.Get", { Name }))["Volume"] as { Status: Record<string, unknown> }).Status;
  const isMounted = async (path: string) => (await readMounts()).some((m) => m.mountPoint === path);
  const restart = async (signal: NodeJS.Signals = "SIGTERM") => {
    await stopServer(server, signal);
    server = await startServer(BUNDLE, env);
  };
  const sha256 = async (path: string) => createHash("sha256").update(await readFile(path)).digest("hex");

  before(async () => {
    dir = await mkdtemp(join(process.env["THINVOL_TEST_TMP"] ?? tmpdir(), "thinvol-safety-"));
    sock = join(dir, "thinvol.sock");
    env = serverEnv(dir);
    server = await startServer(BUNDLE, env);
  });

  after(async () => {
    if (server) await stopServer(server);
    for (const m of (await mountsUnder(join(dir, "volumes"))).reverse()) execFileSync("umount", [m]);
    await tearDownPool(dir);
    await rm(dir, { recursive: true, force: true });
  });

  test("Create of a name the pool holds without a record is refused, naming it, and the orphan's bytes are intact", async () => {
    const image = join(dir, "state", "pool-loop", "mnt", "volumes", "orphan.img");
    const bytes = Buffer.alloc(4 * MiB);
    for (let i = 0; i < bytes.length; i += 4096) bytes.write(`orphan block ${i / 4096}`, i);
    await writeFile(image, bytes);
    const before = await sha256(image);

    const reply = await callPlugin(sock, "VolumeDriver.Create", { Name: "orphan", Opts: null });
    assert.equal(reply.status, 500);
    assert.equal(await sha256(image), before, "the orphan's bytes changed");
    await assert.rejects(stat(join(dir, "state", "volumes", "orphan.json")), { code: "ENOENT" });
    assert.match(String(reply.body["Err"]), /cannot create volume "orphan": the loop pool already holds data under that name with no record/);
    assert.equal((await names()).includes("orphan"), false);

    // A clone under that name is refused the same way, and a restart keeps the orphan too.
    await create("orphan-src");
    const clone = await callPlugin(sock, "VolumeDriver.Create", { Name: "orphan", Opts: { from: "orphan-src" } });
    assert.match(String(clone.body["Err"]), /already holds data under that name/);
    await restart();
    assert.equal(await sha256(image), before);
    await callOk(sock, "VolumeDriver.Remove", { Name: "orphan-src" });
  });

  test("a Remove refused because a host process holds a file open leaves the volume listed, gettable and mountable, also after a restart", async () => {
    await create("held");
    const mp = await mount("held", "c1");
    await writeFile(join(mp, "f"), "still here");
    const holder = await open(join(mp, "f"), "r");
    try {
      const reply = await callPlugin(sock, "VolumeDriver.Remove", { Name: "held" });
      assert.equal(reply.status, 500);
      assert.match(String(reply.body["Err"]), /cannot remove volume "held": .*busy/);
      assert.ok((await names()).includes("held"));
      assert.equal((await status("held"))["mounts"], 1, "c1's reference is kept");
      assert.equal(await mount("held", "c2"), mp);
      await unmount("held", "c2");

      await restart();
      assert.ok((await names()).includes("held"));
      assert.ok(await isMounted(mp));
      assert.equal((await callOk(sock, "VolumeDriver.Path", { Name: "held" }))["Mountpoint"], mp);
    } finally {
      await holder.close();
    }
    await unmount("held", "c1");
    assert.equal(await isMounted(mp), false);
    const again = await mount("held", "c3");
    assert.equal(await readFile(join(again, "f"), "utf8"), "still here");
    await unmount("held", "c3");
    await callOk(sock, "VolumeDriver.Remove", { Name: "held" });
    assert.equal((await names()).includes("held"), false);
  });

  test('mount IDs "__proto__" and "toString" mount and unmount like any other, also across a restart', async () => {
    await create("ids");
    const a = await mount("ids", "__proto__");
    const b = await mount("ids", "toString");
    assert.equal(a, b);
    assert.equal((await status("ids"))["mounts"], 2);
    await restart("SIGKILL");
    assert.equal((await status("ids"))["mounts"], 2);
    await unmount("ids", "__proto__");
    assert.ok(await isMounted(a), '"toString" still holds its reference');
    await unmount("ids", "toString");
    assert.equal(await isMounted(a), false);
    await callOk(sock, "VolumeDriver.Remove", { Name: "ids" });
  });

  test("a clone made with only -o uid keeps its origin root's group", async () => {
    await create("owned", { uid: "1000", gid: "1001" });
    await create("owned-copy", { from: "owned", uid: "1002" });
    const mp = await mount("owned-copy", "c1");
    const s = await stat(mp);
    assert.deepEqual([s.uid, s.gid], [1002, 1001]);
    await unmount("owned-copy", "c1");
    await create("group-only", { gid: "1003" });
    const gp = await mount("group-only", "c1");
    const g = await stat(gp);
    assert.deepEqual([g.uid, g.gid], [0, 1003], "a group alone keeps the owner");
    await unmount("group-only", "c1");
  });
});
