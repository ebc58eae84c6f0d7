/**
 * Upgrade in place, from the registry, by the README's own steps (support.ts upgradePlugin
 * runs them as printed): stop the containers, `docker plugin upgrade` to the next version,
 * start them again.
 * Every volume, its data and its snapshots, the plugin's settings and its ID survive, and
 * a PostgreSQL database comes back with its rows. Then the way back: a downgrade to a
 * version that reads the pool's state format is supported, and a pool in a newer format
 * is refused, untouched, until a version that reads it returns (src/state-format.ts).
 *
 * The scenarios run in order and share the volumes; the plugin ends at the version it
 * started with. Skipped when run.sh used `docker plugin create` (E2E_INSTALL=create).
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, test, type TestContext } from "node:test";
import {
  Postgres,
  adminRequest,
  createVolume,
  docker,
  dockerOk,
  env,
  hasAdminCli,
  inspectPlugin,
  noRegistry,
  pluginRootfs,
  registry,
  releaseOf,
  removeContainers,
  removeVolumes,
  runInOk,
  startHolder,
  stateSourceOf,
  uniqueName,
  upgradePlugin,
  volumeNames,
  type PluginInspect,
} from "./support.js";

const ROWS = 1000;
const SNAPSHOT = "before-upgrade";

const plain = uniqueName("up-ext4");
const xfs = uniqueName("up-xfs");
const clone = uniqueName("up-clone");
const pgVolume = uniqueName("up-pg");
const pg = uniqueName("up-postgres");
const postgres = new Postgres(pg, pgVolume);
const holder = uniqueName("up-holder");
const tokens = new Map<string, string>();
let original: PluginInspect | undefined;

after(async () => {
  await removeContainers(pg, holder);
  if (snapshotTaken) await adminRequest("DELETE", `/v1/volumes/${plain}/snapshots/${SNAPSHOT}`).catch(() => undefined);
  await removeVolumes(plain, xfs, clone, pgVolume);
});

// --- Snapshots, through the admin API (docs/admin-api.md) ---------------------------------

/**
 * SNAPSHOT CHECK — on once the `thinvol` command and the admin API have landed
 * (dist/thinvol-cli.mjs exists after `npm run build`); until then these steps are
 * reported as TODO, not passed.
 */
async function takeSnapshot(t: TestContext, volume: string, name: string): Promise<boolean> {
  if (!hasAdminCli) {
    t.todo("SNAPSHOTS NOT CHECKED: no dist/thinvol-cli.mjs, so no admin API to take one with");
    return false;
  }
  const r = await adminRequest("POST", `/v1/volumes/${volume}/snapshots`, { name });
  assert.ok(r.status >= 200 && r.status < 300, `admin API: snapshot ${volume}@${name}: ${r.status} ${JSON.stringify(r.json)}`);
  return true;
}

async function snapshotNames(volume: string): Promise<string[]> {
  const r = await adminRequest("GET", `/v1/snapshots?volume=${volume}`);
  assert.equal(r.status, 200, `admin API: list snapshots: ${JSON.stringify(r.json)}`);
  return ((r.json as { snapshots: { name: string }[] }).snapshots ?? []).map((s) => s.name);
}

let snapshotTaken = false;

// --- What must be there after every change of version --------------------------------------

async function assertEverythingThere(when: string, expectedVersion: string): Promise<void> {
  assert.ok(original);
  const now = await inspectPlugin();
  assert.equal(now.Id, original.Id, `${when}: the plugin's ID is unchanged`);
  assert.deepEqual(now.Settings.Env, original.Settings.Env, `${when}: every env setting is kept`);
  assert.equal(stateSourceOf(now), stateSourceOf(original), `${when}: the state mount is the pool's directory`);
  assert.equal((await releaseOf(await pluginRootfs(now)))["VERSION"], expectedVersion, `${when}: the plugin runs ${expectedVersion}`);
  assert.equal(await lastStartedVersion(), expectedVersion, `${when}: the server said it is ${expectedVersion}`);

  const listed = await volumeNames();
  for (const name of [plain, xfs, clone, pgVolume]) assert.ok(listed.includes(name), `${when}: ${name} is listed`);
  for (const [name, token] of tokens) {
    assert.equal(await runInOk(name, "cat /d/token"), token, `${when}: ${name} keeps its data`);
  }
  if (snapshotTaken) assert.deepEqual(await snapshotNames(plain), [SNAPSHOT], `${when}: the snapshot of ${plain} is there`);

  // The containers stopped for the upgrade start again, the database with every row.
  await dockerOk(["start", holder, pg]);
  await postgres.ready();
  assert.equal(await postgres.sql("select count(*) from upgrade_rows"), String(ROWS), `${when}: PostgreSQL has every row`);
  await postgres.sql(`insert into upgrade_rows select generate_series(${ROWS + 1}, ${ROWS + 10}); delete from upgrade_rows where i > ${ROWS}; checkpoint`);
  assert.equal(await dockerOk(["exec", holder, "cat", "/d/token"]), tokens.get(plain), `${when}: a restarted container sees its volume`);
}

/** The version in the plugin's last "listening" line in the engine's log (src/main.ts). */
async function lastStartedVersion(): Promise<string | undefined> {
  const lines = (await readFile(registry?.engineLog ?? "", "utf8")).split("\n").filter((l) => / listening version=/.test(l));
  return / listening version=(\S+) /.exec(lines.at(-1) ?? "")?.[1];
}

/** The README: stop the containers that use thinvol volumes before disabling the plugin. */
async function stopContainers(): Promise<void> {
  await dockerOk(["stop", "-t", "30", pg]);
  // busybox sleep as PID 1 ignores SIGTERM: no point waiting for it.
  await dockerOk(["stop", "-t", "1", holder]);
}

test("an upgrade keeps every volume, its data, snapshots and settings, and the plugin's ID; containers start again", { skip: noRegistry }, async (t) => {
  assert.ok(registry);
  original = await inspectPlugin();
  assert.equal(original.PluginReference, `${registry.repository}:${registry.version}`);

  await createVolume(plain, { size: "64M" });
  await createVolume(xfs, { size: "320M", fs: "xfs" });
  for (const name of [plain, xfs]) {
    const token = randomBytes(6).toString("hex");
    await runInOk(name, `echo ${token} > /d/token && sync`);
    tokens.set(name, token);
  }
  await createVolume(clone, { from: plain });
  tokens.set(clone, tokens.get(plain) ?? "");
  await createVolume(pgVolume, { size: "512M" });
  await postgres.start(registry.pgImage);
  await postgres.sql(`create table upgrade_rows as select generate_series(1, ${ROWS}) as i; checkpoint`);
  await startHolder(plain, holder);
  snapshotTaken = await takeSnapshot(t, plain, SNAPSHOT);

  await stopContainers();
  await upgradeAndCheck(`${registry.repository}:${registry.nextVersion}`);
  await assertEverythingThere(`after the upgrade to ${registry.nextVersion}`, registry.nextVersion);
});

async function upgradeAndCheck(ref: string): Promise<void> {
  const printed = await upgradePlugin(ref);
  assert.equal(printed.split("\n").at(-1), ref, "the README's last step shows the new reference");
  const now = await inspectPlugin();
  // Without --skip-remote-check and no terminal, the CLI declines its own question and exits 0.
  assert.equal(now.PluginReference, ref, `docker plugin upgrade really moved the plugin to ${ref}`);
  assert.equal(now.Enabled, true);
}

test("a downgrade to a version that reads the pool's state format is supported", { skip: noRegistry }, async () => {
  assert.ok(registry && original, "runs after the upgrade");
  await stopContainers();
  await upgradeAndCheck(`${registry.repository}:${registry.version}`);
  await assertEverythingThere(`after the downgrade to ${registry.version}`, registry.version);
});

test("a pool in a newer state format is refused, untouched, until a version that reads it returns", { skip: noRegistry }, async () => {
  assert.ok(registry && original, "runs after the downgrade");
  await stopContainers();
  const formatFile = join(env.stateDir, "format.json");
  const ours = await readFile(formatFile, "utf8");
  assert.match(ours, new RegExp(`"writtenBy":"${registry.version.replaceAll(".", "\\.")}"`), "the pool records the version that last opened it");

  // What a future version that changed the format would leave behind.
  await dockerOk(["plugin", "disable", "-f", env.plugin]);
  const future = JSON.stringify({ format: 999, writtenBy: "99.0.0" });
  await writeFile(formatFile, future);
  await dockerOk(["plugin", "enable", "--timeout", "60", env.plugin]);
  const refused = await docker(["volume", "create", "-d", env.plugin, uniqueName("refused")]);
  assert.notEqual(refused.exitCode, 0, "no volume is created on a pool this version cannot read");
  assert.match(refused.stderr, /last used by thinvol 99\.0\.0, which keeps it in state format 999; this is thinvol \S+, which reads format \d+ at most/);
  const mount = await docker(["run", "--rm", "--network", "none", "-v", `${plain}:/d`, env.image, "true"]);
  assert.notEqual(mount.exitCode, 0, "no volume is mounted either");
  assert.equal(await readFile(formatFile, "utf8"), future, "the pool's format file is left as the newer version wrote it");

  // That newer version back (here: its format file), and everything is there.
  await dockerOk(["plugin", "disable", "-f", env.plugin]);
  await writeFile(formatFile, ours);
  await dockerOk(["plugin", "enable", "--timeout", "60", env.plugin]);
  await assertEverythingThere("after the refused start", registry.version);
  await stopContainers();
});
