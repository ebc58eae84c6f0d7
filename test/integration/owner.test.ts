/**
 * One owner per pool: two thinvol processes on one STATE_DIR (two plugin installs, say) must
 * not both open the pool. The real bundle, as root, on real loop devices.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { after, before, describe, test } from "node:test";
import { loopDevicesUnder, tearDownPool } from "../support/kernel.js";
import { BUNDLE, callOk, callPlugin, startServer, stopServer, serverEnv, type ServerProcess } from "../support/plugin-client.js";


/** Starts the bundle and waits for it to give up on start-up (it keeps serving the error). */
async function startRefused(env: Record<string, string>): Promise<ServerProcess> {
  const child = spawn(process.execPath, [BUNDLE], { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  child.stdout.on("data", (d: Buffer) => (out += d.toString()));
  child.stderr.on("data", (d: Buffer) => (out += d.toString()));
  const server = { child, output: () => out };
  const deadline = Date.now() + 60_000;
  while (!/start-up failed/.test(out)) {
    if (child.exitCode !== null) throw new Error(`the second server exited with ${child.exitCode}:\n${out}`);
    if (/ ready /.test(out) || Date.now() > deadline) {
      child.kill("SIGKILL");
      throw new Error(`the second server was expected to refuse the pool:\n${out}`);
    }
    await sleep(50);
  }
  return server;
}

const names = async (sock: string) => ((await callOk(sock, "VolumeDriver.List"))["Volumes"] as { Name: string }[]).map((v) => v.Name);

describe("one thinvol instance per STATE_DIR", () => {
  let dir: string;
  let stateDir: string;
  let base: Record<string, string>;
  const servers: ServerProcess[] = [];

  before(async () => {
    dir = await mkdtemp(join(process.env["THINVOL_TEST_TMP"] ?? tmpdir(), "thinvol-owner-"));
    stateDir = join(dir, "state");
    base = serverEnv(dir, { POOL_SIZE: "1G" });
  });

  after(async () => {
    for (const s of servers) await stopServer(s, "SIGKILL");
    await tearDownPool(dir);
    await rm(dir, { recursive: true, force: true });
  });

  test("a second instance refuses the pool, names the directory on every call and touches nothing; after kill -9 of the first a new one serves its volumes", async () => {
    const first = await startServer(BUNDLE, { ...base, SOCKET_PATH: join(dir, "first.sock") });
    servers.push(first);
    const firstSock = join(dir, "first.sock");
    await callOk(firstSock, "VolumeDriver.Create", { Name: "kept", Opts: null });
    const mp = String((await callOk(firstSock, "VolumeDriver.Mount", { Name: "kept", ID: "c1" }))["Mountpoint"]);
    await writeFile(join(mp, "row"), "written through the first instance");
    const loopsBefore = await loopDevicesUnder(dir);

    const secondSock = join(dir, "second.sock");
    const second = await startRefused({ ...base, SOCKET_PATH: secondSock });
    servers.push(second);
    const calls: [string, unknown][] = [
      ["VolumeDriver.Create", { Name: "intruder", Opts: null }],
      ["VolumeDriver.List", {}],
      ["VolumeDriver.Get", { Name: "kept" }],
      ["VolumeDriver.Mount", { Name: "kept", ID: "c2" }],
      ["VolumeDriver.Unmount", { Name: "kept", ID: "c1" }],
      ["VolumeDriver.Remove", { Name: "kept" }],
    ];
    for (const [method, body] of calls) {
      const reply = await callPlugin(secondSock, method, body);
      assert.equal(reply.status, 500, method);
      const err = String(reply.body["Err"]);
      assert.ok(err.includes(`STATE_DIR=${stateDir} is taken`), `${method}: ${err}`);
      assert.match(err, /another thinvol instance \(another plugin name or tag, or another Docker engine/);
      assert.match(err, /docker plugin set <name> state\.source=\/other\/dir/);
    }
    assert.doesNotMatch(second.output(), /pool driver chosen|loop pool ready|creating the loop pool/, "the refused instance opened the pool");
    assert.deepEqual(await loopDevicesUnder(dir), loopsBefore, "the refused instance attached or detached loop devices");
    assert.deepEqual(await names(firstSock), ["kept"], "the refused instance created or removed a volume");
    assert.equal(await readFile(join(mp, "row"), "utf8"), "written through the first instance");

    // The kernel drops the lock with the process, however it ends.
    await stopServer(first, "SIGKILL");
    const thirdSock = join(dir, "third.sock");
    const third = await startServer(BUNDLE, { ...base, SOCKET_PATH: thirdSock });
    servers.push(third);
    assert.deepEqual(await names(thirdSock), ["kept"]);
    await callOk(thirdSock, "VolumeDriver.Unmount", { Name: "kept", ID: "c1" });
    const again = String((await callOk(thirdSock, "VolumeDriver.Mount", { Name: "kept", ID: "c3" }))["Mountpoint"]);
    assert.equal(await readFile(join(again, "row"), "utf8"), "written through the first instance");
    await callOk(thirdSock, "VolumeDriver.Unmount", { Name: "kept", ID: "c3" });
  });
});
