// One boot of the power-cut proof, inside the VM (test/vm/powercut.test.ts drives it through
// vm.sh). Plain JavaScript: under TCG, node starts in ~2 s and tsx would add several more.
//
//   1. mount the persistent disk (/dev/vda, formatted ext4 on the first boot) as the pool's home
//   2. start the real server (dist/thinvol.mjs, built on the host) on it, which recovers
//      from the last power cut
//   3. report what a user would check: every volume listed, mounted, its records read back,
//      fsck'd while unmounted; records and pool agree (nothing leaked, nothing lost)
//   4. do the action of this round and, at the point where the host may cut the power, print
//      PC-ARM; then keep going (or wait) until the host kills qemu. "final" stops the
//      server cleanly instead and reports the devices left behind.
//
// Output (the vm.sh stream, which the host reads live), one line each:
//   PC-FACT <json>          facts for the host to assert on
//   PC-ARM <json>           the interrupted operation starts now; the host cuts after a delay
//   PC-ACK <vol> <file> <n> record n of <file> on <vol> was written and fdatasync returned
//   PC-DONE <json>          the armed operation was answered (so it was acknowledged)
//   server| ...             the server's log
// Input: THINVOL_PC_DRIVER (loop | dm-thin), THINVOL_PC_ACTION (json, see act()).
import { execFileSync, spawn, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, readFileSync, writeSync } from "node:fs";
import { open } from "node:fs/promises";
import { request } from "node:http";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";

const repo = new URL("../..", import.meta.url).pathname;
const DISK = "/dev/vda";
const HOME = "/powercut";
const STATE_DIR = join(HOME, "state");
const MOUNT_DIR = "/run/thinvol-powercut/volumes"; // tmpfs: mounts do not survive a reset
const SOCKET = "/run/thinvol-powercut.sock";
/** Fixed-size records: record n lives at n * RECORD_BYTES, so a read-back is exact. */
const RECORD_BYTES = 64;
const driver = process.env.THINVOL_PC_DRIVER ?? "loop";
const action = JSON.parse(process.env.THINVOL_PC_ACTION ?? '{"op":"none"}');

/** Written with one write(2) each, so a line is on its way before the next step starts. */
const say = (line) => writeSync(1, line + "\n");
const fact = (kind, data) => say(`PC-FACT ${JSON.stringify({ kind, ...data })}`);
const run = (cmd, args) => {
  const r = spawnSync(cmd, args, { encoding: "utf8" });
  return { code: r.status ?? -1, out: `${r.stdout ?? ""}${r.stderr ?? ""}${r.error ? String(r.error) : ""}`.trim() };
};

function record(n, vol, file) {
  const head = `${String(n).padStart(8, "0")} ${vol} ${file} `;
  return head.padEnd(RECORD_BYTES - 1, ".") + "\n";
}

// ---- the disk --------------------------------------------------------------------------------
for (let i = 0; i < 100 && !existsSync(DISK); i++) await sleep(50);
if (run("blkid", [DISK]).code !== 0) {
  // First boot of this disk. The disk cache is on (qemu cache=none): ext4's flushes matter.
  execFileSync("mkfs.ext4", ["-q", "-F", "-L", "powercut", DISK]);
  fact("formatted", { disk: DISK });
}
mkdirSync(HOME, { recursive: true });
execFileSync("mount", ["-t", "ext4", DISK, HOME]);
mkdirSync(MOUNT_DIR, { recursive: true });

// ---- the server ------------------------------------------------------------------------------
const env = {
  ...process.env,
  SOCKET_PATH: SOCKET,
  STATE_DIR,
  MOUNT_DIR,
  POOL_DRIVER: driver,
  POOL_SIZE: "1G",
  DEFAULT_SIZE: "64M",
  MIN_FREE_SPACE: "1",
};
let serverLog = "";
// The bundle built on the host (the plugin build's THINVOL_BUNDLE when it names another).
const bundle = process.env.THINVOL_BUNDLE || join(repo, "dist", "thinvol.mjs");
const server = spawn(process.execPath, [bundle], { env, stdio: ["ignore", "pipe", "pipe"] });
let partial = "";
const onOutput = (d) => {
  serverLog += d.toString();
  partial += d.toString();
  const lines = partial.split("\n");
  partial = lines.pop() ?? "";
  for (const l of lines) say(`server| ${l}`);
};
server.stdout.on("data", onOutput);
server.stderr.on("data", onOutput);
const started = Date.now();
while (!/ ready |start-up failed/.test(serverLog)) {
  if (server.exitCode !== null || Date.now() - started > 90_000) break;
  await sleep(50);
}
const ready = / ready /.test(serverLog);
fact("server", { ready, ms: Date.now() - started });
if (!ready) process.exit(3);

function call(method, body = {}) {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath: SOCKET, path: `/${method}`, method: "POST", setHost: false }, (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (c) => (text += c));
      res.on("end", () => {
        const reply = JSON.parse(text || "{}");
        if (res.statusCode !== 200 || reply.Err) reject(new Error(`${method}: ${reply.Err ?? res.statusCode}`));
        else resolve(reply);
      });
    });
    req.on("error", reject);
    req.end(JSON.stringify(body));
  });
}

/** Valid records from the start of `path`, and whether the whole file is whole records. */
function readRecords(path, vol, file) {
  const data = readFileSync(path);
  let valid = 0;
  while ((valid + 1) * RECORD_BYTES <= data.length && data.toString("latin1", valid * RECORD_BYTES, (valid + 1) * RECORD_BYTES) === record(valid, vol, file)) {
    valid++;
  }
  return { valid, bytes: data.length };
}

function mountSource(mountpoint) {
  for (const line of readFileSync("/proc/self/mountinfo", "utf8").split("\n")) {
    const f = line.split(" ");
    const sep = f.indexOf("-");
    if (f[4] === mountpoint && sep > 0) return { device: f[sep + 2], fs: f[sep + 1] };
  }
  return undefined;
}

// ---- checks after the restart ----------------------------------------------------------------
const recovery = serverLog
  .split("\n")
  .filter((l) => / (warn|error) /.test(l))
  .map((l) => l.replace(/^\S+ /, ""));
const names = (await call("VolumeDriver.List")).Volumes.map((v) => v.Name).sort();
const volumes = {};
for (const name of names) {
  const v = { files: {} };
  volumes[name] = v;
  try {
    const mp = (await call("VolumeDriver.Mount", { Name: name, ID: "check" })).Mountpoint;
    v.mounted = true;
    for (const file of readdirSync(mp).filter((f) => f.endsWith(".log")).sort()) {
      // A clone keeps its origin's file, whose records name the origin.
      const owner = file.split(".")[0];
      v.files[file] = readRecords(join(mp, file), owner, file);
    }
    const src = mountSource(mp);
    v.fs = src?.fs;
    execFileSync("umount", [mp]);
    const fsck = src?.fs === "xfs" ? run("xfs_repair", ["-n", src.device]) : run("e2fsck", ["-f", "-n", src?.device ?? "?"]);
    v.fsck = { code: fsck.code, out: fsck.code === 0 ? "" : fsck.out.slice(-2000) };
    await call("VolumeDriver.Unmount", { Name: name, ID: "check" });
  } catch (err) {
    v.error = String(err?.message ?? err);
  }
}
const records = {};
for (const f of readdirSync(join(STATE_DIR, "volumes")).filter((f) => f.endsWith(".json"))) {
  try {
    records[f.slice(0, -5)] = JSON.parse(readFileSync(join(STATE_DIR, "volumes", f), "utf8")).state;
  } catch (err) {
    records[f.slice(0, -5)] = `unreadable: ${err.message}`;
  }
}
let inPool;
if (driver === "loop") {
  inPool = readdirSync(join(STATE_DIR, "pool-loop", "mnt", "volumes"))
    .filter((f) => f.endsWith(".img"))
    .map((f) => f.slice(0, -4));
} else {
  const state = JSON.parse(readFileSync(join(STATE_DIR, "pool-dm-thin", "dmthin-state.json"), "utf8"));
  inPool = Object.keys(state.volumes);
  if (state.pending) inPool.push(`pending:${JSON.stringify(state.pending)}`);
}
fact("check", { names, volumes, records, inPool: inPool.sort(), recovery });

// ---- the action of this round ----------------------------------------------------------------
/** Appends fsync'd records to <vol>.log on each mounted volume in turn, for ever. */
async function writeRecords(vols, onAck) {
  const files = [];
  for (const vol of vols) {
    const mp = (await call("VolumeDriver.Mount", { Name: vol, ID: "writer" })).Mountpoint;
    const file = `${vol}.log`;
    const path = join(mp, file);
    const { valid } = existsSync(path) ? readRecords(path, vol, file) : { valid: 0 };
    const handle = await open(path, "r+").catch(() => open(path, "w+"));
    // Continue after the last valid record: a torn tail from the last cut is overwritten.
    await handle.truncate(valid * RECORD_BYTES);
    await handle.datasync();
    files.push({ vol, file, handle, next: valid });
  }
  for (;;) {
    for (const f of files) {
      await f.handle.write(record(f.next, f.vol, f.file), f.next * RECORD_BYTES, "latin1");
      await f.handle.datasync();
      say(`PC-ACK ${f.vol} ${f.file} ${f.next}`);
      f.next++;
      onAck?.(f);
    }
  }
}

async function act() {
  switch (action.op) {
    case "setup-writer":
      // First boot: the writer volumes, then records until the cut.
      for (const v of action.volumes) await call("VolumeDriver.Create", { Name: v.name, Opts: v.opts });
      say(`PC-ARM ${JSON.stringify({ op: "writer" })}`);
      return writeRecords(action.volumes.map((v) => v.name));
    case "writer":
      say(`PC-ARM ${JSON.stringify({ op: "writer" })}`);
      return writeRecords(action.volumes);
    case "clone-while-writing": {
      // A clone of a volume in use: the writer keeps going while the origin is frozen.
      let armed = false;
      let acked = 0;
      return writeRecords([action.from], (f) => {
        acked = f.next;
        if (armed || acked < action.recordsFirst) return;
        armed = true;
        say(`PC-ARM ${JSON.stringify({ op: "clone", name: action.name, from: action.from, ackedBefore: acked })}`);
        call("VolumeDriver.Create", { Name: action.name, Opts: { from: action.from } }).then(
          () => say(`PC-DONE ${JSON.stringify({ op: "clone", name: action.name })}`),
          (err) => say(`PC-FACT ${JSON.stringify({ kind: "op-error", error: err.message })}`),
        );
      });
    }
    case "create":
    case "remove": {
      if (action.op === "remove" && !names.includes(action.name)) {
        await call("VolumeDriver.Create", { Name: action.name, Opts: action.opts ?? null });
      }
      say(`PC-ARM ${JSON.stringify({ op: action.op, name: action.name })}`);
      try {
        if (action.op === "create") await call("VolumeDriver.Create", { Name: action.name, Opts: action.opts ?? null });
        else await call("VolumeDriver.Remove", { Name: action.name });
        say(`PC-DONE ${JSON.stringify({ op: action.op, name: action.name })}`);
      } catch (err) {
        fact("op-error", { error: err.message });
      }
      for (;;) await sleep(1000); // until the power goes
    }
    case "final": {
      // A clean stop: nothing of the pool may stay attached but what an idle pool keeps.
      server.kill("SIGTERM");
      await new Promise((resolve) => server.once("exit", resolve));
      const loops = run("losetup", ["--list", "--noheadings", "--raw", "--output", "NAME,BACK-FILE"]).out.split("\n").filter((l) => l.trim() !== "");
      const dm = run("dmsetup", ["ls"]).out.split("\n").filter((l) => /^thinvol-/.test(l));
      let thinIds;
      if (driver === "dm-thin") {
        // With the pool down, its metadata says which thin devices really exist.
        const dump = run("thin_dump", [join(STATE_DIR, "pool-dm-thin", "meta.img")]);
        thinIds = [...dump.out.matchAll(/<device dev_id="(\d+)"/g)].map((m) => Number(m[1])).sort((a, b) => a - b);
        const state = JSON.parse(readFileSync(join(STATE_DIR, "pool-dm-thin", "dmthin-state.json"), "utf8"));
        fact("thin", { thinIds, stateIds: Object.values(state.volumes).map((v) => v.id).sort((a, b) => a - b), dumpCode: dump.code });
      }
      fact("stopped", { loops, dm, mounts: run("findmnt", ["-rn", "-o", "TARGET"]).out.split("\n").filter((m) => m.startsWith(HOME + "/") || m.startsWith(MOUNT_DIR)) });
      execFileSync("umount", [HOME]);
      return;
    }
    default:
      return;
  }
}

await act();
process.exit(0);
