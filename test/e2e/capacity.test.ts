/**
 * A volume's size is a real limit, and removing a volume gives its space back to
 * the pool on the host disk.
 */
import assert from "node:assert/strict";
import { after, test } from "node:test";
import { allocatedBytes, createVolume, docker, env, MiB, removeVolumes, runIn, runInOk, uniqueName, volumeNames } from "./support.js";

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

test("docker volume rm returns the volume's space to the host", async () => {
  const name = uniqueName("space");
  // Reading allocation before the volume exists: a fresh pool may still grow its
  // metadata on the first create, so the baseline is taken after creating.
  await createVolume(name, { size: "512M" });
  const before = await allocatedBytes(env.stateDir);

  await runInOk(name, "dd if=/dev/urandom of=/d/data bs=1M count=160 conv=fsync 2>/dev/null && sync");
  const filled = await allocatedBytes(env.stateDir);
  assert.ok(
    filled - before >= 150 * MiB,
    `writing 160 MiB grew the pool files under ${env.stateDir} by only ${((filled - before) / MiB).toFixed(1)} MiB`,
  );

  const rm = await docker(["volume", "rm", name]);
  assert.equal(rm.exitCode, 0, `docker volume rm failed: ${rm.stderr}`);
  assert.ok(!(await volumeNames()).includes(name), "the removed volume is still listed");

  // Space may be returned asynchronously (discard of the pool's blocks); allow some seconds.
  let after = await allocatedBytes(env.stateDir);
  for (let i = 0; i < 60 && after - before > 32 * MiB; i++) {
    await new Promise((r) => setTimeout(r, 250));
    after = await allocatedBytes(env.stateDir);
  }
  assert.ok(
    after - before <= 32 * MiB,
    `after docker volume rm the pool files still hold ${((after - before) / MiB).toFixed(1)} MiB more than before the write ` +
      `(before ${(before / MiB).toFixed(1)} MiB, filled ${(filled / MiB).toFixed(1)} MiB, after ${(after / MiB).toFixed(1)} MiB)`,
  );
});
