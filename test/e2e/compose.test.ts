/**
 * The README's Compose example, run by a real Compose (Debian's docker-compose 1.29):
 * its `volumes:` section exactly as the README prints it (only the driver's name is this
 * run's plugin alias), its service with the offline test image instead of one from a
 * registry. A second `up` is where Compose 1.x checks the driver's full name. `up` creates the volume with the driver_opts, `down` keeps it and its data,
 * `down -v` removes it.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { execa } from "execa";
import { docker, env, inspectVolume, readmeBlock, uniqueName, volumeNames } from "./support.js";

const MARKER = "<!-- compose example: test/e2e/compose.test.ts runs it -->";

const dir = await mkdtemp(join(tmpdir(), "thinvol-compose-"));
const project = uniqueName("compose").replaceAll("-", "");
let composeFile = "";

async function compose(...args: string[]): Promise<string> {
  const r = await execa("docker-compose", ["--ansi", "never", "-p", project, "-f", composeFile, ...args], { reject: false, timeout: 180_000, stdin: "ignore" });
  if (r.exitCode !== 0) throw new Error(`docker-compose ${args.join(" ")} exited with ${r.exitCode}: ${String(r.stderr)}`);
  return String(r.stdout);
}

after(async () => {
  if (composeFile !== "") await compose("down", "-v", "-t", "1").catch(() => undefined);
  await rm(dir, { recursive: true, force: true });
});

test("the README's Compose example creates a thinvol volume with its driver_opts; down keeps it, down -v removes it", async () => {
  const example = await readmeBlock(MARKER);
  const volumeKey = /^volumes:\n {2}([\w.-]+):\n {4}driver: thinvol:latest$/m.exec(example)?.[1];
  assert.ok(volumeKey, `the example declares a volume with driver: thinvol:latest:\n${example}`);
  const mountPath = new RegExp(`^ {6}- ${volumeKey}:(\\S+)$`, "m").exec(example)?.[1];
  assert.ok(mountPath, `a service mounts ${volumeKey}`);
  const sizeOpt = /^ {6}size: (\S+)$/m.exec(example)?.[1];
  assert.ok(sizeOpt, "the example sets driver_opts.size");

  const token = randomBytes(6).toString("hex");
  const runnable = example
    .replace(/^( {4}driver:) thinvol:latest$/m, `$1 ${env.plugin}:latest`)
    .replace(
      /^( {4})image: .*$/m,
      `$1image: ${env.image}\n$1network_mode: none\n$1command: ["sh", "-c", "cat ${mountPath}/token 2>/dev/null || echo ${token} > ${mountPath}/token; sync; exec sleep 600"]`,
    );
  composeFile = join(dir, "compose.yaml");
  await writeFile(composeFile, runnable);

  await compose("up", "-d");
  const volume = `${project}_${volumeKey}`;
  const info = await inspectVolume(volume);
  assert.equal(info.Driver, `${env.plugin}:latest`, "the volume is thinvol's");
  const status = info.Status ?? {};
  assert.equal(status["size"], sizeOpt.replace(/^(\d+)([KMGT])$/, "$1 $2iB"), `driver_opts.size is the volume's size: ${JSON.stringify(status)}`);
  const fsOpt = /^ {6}fs: (\S+)$/m.exec(example)?.[1];
  if (fsOpt !== undefined) assert.equal(status["filesystem"], fsOpt, "driver_opts.fs is the volume's filesystem");
  const service = /^services:\n {2}([\w.-]+):$/m.exec(example)?.[1] ?? "";
  const read = async () => (await docker(["exec", `${project}_${service}_1`, "cat", `${mountPath}/token`])).stdout.trim();
  assert.equal(await read(), token);

  await compose("down", "-t", "1");
  assert.ok((await volumeNames()).includes(volume), "down keeps the volume");
  await compose("up", "-d");
  assert.equal(await read(), token, "the data is there after down and up");

  await compose("down", "-v", "-t", "1");
  assert.ok(!(await volumeNames()).includes(volume), "down -v removes the volume");
});
