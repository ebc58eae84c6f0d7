/**
 * The `thinvol` command against the installed plugin in a real engine: it finds the admin
 * socket through DOCKER_HOST and the plugin's name, and resizes, snapshots and rolls back
 * volumes that containers use.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { execa } from "execa";
import { Postgres, createVolume, docker, dockerOk, env, inspectVolume, removeContainers, removeVolumes, runIn, runInOk, uniqueName, MiB } from "./support.js";

/** The bundled command, as a user runs it (npm run build writes it). */
const CLI = join(import.meta.dirname, "..", "..", "dist", "thinvol-cli.mjs");

/** The offline PostgreSQL image is imported with the registry install (test/e2e/run.sh), not in the VM. */
const pgImage = process.env["E2E_PG_IMAGE"] ?? "";
const noPostgres = (await docker(["image", "inspect", pgImage])).exitCode === 0 ? false : `no PostgreSQL image ${pgImage} in this engine (imported only with the registry install)`;

async function thinvol(args: readonly string[]) {
  const r = await execa(process.execPath, [CLI, "--plugin", env.plugin, ...args], { reject: false, timeout: 300_000, stdin: "ignore" });
  return { stdout: String(r.stdout), stderr: String(r.stderr), exitCode: r.exitCode ?? -1 };
}

async function thinvolOk(args: readonly string[]): Promise<string> {
  const r = await thinvol(args);
  if (r.exitCode !== 0) throw new Error(`thinvol ${args.join(" ")} exited with ${r.exitCode}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

/** The size of the filesystem at /d as a container sees it, in bytes (-P: one line, however long the device name). */
async function fsSize(container: string): Promise<number> {
  const out = await dockerOk(["exec", container, "df", "-Pk", "/d"]);
  const kib = Number(out.split("\n")[1]?.trim().split(/\s+/)[1]);
  return kib * 1024;
}

describe("the thinvol command with the installed plugin", () => {
  const volumes: string[] = [];
  const containers: string[] = [];
  after(async () => {
    await removeContainers(...containers);
    for (const v of volumes) {
      for (const s of (await inspectVolume(v).catch(() => undefined))?.Status?.["snapshots"]?.toString().split(",") ?? []) {
        if (s !== "") await thinvol(["snapshot", "rm", v, s]);
      }
    }
    await removeVolumes(...volumes);
  });

  test("ls and df show the volumes and the pool; --json is one document", async () => {
    const v = uniqueName("listed");
    volumes.push(v);
    await createVolume(v, { size: "96M" });
    const table = await thinvolOk(["ls"]);
    const row = table.split("\n").find((l) => l.startsWith(`${v} `));
    assert.ok(row, `ls lists ${v}:\n${table}`);
    assert.match(row, /96 MiB/);
    const json = JSON.parse(await thinvolOk(["ls", "--json"])) as { volumes: { name: string; sizeBytes: number }[] };
    assert.equal(json.volumes.find((x) => x.name === v)?.sizeBytes, 96 * MiB);
    const df = await thinvolOk(["df"]);
    assert.match(df, new RegExp(env.poolDriver));
    const bad = await thinvol(["resize", v]);
    assert.equal(bad.exitCode, 2, "a usage error exits with 2");
  });

  test("a volume grows while a container writes to it; the container sees the new size at once", async () => {
    const v = uniqueName("grow");
    const c = uniqueName("writer");
    volumes.push(v);
    containers.push(c);
    // xfs grows mounted on every host; ext4 needs CAP_SYS_RESOURCE (see the next test).
    await createVolume(v, { fs: "xfs", size: "320M" });
    await dockerOk([
      "run", "-d", "--name", c, "--network", "none", "-v", `${v}:/d`, env.image,
      "sh", "-c", "i=0; while true; do i=$((i+1)); dd if=/dev/zero of=/d/f$((i%8)) bs=1M count=2 conv=fsync 2>/dev/null || { echo FAIL $i > /d/failed; exit 1; }; done",
    ]);
    const before = await fsSize(c);
    const out = await thinvolOk(["resize", v, "640M"]);
    assert.match(out, new RegExp(`${v}.*320 MiB.*640 MiB`));
    const after = await fsSize(c);
    assert.ok(after > before + 250 * MiB, `the container's filesystem grew from ${before} to ${after} bytes`);
    // More than the old size could hold, written at once by the running container.
    await dockerOk(["exec", c, "dd", "if=/dev/zero", "of=/d/big", "bs=1M", "count=400", "conv=fsync"]);
    assert.equal((await dockerOk(["inspect", "--format", "{{.State.Running}}", c])), "true", "the writer never stopped");
    assert.equal((await docker(["exec", c, "test", "-e", "/d/failed"])).exitCode, 1, "no write of the writer failed");
    assert.equal((await inspectVolume(v)).Status?.["sizeBytes"], 640 * MiB, "docker volume inspect shows the new size");
    const shrink = await thinvol(["resize", v, "320M"]);
    assert.equal(shrink.exitCode, 1);
    assert.match(shrink.stderr, /a volume never shrinks/);
  });

  test("an ext4 volume grows while unmounted, or mounted where the plugin may (CAP_SYS_RESOURCE)", async () => {
    const v = uniqueName("grow4");
    const c = uniqueName("holder");
    volumes.push(v);
    containers.push(c);
    await createVolume(v, { size: "64M" });
    await runInOk(v, "echo kept > /d/f");
    await dockerOk(["run", "-d", "--name", c, "--network", "none", "-v", `${v}:/d`, env.image, "sleep", "600"]);
    const online = await thinvol(["resize", v, "160M"]);
    if (online.exitCode !== 0) {
      // This engine withholds CAP_SYS_RESOURCE: the refusal says so and changes nothing.
      assert.equal(online.exitCode, 1);
      assert.match(online.stderr, /cannot resize volume ".*" while it is mounted: growing a mounted ext4 filesystem needs the CAP_SYS_RESOURCE capability/);
      assert.equal((await inspectVolume(v)).Status?.["sizeBytes"], 64 * MiB);
      await removeContainers(c);
      await thinvolOk(["resize", v, "160M"]);
    }
    assert.equal((await inspectVolume(v)).Status?.["sizeBytes"], 160 * MiB);
    const out = await runInOk(v, "cat /d/f; df -Pk /d | tail -1");
    assert.match(out, /^kept\n/);
    assert.ok(Number(out.split("\n")[1]?.trim().split(/\s+/)[1]) * 1024 > 140 * MiB, out);
  });

  test("snapshot, write, rollback in place: a container started again sees the old data", async () => {
    const v = uniqueName("db");
    const c = uniqueName("app");
    volumes.push(v);
    containers.push(c);
    await createVolume(v, { size: "64M" });
    await runInOk(v, "echo row1 > /d/table");
    await dockerOk(["run", "-d", "--name", c, "--network", "none", "-v", `${v}:/d`, env.image, "sleep", "600"]);
    await thinvolOk(["snapshot", "create", v, "before"]);
    await dockerOk(["exec", c, "sh", "-c", "echo row2 >> /d/table; echo oops > /d/new"]);
    const listed = await thinvolOk(["snapshot", "ls", v]);
    assert.match(listed, /before/);

    const refused = await thinvol(["rollback", v, "before"]);
    assert.equal(refused.exitCode, 1);
    assert.match(refused.stderr, new RegExp(`cannot roll back volume "${v}" to snapshot "before": it is mounted`));
    await removeContainers(c);
    await thinvolOk(["rollback", v, "before"]);
    assert.equal(await runInOk(v, "cat /d/table; ls /d"), "row1\ntable");

    // A new volume from the snapshot, through Docker.
    const copy = uniqueName("copy");
    volumes.push(copy);
    await createVolume(copy, { from: `${v}@before` });
    assert.equal(await runInOk(copy, "cat /d/table"), "row1");

    const rm = await docker(["volume", "rm", v]);
    assert.notEqual(rm.exitCode, 0);
    assert.match(rm.stderr, new RegExp(`it has a snapshot "before"; remove it first with thinvol snapshot rm ${v} before`));
    await thinvolOk(["snapshot", "rm", v, "before"]);
    await dockerOk(["volume", "rm", v]);
    volumes.splice(volumes.indexOf(v), 1);
  });

  test("PostgreSQL keeps running while its volume grows; snapshot, write, rollback and a start again show the old rows", { skip: noPostgres }, async () => {
    const v = uniqueName("pgdata");
    const c = uniqueName("postgres");
    volumes.push(v);
    containers.push(c);
    await createVolume(v, { fs: "xfs", size: "320M" });
    const pg = new Postgres(c, v);
    await pg.start(pgImage);
    await pg.sql("create table rows as select generate_series(1, 1000) as i; checkpoint");
    // Load runs while the volume grows; PostgreSQL never stops and every statement succeeds.
    const load = (async () => {
      for (let i = 0; i < 20; i++) await pg.sql(`insert into rows select generate_series(1, 1000); checkpoint`);
    })();
    await thinvolOk(["resize", v, "1G"]);
    await load;
    assert.equal(await pg.sql("select count(*) from rows"), String(21_000));
    // The space past the old size takes data at once: 300 MiB of rows beside the cluster, more than 320 MiB could hold.
    await pg.sql("create table big (i int, pad text); alter table big alter column pad set storage plain");
    await pg.sql("insert into big select i, repeat('x', 1000) from generate_series(1, 300000) as i; checkpoint");
    assert.equal((await dockerOk(["inspect", "--format", "{{.State.Running}}", c])), "true");
    assert.equal((await inspectVolume(v)).Status?.["sizeBytes"], 1024 * MiB);
    await pg.sql("drop table big; checkpoint");

    await thinvolOk(["snapshot", "create", v, "before-migration"]);
    await pg.sql("delete from rows where i > 10; insert into rows values (-1); checkpoint");
    assert.equal(await pg.sql("select count(*) from rows"), "211");
    await dockerOk(["stop", "-t", "30", c]);
    await thinvolOk(["rollback", v, "before-migration"]);
    await dockerOk(["start", c]);
    await pg.ready();
    assert.equal(await pg.sql("select count(*) from rows"), String(21_000), "the rows of the snapshot are back");
    assert.equal(await pg.sql("select count(*) from rows where i = -1"), "0");
    await removeContainers(c);
    await thinvolOk(["snapshot", "rm", v, "before-migration"]);
  });

  test("metrics are Prometheus text with every volume", async () => {
    const v = uniqueName("metered");
    volumes.push(v);
    await createVolume(v, { size: "64M" });
    const r = await runIn(v, "true");
    assert.equal(r.exitCode, 0);
    const text = await thinvolOk(["metrics"]);
    assert.match(text, new RegExp(`^thinvol_volume_size_bytes\\{volume="${v}"\\} ${64 * MiB}$`, "m"));
    assert.match(text, /^thinvol_requests_total\{api="docker",method="VolumeDriver.Mount",outcome="ok"\} [1-9]/m);
  });
});
