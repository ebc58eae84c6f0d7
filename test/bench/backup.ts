/**
 * Backups: a 2 GiB volume holding 1 GiB of incompressible data on the loop pool, backed up
 * through the server's admin socket to a directory and to a real S3 server (s3rver, on
 * loopback); then 1% of the volume changed and backed up again; then restored. Prints
 * figures only: times, blocks read, bytes stored, throughput, and the server's memory.
 *
 *   sudo npm run bench -- --backup
 */
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtemp, open, readFile, rm } from "node:fs/promises";
import { join } from "node:path";
import { adminOk } from "../support/admin-client.js";
import { tearDownPool } from "../support/kernel.js";
import { BUNDLE, callOk, serverEnv, startServer, stopServer } from "../support/plugin-client.js";
import { startS3Server } from "../support/s3-server.js";

const MiB = 1024 ** 2;
const dir = await mkdtemp("/var/tmp/thinvol-bench-backup-");
const s3 = await startS3Server("thinvol-bench", "backups");
const sock = join(dir, "thinvol.sock");
const adminSock = join(dir, "state", "admin.sock");
const server = await startServer(
  BUNDLE,
  serverEnv(dir, {
    POOL_SIZE: "8G",
    S3_ENDPOINT: s3.settings.endpoint ?? "",
    S3_REGION: s3.settings.region ?? "",
    S3_ACCESS_KEY_ID: s3.settings.accessKeyId ?? "",
    S3_SECRET_ACCESS_KEY: s3.settings.secretAccessKey ?? "",
  }),
);

async function rssMiB(): Promise<string> {
  const status = await readFile(`/proc/${server.child.pid}/status`, "utf8");
  return `${(Number(/VmHWM:\s+(\d+)/.exec(status)?.[1] ?? "0") / 1024).toFixed(0)} MiB peak`;
}

const rate = (bytes: number, ms: number) => `${((bytes / MiB) / (ms / 1000)).toFixed(0)} MiB/s`;

try {
  await callOk(sock, "VolumeDriver.Create", { Name: "data", Opts: { size: "2G" } });
  const mp = String((await callOk(sock, "VolumeDriver.Mount", { Name: "data", ID: "bench" }))["Mountpoint"]);
  const file = join(mp, "data");
  const h = await open(file, "w");
  for (let i = 0; i < 1024; i += 16) await h.write(randomBytes(16 * MiB));
  await h.sync();
  await h.close();
  process.stdout.write("a 2 GiB volume holding 1 GiB of random data, mounted; 2 MiB blocks, gzip -1\n");
  for (const [label, to] of [
    ["directory", `file://${join(dir, "target")}`],
    ["S3 (s3rver on loopback)", s3.url],
  ] as const) {
    let t = performance.now();
    const full = await adminOk(adminSock, "POST", "/v1/volumes/data/backups", { to });
    const fullMs = performance.now() - t;
    // 1% of the volume: 20 MiB rewritten in place, in ten places.
    const w = await open(file, "r+");
    for (let i = 0; i < 10; i++) await w.write(randomBytes(2 * MiB), 0, 2 * MiB, i * 97 * MiB);
    await w.sync();
    await w.close();
    t = performance.now();
    const inc = await adminOk(adminSock, "POST", "/v1/volumes/data/backups", { to });
    const incMs = performance.now() - t;
    t = performance.now();
    const name = `restored-${label.startsWith("S3") ? "s3" : "dir"}`;
    await adminOk(adminSock, "POST", "/v1/restore", { from: to, id: inc["id"], volume: name });
    const restoreMs = performance.now() - t;
    process.stdout.write(
      `${label}:\n` +
        `  full:        ${fullMs.toFixed(0)} ms, ${full["blocksRead"]} blocks read, ${(Number(full["bytesUploaded"]) / MiB).toFixed(1)} MiB stored (${rate(Number(full["bytesRead"]), fullMs)})\n` +
        `  1% changed:  ${incMs.toFixed(0)} ms, ${inc["blocksRead"]} blocks read, ${inc["blocksChanged"]} changed, ${(Number(inc["bytesUploaded"]) / MiB).toFixed(1)} MiB stored (incremental: ${inc["incremental"]})\n` +
        `  restore:     ${restoreMs.toFixed(0)} ms (${rate(1024 * MiB, restoreMs)})\n`,
    );
  }
  process.stdout.write(`server memory: ${await rssMiB()}\n`);
  await callOk(sock, "VolumeDriver.Unmount", { Name: "data", ID: "bench" });
} finally {
  await stopServer(server);
  await s3.stop();
  execFileSync("sync");
  await tearDownPool(dir);
  await rm(dir, { recursive: true, force: true });
}
