/**
 * A volume's size is a real limit, and removing a volume gives its space back before
 * `docker volume rm` returns.
 */
import assert from "node:assert/strict";
import { after, test } from "node:test";
import { allocatedBytes, createVolume, docker, env, inspectVolume, MiB, removeVolumes, runIn, runInOk, uniqueName, volumeNames } from "./support.js";

const created: string[] = [];
after(() => removeVolumes(...created));

test("a 64M volume is a ~64 MiB filesystem and refuses a 100 MiB write", async () => {
  const name = uniqueName("size");
  created.push(name);
  await createVolume(name, { size: "64M" });

  // Total size in 1 KiB blocks, as a user reading `df` would.
  const totalKiB = Number(await runInOk(name, "df -Pk /d | tail -n 1 | awk '{print $2}'"));
  assert.ok(Number.isFinite(totalKiB), "df printed a number");
  // The filesystem's own metadata (journal, inode tables) takes some of the 64 MiB.
  assert.ok(totalKiB * 1024 <= 64 * MiB, `df shows ${totalKiB} KiB, more than 64 MiB`);
  assert.ok(totalKiB * 1024 >= 48 * MiB, `df shows ${totalKiB} KiB, far less than 64 MiB`);

  const write = await runIn(name, "dd if=/dev/zero of=/d/big bs=1M count=100 conv=fsync");
  assert.notEqual(write.exitCode, 0, "writing 100 MiB into a 64 MiB volume must fail");
  assert.match(write.stderr + write.stdout, /No space left on device/);
});

test("docker volume rm gives the volume's space back: to the host (loop pool) or to the pool (dm-thin)", async () => {
  const name = uniqueName("space");
  const probe = uniqueName("probe");
  created.push(probe);
  await createVolume(probe, { size: "64M" });
  // Another volume's inspect shows the pool's figures after this one is gone.
  const poolUsed = async () => Number((await inspectVolume(probe)).Status?.["poolUsedBytes"]);
  await createVolume(name, { size: "512M" });
  const before = await allocatedBytes(env.stateDir);
  const usedBefore = await poolUsed();

  await runInOk(name, "dd if=/dev/urandom of=/d/data bs=1M count=160 conv=fsync 2>/dev/null && sync");
  const usedFilled = await poolUsed();
  assert.ok(usedFilled - usedBefore >= 150 * MiB, `writing 160 MiB took only ${((usedFilled - usedBefore) / MiB).toFixed(1)} MiB of the pool`);
  const filled = await allocatedBytes(env.stateDir);

  const rm = await docker(["volume", "rm", name]);
  assert.equal(rm.exitCode, 0, `docker volume rm failed: ${rm.stderr}`);
  assert.ok(!(await volumeNames()).includes(name), "the removed volume is still listed");

  // Remove answers once the space is back: no waiting.
  const usedAfter = await poolUsed();
  assert.ok(usedFilled - usedAfter >= 150 * MiB, `docker volume rm gave the pool back only ${((usedFilled - usedAfter) / MiB).toFixed(1)} MiB`);
  const after = await allocatedBytes(env.stateDir);
  const figures = `(before ${(before / MiB).toFixed(1)} MiB, filled ${(filled / MiB).toFixed(1)} MiB, after ${(after / MiB).toFixed(1)} MiB)`;
  if (env.poolDriver === "loop") {
    assert.ok(after - before <= 32 * MiB, `after docker volume rm the pool files hold ${((after - before) / MiB).toFixed(1)} MiB more than before the write ${figures}`);
  } else {
    // dm-thin keeps its host space reserved for the pool; it must not have grown for nothing.
    assert.ok(after <= filled, `docker volume rm grew the dm-thin pool's files ${figures}`);
  }
});
