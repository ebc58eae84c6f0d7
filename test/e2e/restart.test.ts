/**
 * Volumes outlive the plugin process and the engine: after `docker plugin disable`
 * + `enable`, and after dockerd restarts, every volume and its data is still there.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { after, test } from "node:test";
import { createVolume, dockerOk, env, removeVolumes, restartEngine, runInOk, uniqueName, volumeNames } from "./support.js";

const volumes: string[] = [];
after(() => removeVolumes(...volumes));

async function makeVolumes(): Promise<Map<string, string>> {
  const data = new Map<string, string>();
  const plain = uniqueName("keep");
  const xfs = uniqueName("keep-xfs");
  const clone = uniqueName("keep-clone");
  volumes.push(plain, xfs, clone);
  await createVolume(plain, { size: "64M" });
  await createVolume(xfs, { size: "320M", fs: "xfs" });
  for (const name of [plain, xfs]) {
    const token = randomBytes(6).toString("hex");
    await runInOk(name, `echo ${token} > /d/token && sync`);
    data.set(name, token);
  }
  await createVolume(clone, { from: plain });
  data.set(clone, data.get(plain) ?? "");
  return data;
}

async function assertAllThere(data: Map<string, string>, when: string): Promise<void> {
  const listed = await volumeNames();
  for (const [name, token] of data) {
    assert.ok(listed.includes(name), `${when}: ${name} is listed`);
    assert.equal(await runInOk(name, "cat /d/token"), token, `${when}: ${name} keeps its data`);
    // Still writable, not only readable.
    await runInOk(name, "echo again > /d/again && sync && cat /d/again");
  }
}

test("volumes survive docker plugin disable and enable", async () => {
  const data = await makeVolumes();
  // -f: Docker counts every volume as a use of the plugin.
  await dockerOk(["plugin", "disable", "-f", env.plugin]);
  await dockerOk(["plugin", "enable", env.plugin]);
  await assertAllThere(data, "after disable/enable");
});

test("volumes survive a restart of dockerd", async () => {
  const data = await makeVolumes();
  await restartEngine();
  await assertAllThere(data, "after the engine restarted");
});
