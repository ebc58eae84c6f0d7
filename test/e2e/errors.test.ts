/** Mistakes get a message naming the problem, and leave nothing behind. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { docker, env, uniqueName, volumeNames } from "./support.js";

async function refusedCreate(opts: readonly string[], mentions: RegExp): Promise<void> {
  const name = uniqueName("bad");
  const args = ["volume", "create", "-d", env.plugin];
  for (const o of opts) args.push("-o", o);
  const r = await docker([...args, name]);
  assert.notEqual(r.exitCode, 0, `docker volume create ${opts.join(" ")} should fail`);
  assert.match(r.stderr, mentions, `the error names the problem: ${r.stderr.trim()}`);
  assert.ok(!(await volumeNames()).includes(name), "a refused volume is not listed");
  const inspect = await docker(["volume", "inspect", name]);
  assert.notEqual(inspect.exitCode, 0, "a refused volume cannot be inspected");
}

test("an unknown option is refused and the allowed ones are named", async () => {
  await refusedCreate(["colour=blue"], /colour[\s\S]*size/);
});

test("a size that is not a size is refused", async () => {
  await refusedCreate(["size=lots"], /size[\s\S]*lots|lots[\s\S]*size/);
});

test("a size below the filesystem's minimum is refused", async () => {
  await refusedCreate(["size=1K"], /size 1 KiB is too small for ext4; the minimum is 16 MiB/);
});

test("a clone of a volume that does not exist is refused", async () => {
  const missing = uniqueName("no-such-volume");
  await refusedCreate([`from=${missing}`], new RegExp(missing));
});
