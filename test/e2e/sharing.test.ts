/**
 * A volume behaves like one disk shared over time and between containers: data
 * survives containers, two containers can hold it at once, `docker cp` works, and it
 * is unmounted exactly when the last user goes away.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import {
  createVolume,
  dockerOk,
  env,
  inspectVolume,
  isHostMountPoint,
  MiB,
  hostMountpoint,
  removeContainers,
  removeVolumes,
  runInOk,
  startHolder,
  uniqueName,
  volumeNames,
} from "./support.js";

const volumes: string[] = [];
const containers: string[] = [];
after(async () => {
  await removeContainers(...containers);
  await removeVolumes(...volumes);
});

test("data written by one container is read by the next; inspect and ls show the volume", async () => {
  const name = uniqueName("persist");
  volumes.push(name);
  await createVolume(name, { size: "128M" });
  const token = randomBytes(8).toString("hex");

  await runInOk(name, `echo ${token} > /d/token && sync`);
  assert.equal(await runInOk(name, "cat /d/token"), token);

  assert.ok((await volumeNames()).includes(name), "docker volume ls lists the volume");

  const info = await inspectVolume(name);
  assert.equal(info.Driver.replace(/:latest$/, ""), env.plugin.replace(/:latest$/, ""));
  assert.ok(info.CreatedAt !== undefined && !Number.isNaN(Date.parse(info.CreatedAt)), `CreatedAt ${info.CreatedAt} is a date`);
  const status = info.Status ?? {};
  assert.equal(status["sizeBytes"], 128 * MiB, `Status.sizeBytes in ${JSON.stringify(status)}`);
  assert.equal(typeof status["size"], "string", `Status.size in ${JSON.stringify(status)}`);
  assert.equal(status["filesystem"], "ext4", `Status.filesystem in ${JSON.stringify(status)}`);
  assert.equal(status["poolDriver"], env.poolDriver, `Status.poolDriver in ${JSON.stringify(status)}`);
  assert.ok(status["allocated"] !== undefined, `Status.allocated in ${JSON.stringify(status)}`);
});

test("two containers share a volume; it stays mounted until the last one exits", async () => {
  const name = uniqueName("shared");
  const [a, b] = [uniqueName("holder-a"), uniqueName("holder-b")];
  volumes.push(name);
  containers.push(a, b);
  await createVolume(name, { size: "64M" });

  await startHolder(name, a);
  await startHolder(name, b);
  const mountpoint = await hostMountpoint(name);
  assert.ok(await isHostMountPoint(mountpoint), `${mountpoint} is mounted while containers use it`);

  await dockerOk(["exec", a, "sh", "-c", "echo from-a > /d/shared && sync"]);
  assert.equal(await dockerOk(["exec", b, "cat", "/d/shared"]), "from-a", "the second container sees the first one's write");

  await removeContainers(a);
  assert.ok(await isHostMountPoint(mountpoint), "the volume stays mounted while one container still uses it");
  assert.equal(await dockerOk(["exec", b, "cat", "/d/shared"]), "from-a");

  await removeContainers(b);
  assert.ok(!(await isHostMountPoint(mountpoint)), "the volume is unmounted once the last container is gone");
  assert.equal(await runInOk(name, "cat /d/shared"), "from-a");
});

test("docker cp into and out of a running container's volume; unmounted after it exits", async () => {
  const name = uniqueName("cp");
  const holder = uniqueName("cp-holder");
  volumes.push(name);
  containers.push(holder);
  await createVolume(name, { size: "64M" });
  await startHolder(name, holder);
  const mountpoint = await hostMountpoint(name);
  assert.ok(await isHostMountPoint(mountpoint), `${mountpoint} is mounted while the container runs`);

  const dir = await mkdtemp(join(tmpdir(), "thinvol-e2e-"));
  try {
    const token = randomBytes(8).toString("hex");
    await writeFile(join(dir, "in.txt"), token);
    // docker cp mounts the volume again under the container's own mount ID.
    await dockerOk(["cp", join(dir, "in.txt"), `${holder}:/d/in.txt`]);
    assert.equal(await dockerOk(["exec", holder, "cat", "/d/in.txt"]), token);
    await dockerOk(["cp", `${holder}:/d/in.txt`, join(dir, "out.txt")]);
    assert.equal(await readFile(join(dir, "out.txt"), "utf8"), token);

    await removeContainers(holder);
    assert.ok(!(await isHostMountPoint(mountpoint)), "after docker cp and the container's exit the volume is unmounted");
    assert.equal(await runInOk(name, "cat /d/in.txt"), token, "the copied file is in the volume");
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
