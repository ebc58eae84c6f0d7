/** `-o from=` gives an independent copy of a volume as it was at that moment. */
import assert from "node:assert/strict";
import { after, test } from "node:test";
import { createVolume, dockerOk, inspectVolume, MiB, removeContainers, removeVolumes, runInOk, startHolder, uniqueName } from "./support.js";

const volumes: string[] = [];
const containers: string[] = [];
after(async () => {
  await removeContainers(...containers);
  await removeVolumes(...volumes);
});

test("a clone has the data of the moment; later writes to either stay apart", async () => {
  const origin = uniqueName("origin");
  const clone = uniqueName("clone");
  volumes.push(origin, clone);
  await createVolume(origin, { size: "128M" });
  await runInOk(origin, "echo before > /d/state && dd if=/dev/urandom of=/d/blob bs=1M count=8 2>/dev/null && md5sum /d/blob > /d/blob.md5 && sync");

  await createVolume(clone, { from: origin });
  await runInOk(origin, "echo after-origin > /d/state && echo only-origin > /d/new && sync");
  await runInOk(clone, "echo only-clone > /d/mine && sync");

  assert.equal(await runInOk(clone, "cat /d/state"), "before", "the clone keeps the data from the moment it was made");
  assert.equal(await runInOk(clone, "md5sum -c /d/blob.md5 >/dev/null && echo intact"), "intact");
  assert.equal(await runInOk(clone, "test -e /d/new && echo yes || echo no"), "no", "origin's later file is not in the clone");
  assert.equal(await runInOk(origin, "cat /d/state"), "after-origin");
  assert.equal(await runInOk(origin, "test -e /d/mine && echo yes || echo no"), "no", "the clone's file is not in the origin");

  const status = (await inspectVolume(clone)).Status ?? {};
  assert.equal(status["sizeBytes"], 128 * MiB, `a clone has its origin's size: ${JSON.stringify(status)}`);
  assert.equal(status["origin"], origin, `a clone names its origin: ${JSON.stringify(status)}`);
});

test("a volume in use by a running container can be cloned", async () => {
  const origin = uniqueName("busy");
  const clone = uniqueName("busy-clone");
  const holder = uniqueName("busy-holder");
  volumes.push(origin, clone);
  containers.push(holder);
  await createVolume(origin, { size: "64M" });
  await startHolder(origin, holder);
  await dockerOk(["exec", holder, "sh", "-c", "echo live > /d/live && sync"]);

  await createVolume(clone, { from: origin });
  await dockerOk(["exec", holder, "sh", "-c", "echo later > /d/live && sync"]);
  assert.equal(await runInOk(clone, "cat /d/live"), "live");
  await removeContainers(holder);
});
