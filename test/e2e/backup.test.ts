/**
 * Moving a volume to another host with backups: PostgreSQL runs on host A (the tier's
 * engine) and keeps taking inserts while `thinvol backup create` copies its volume to a
 * directory both hosts' plugins mount (as an NFS share would be) or to an S3 server; on
 * host B (a second engine with its own pool, test/e2e/backup-hosts.sh) `thinvol restore`
 * and `docker volume create -o backup=URL#ID` make volumes PostgreSQL starts from, with
 * every row committed before the backup began.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { execa } from "execa";
import { Postgres, docker, dockerOk, env, removeContainers, uniqueName } from "./support.js";

/** The bundled command, as a user runs it (npm run build writes it). */
const CLI = join(import.meta.dirname, "..", "..", "dist", "thinvol-cli.mjs");

const hostA = process.env["DOCKER_HOST"] ?? "";
const hostB = process.env["E2E_HOST_B_DOCKER_HOST"] ?? "";
const backupsSource = process.env["E2E_BACKUPS_SOURCE"] ?? "";
const s3Endpoint = process.env["E2E_S3_ENDPOINT"] ?? "";
const pgImage = process.env["E2E_PG_IMAGE"] ?? "";
const skip = hostB === "" || backupsSource === "" || s3Endpoint === "" ? "no second host, backups directory or S3 server (test/e2e/run.sh prepares them with the registry install)" : false;

interface Run {
  stdout: string;
  stderr: string;
  exitCode: number;
  ms: number;
}

/** The `thinvol` command against the plugin on the engine at `dockerHost`. */
async function thinvol(dockerHost: string, args: readonly string[]): Promise<Run> {
  const start = performance.now();
  const r = await execa(process.execPath, [CLI, "--plugin", env.plugin, ...args], { reject: false, timeout: 300_000, stdin: "ignore", env: { DOCKER_HOST: dockerHost } });
  return { stdout: String(r.stdout), stderr: String(r.stderr), exitCode: r.exitCode ?? -1, ms: performance.now() - start };
}

/** Same, with --json; a failure throws with the command's output. */
async function thinvolJson<T>(dockerHost: string, args: readonly string[]): Promise<{ reply: T; ms: number }> {
  const r = await thinvol(dockerHost, [...args, "--json"]);
  if (r.exitCode !== 0) throw new Error(`thinvol ${args.join(" ")} exited with ${r.exitCode}: ${r.stderr}${r.stdout}`);
  return { reply: JSON.parse(r.stdout) as T, ms: r.ms };
}

interface BackupResult {
  id: string;
  volume: string;
  incremental: boolean;
  bytesRead: number;
  bytesUploaded: number;
  blocksChanged: number;
  durationMs: number;
}

const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;
const secs = (ms: number) => `${(ms / 1000).toFixed(1)} s`;

/** What must survive a move: how many rows there are up to an id, and a digest of them. */
async function rowsUpTo(pg: Postgres, maxId: number): Promise<{ count: number; digest: string }> {
  const [count = "", digest = ""] = (await pg.sql(`select count(*), md5(string_agg(id || ':' || v, ',' order by id)) from t where id <= ${maxId}`)).split("|");
  return { count: Number(count), digest };
}

describe("moving a volume to another host through backups", { skip }, () => {
  const fileUrl = `file://${backupsSource}/pg`;
  const s3Url = "s3://thinvol-e2e/hosts";
  const volume = uniqueName("pgdata");
  const pgA = new Postgres(uniqueName("pg-a"), volume, hostA);
  const containersB: string[] = [];
  const volumesB: string[] = [];
  /** The first backup, and the rows committed before it began. */
  let first: BackupResult;
  let before1: { maxId: number; count: number; digest: string };

  before(async () => {
    await dockerOk(["volume", "create", "-d", env.plugin, "-o", "size=512M", volume]);
    await pgA.start(pgImage);
  });

  after(async () => {
    await removeContainers(pgA.container);
    // A volume's backup snapshots go with it.
    await docker(["volume", "rm", "-f", volume]);
    if (containersB.length > 0) await docker(["rm", "-f", ...containersB], undefined, hostB);
    for (const v of volumesB) await docker(["volume", "rm", "-f", v], undefined, hostB);
  });

  /** PostgreSQL on host B on `volume`, started and answering. */
  async function startOnB(restored: string): Promise<Postgres> {
    const pg = new Postgres(uniqueName("pg-b"), restored, hostB);
    containersB.push(pg.container);
    const start = performance.now();
    await pg.start(pgImage);
    const ms = performance.now() - start;
    // The backup is of a running cluster: PostgreSQL finds it as after a power cut, and replays its WAL.
    const log = (await docker(["logs", pg.container], undefined, hostB)).stderr;
    assert.match(log, /database system was not properly shut down; automatic recovery in progress/);
    assert.match(log, /redo done at|redo is not required/);
    console.log(`# PostgreSQL started on host B from ${restored} with crash recovery in ${secs(ms)}`);
    return pg;
  }

  test("a backup taken while PostgreSQL takes inserts restores on host B with every row committed before it began", async () => {
    await pgA.sql("create table t (id bigserial primary key, v text not null)");
    await pgA.sql("insert into t(v) select md5(i::text) from generate_series(1, 20000) as i");
    for (let i = 1; i <= 5; i++) await pgA.sql(`insert into t(v) values ('single-${i}')`);

    // One client, one commit per statement: ids are handed out and committed in order.
    await dockerOk([
      "exec", "-d", pgA.container, "su", "postgres", "-s", "/bin/sh", "-c",
      `while [ ! -e /tmp/stop-inserting ]; do psql -h /tmp -qAt -c "insert into t(v) values ('live')" >/dev/null || { touch /tmp/insert-failed; break; }; done; touch /tmp/inserter-done`,
    ]);
    await new Promise((resolve) => setTimeout(resolve, 500));
    const [maxBefore = "", countBefore = ""] = (await pgA.sql("select max(id), count(*) from t")).split("|");
    const backup = await thinvolJson<BackupResult>(hostA, ["backup", "create", volume, "--to", fileUrl]);
    const countAfter = Number(await pgA.sql("select count(*) from t"));
    await dockerOk(["exec", pgA.container, "touch", "/tmp/stop-inserting"]);
    for (let i = 0; (await docker(["exec", pgA.container, "test", "-e", "/tmp/inserter-done"])).exitCode !== 0; i++) {
      assert.ok(i < 100, "the inserting client stops");
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    assert.equal((await docker(["exec", pgA.container, "test", "-e", "/tmp/insert-failed"])).exitCode, 1, "no insert failed while the volume was backed up");
    first = backup.reply;
    assert.equal(first.incremental, false, "the first backup at a target is full");
    assert.ok(countAfter > Number(countBefore), `the client kept inserting during the backup (${countBefore} rows before, ${countAfter} after)`);
    before1 = { maxId: Number(maxBefore), ...(await rowsUpTo(pgA, Number(maxBefore))) };
    assert.equal(before1.count, Number(countBefore));
    console.log(
      `# full backup on host A: ${first.id}, ${mib(first.bytesRead)} read, ${mib(first.bytesUploaded)} sent in ${secs(backup.ms)} ` +
        `(${countBefore} rows committed before it, ${countAfter - Number(countBefore)} during it)`,
    );

    const restored = uniqueName("moved");
    volumesB.push(restored);
    const restore = await thinvolJson<{ name: string }>(hostB, ["restore", first.id, restored, "--from", fileUrl]);
    assert.equal(restore.reply.name, restored);
    console.log(`# thinvol restore on host B: ${secs(restore.ms)}`);
    const viaDocker = uniqueName("moved-docker");
    volumesB.push(viaDocker);
    const start = performance.now();
    await dockerOk(["volume", "create", "-d", env.plugin, "-o", `backup=${fileUrl}#${first.id}`, viaDocker], undefined, hostB);
    console.log(`# docker volume create -o backup=... on host B: ${secs(performance.now() - start)}`);

    for (const v of [restored, viaDocker]) {
      const pg = await startOnB(v);
      const total = Number(await pg.sql("select count(*) from t"));
      assert.ok(total >= before1.count, `${v} has ${total} rows, at least the ${before1.count} committed before the backup`);
      assert.ok(total <= countAfter, `${v} has no row committed after the backup ended`);
      assert.deepEqual({ maxId: before1.maxId, ...(await rowsUpTo(pg, before1.maxId)) }, before1, `${v} has every row committed before the backup, unchanged`);
      assert.equal(await pg.sql("select count(*) from t where v like 'single-%'"), "5");
      await docker(["rm", "-f", pg.container], undefined, hostB);
    }
  });

  test("a second backup after about 1 % of the rows changed is incremental and sends far less", async () => {
    assert.ok(first, "the first backup exists");
    await pgA.sql("update t set v = v || '+' where id <= 100");
    await pgA.sql("insert into t(v) select md5(i::text) from generate_series(20001, 20100) as i");
    const second = await thinvolJson<BackupResult>(hostA, ["backup", "create", volume, "--to", fileUrl]);
    console.log(
      `# incremental backup on host A: ${second.reply.id}, ${second.reply.blocksChanged} blocks changed, ${mib(second.reply.bytesUploaded)} sent ` +
        `in ${secs(second.ms)}; the full one sent ${mib(first.bytesUploaded)}`,
    );
    assert.equal(second.reply.incremental, true);
    assert.ok(second.reply.bytesUploaded * 4 < first.bytesUploaded, `the incremental backup sent ${second.reply.bytesUploaded} bytes, the full one ${first.bytesUploaded}`);
  });

  test("host B lists the backups host A made, and verifies them", async () => {
    const { reply } = await thinvolJson<{ backups: { id: string; volume: string }[] }>(hostB, ["backup", "ls", "--to", fileUrl]);
    const ours = reply.backups.filter((b) => b.volume === volume);
    assert.equal(ours.length, 2, `two backups of ${volume}: ${JSON.stringify(reply.backups)}`);
    assert.equal(ours[0]?.id, first.id, "oldest first");
    const table = await thinvol(hostB, ["backup", "ls", volume, "--to", fileUrl]);
    assert.equal(table.exitCode, 0, table.stderr);
    for (const b of ours) assert.match(table.stdout, new RegExp(`^${b.id} +${volume} `, "m"));
    for (const b of ours) {
      const verify = await thinvol(hostB, ["backup", "verify", b.id, "--to", fileUrl]);
      assert.equal(verify.exitCode, 0, verify.stderr);
      assert.match(verify.stdout, new RegExp(`backup ${b.id} of volume "${volume}" is intact`));
    }
  });

  test("through S3: backed up on host A, restored on host B, PostgreSQL starts with the rows", async () => {
    // The bucket, as its owner would make it; s3rver takes unsigned requests.
    const bucket = await fetch(`${s3Endpoint}/thinvol-e2e`, { method: "PUT" });
    assert.equal(bucket.status, 200, `s3rver created the bucket: ${await bucket.text()}`);
    const rows = await rowsUpTo(pgA, Number.MAX_SAFE_INTEGER);
    const backup = await thinvolJson<BackupResult>(hostA, ["backup", "create", volume, "--to", s3Url]);
    assert.equal(backup.reply.incremental, false, "the first backup at this target is full");
    console.log(`# backup to S3 on host A: ${mib(backup.reply.bytesUploaded)} sent in ${secs(backup.ms)}`);

    const restored = uniqueName("moved-s3");
    volumesB.push(restored);
    const restore = await thinvolJson<{ name: string }>(hostB, ["restore", backup.reply.id, restored, "--from", s3Url]);
    console.log(`# thinvol restore from S3 on host B: ${secs(restore.ms)}`);
    const pg = await startOnB(restored);
    assert.deepEqual(await rowsUpTo(pg, Number.MAX_SAFE_INTEGER), rows, "every row, unchanged");
  });

  test("a file:// target outside the backups mount is refused, naming backups.source", async () => {
    const elsewhere = "/var/tmp/thinvol-not-shared";
    const r = await thinvol(hostA, ["backup", "create", volume, "--to", `file://${elsewhere}`]);
    assert.equal(r.exitCode, 1, `${r.stdout}${r.stderr}`);
    assert.match(r.stderr, new RegExp(`outside the host directory the plugin can reach \\(${backupsSource}\\)`));
    assert.match(r.stderr, new RegExp(`backups\\.source=${elsewhere}`));
  });
});
