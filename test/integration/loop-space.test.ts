/**
 * The loop pool's space on the host, through the real server bundle: removing a volume gives
 * its space back every time, every filesystem mounts after a clone, and a full host disk fails
 * only the write that cannot be stored.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdir, mkdtemp, open, readFile, rm, stat, unlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { setTimeout as sleep } from "node:timers/promises";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { gapsBetween, parseFiemap } from "../../src/system/extents.js";
import { readMounts } from "../../src/system/mount.js";
import { mountsUnder, tearDownPool } from "../support/kernel.js";
import { BUNDLE, callOk, callPlugin, startServer, stopServer, serverEnv, type ServerProcess } from "../support/plugin-client.js";

const MiB = 1024 ** 2;

/** Writes `bytes` of non-zero data to `path` and fsyncs it; rejects with the first error the kernel reports. */
async function writeSynced(path: string, bytes: number, flags = "w"): Promise<void> {
  const handle = await open(path, flags);
  try {
    const chunk = Buffer.alloc(MiB, 0x5a);
    for (let done = 0; done < bytes; done += MiB) {
      await handle.write(chunk, 0, Math.min(MiB, bytes - done));
      if (done % (16 * MiB) === 0) await handle.sync();
    }
    await handle.sync();
  } finally {
    await handle.close().catch(() => undefined);
  }
}

/** Writes until the kernel refuses; resolves to the error code it gave. */
async function fillUntilRefused(path: string): Promise<string> {
  try {
    await writeSynced(path, 64 * 1024 * MiB);
  } catch (err) {
    return String((err as NodeJS.ErrnoException).code);
  }
  throw new Error(`${path}: 64 GiB were written without an error`);
}

const hostBytes = async (file: string) => (await stat(file)).blocks * 512;
const mountOptionsOf = async (mp: string) => {
  const line = (await readFile("/proc/self/mountinfo", "utf8")).split("\n").find((l) => l.split(" ")[4] === mp) ?? "";
  return line.split(" ")[5] ?? "";
};

interface Plugin {
  dir: string;
  sock: string;
  env: Record<string, string>;
  server: ServerProcess;
}

async function startPlugin(dir: string, extra: Record<string, string> = {}): Promise<Plugin> {
  const env = serverEnv(dir, { POOL_SIZE: "3G", DEFAULT_SIZE: "256M", MIN_FREE_SPACE: "1", LOG_LEVEL: "debug", ...extra });
  return { dir, sock: env["SOCKET_PATH"] ?? "", env, server: await startServer(BUNDLE, env) };
}

async function stopPlugin(p: Plugin | undefined): Promise<void> {
  if (!p) return;
  await stopServer(p.server);
  for (const m of (await mountsUnder(join(p.dir, "volumes"))).reverse()) execFileSync("umount", [m]);
  await tearDownPool(p.dir);
}

describe("loop pool space on the host", () => {
  let root: string;
  let p: Plugin | undefined;
  const call = (method: string, body: unknown) => callOk(p?.sock ?? "", method, body);
  const mount = async (Name: string, ID: string) => String((await call("VolumeDriver.Mount", { Name, ID }))["Mountpoint"]);
  const poolFile = () => join(p?.dir ?? "", "state", "pool-loop", "pool.img");

  before(async () => {
    root = await mkdtemp(join(process.env["THINVOL_TEST_TMP"] ?? tmpdir(), "thinvol-space-"));
    p = await startPlugin(join(root, "a"));
  });

  after(async () => {
    await stopPlugin(p).catch(() => undefined);
    await rm(root, { recursive: true, force: true });
  });

  test("removing a volume gives the host back every block it wrote, 20 times in a row", async () => {
    for (let i = 0; i < 20; i++) {
      await call("VolumeDriver.Create", { Name: `rm${i}`, Opts: { size: "128M" } });
      const mp = await mount(`rm${i}`, "c1");
      await writeSynced(join(mp, "data"), 48 * MiB);
      await call("VolumeDriver.Unmount", { Name: `rm${i}`, ID: "c1" });
      const before = await hostBytes(poolFile());
      await call("VolumeDriver.Remove", { Name: `rm${i}` });
      const freed = before - (await hostBytes(poolFile()));
      assert.ok(freed >= 47 * MiB, `round ${i}: removing a volume holding 48 MiB gave the host back ${freed} bytes\n${p?.server.output().slice(-3000)}`);
    }
  });

  test("every block of the pool file is allocated on the host but the balloon's, so no pool write can need host space", async () => {
    // After the removes above: the reserve has grown and shrunk many times.
    const poolDir = join(p?.dir ?? "", "state", "pool-loop");
    const size = (await stat(poolFile())).size;
    const fiemap = (file: string, length: number) => parseFiemap(execFileSync("xfs_io", ["-r", "-c", `fiemap 0 ${length}`, file], { encoding: "utf8" }));
    const onHost = fiemap(poolFile(), size).map((e) => ({ offset: e.fileOffset, length: e.length }));
    const balloonFile = join(poolDir, "mnt", "reserve.balloon");
    const balloon = fiemap(balloonFile, (await stat(balloonFile)).size).map((e) => ({ offset: e.deviceOffset, length: e.length }));
    // The holes of the pool file must all lie inside the balloon: covering both leaves nothing.
    const uncovered = gapsBetween([...onHost, ...balloon], size);
    const total = uncovered.reduce((n, g) => n + g.length, 0);
    assert.deepEqual(uncovered.slice(0, 5), [], `${total} bytes of the pool file are neither on the host nor in the balloon`);
  });

  for (const fs of ["ext4", "xfs"] as const) {
    test(`an ${fs} volume and its clone both mount, before and after a restart`, async () => {
      const origin = `orig-${fs}`;
      const copy = `copy-${fs}`;
      await call("VolumeDriver.Create", { Name: origin, Opts: { fs, size: "320M" } });
      let omp = await mount(origin, "c1");
      await writeFile(join(omp, "f"), "before the clone");
      await call("VolumeDriver.Create", { Name: copy, Opts: { from: origin } });
      await call("VolumeDriver.Unmount", { Name: origin, ID: "c1" });
      for (let round = 0; round < 2; round++) {
        omp = await mount(origin, "c2");
        const cmp = await mount(copy, "c3");
        assert.equal(await readFile(join(cmp, "f"), "utf8"), "before the clone");
        assert.equal(await readFile(join(omp, "f"), "utf8"), "before the clone");
        await call("VolumeDriver.Unmount", { Name: origin, ID: "c2" });
        await call("VolumeDriver.Unmount", { Name: copy, ID: "c3" });
        // As after a reboot: no loop device survives, the next mount attaches afresh.
        await stopPlugin(p);
        p = await startPlugin(p?.dir ?? "");
      }
      await call("VolumeDriver.Remove", { Name: copy });
      await call("VolumeDriver.Remove", { Name: origin });
    });
  }

  test("an xfs volume made with 512-byte sectors by an earlier thinvol still mounts, and so does its clone", async () => {
    await call("VolumeDriver.Create", { Name: "legacy", Opts: { fs: "xfs", size: "320M" } });
    // What thinvol made before: xfs with 512-byte sectors, on a loop device that had them.
    const image = join(p?.dir ?? "", "state", "pool-loop", "mnt", "volumes", "legacy.img");
    const dev = execFileSync("losetup", ["--find", "--show", "--sector-size", "512", image]).toString().trim();
    try {
      execFileSync("mkfs.xfs", ["-q", "-f", "-K", "-s", "size=512", dev]);
      const mnt = join(root, "legacy-mnt");
      await mkdir(mnt, { recursive: true });
      execFileSync("mount", [dev, mnt]);
      await writeFile(join(mnt, "f"), "made by an earlier thinvol");
      execFileSync("umount", [mnt]);
    } finally {
      execFileSync("losetup", ["--detach", dev]);
    }
    await call("VolumeDriver.Create", { Name: "legacy-copy", Opts: { from: "legacy" } });
    for (const name of ["legacy", "legacy-copy"]) {
      const mp = await mount(name, "c1");
      assert.equal(await readFile(join(mp, "f"), "utf8"), "made by an earlier thinvol");
      await call("VolumeDriver.Unmount", { Name: name, ID: "c1" });
    }
    await call("VolumeDriver.Remove", { Name: "legacy-copy" });
    await call("VolumeDriver.Remove", { Name: "legacy" });
  });

  test("a pool file whose state file is lost is never formatted over", async () => {
    await call("VolumeDriver.Create", { Name: "precious", Opts: {} });
    const mp = await mount("precious", "c1");
    await writeFile(join(mp, "f"), "still here");
    await call("VolumeDriver.Unmount", { Name: "precious", ID: "c1" });
    const dir = p?.dir ?? "";
    await stopPlugin(p);
    p = undefined;
    const stateFile = join(dir, "state", "pool-loop", "pool.json");
    const saved = await readFile(stateFile, "utf8");
    await unlink(stateFile);
    const refused = await startServer(BUNDLE, serverEnv(dir, { POOL_SIZE: "3G" })).then(
      async (s) => {
        await stopServer(s);
        return "";
      },
      (err: unknown) => String(err),
    );
    assert.match(refused, /pool\.json is missing: refusing to format over a pool that may hold volumes/);
    await writeFile(stateFile, saved);
    await tearDownPool(dir);
    p = await startPlugin(dir);
    const again = await mount("precious", "c2");
    assert.equal(await readFile(join(again, "f"), "utf8"), "still here");
    await call("VolumeDriver.Unmount", { Name: "precious", ID: "c2" });
    await call("VolumeDriver.Remove", { Name: "precious" });
  });
});


describe("a full host disk under the loop pool", () => {
  let root: string;
  let hostFs: string;
  let hostLoop = "";
  let p: Plugin | undefined;
  const call = (method: string, body: unknown) => callOk(p?.sock ?? "", method, body);
  const mount = async (Name: string, ID: string) => String((await call("VolumeDriver.Mount", { Name, ID }))["Mountpoint"]);
  const poolFile = () => join(hostFs, "state", "pool-loop", "pool.img");

  before(async () => {
    root = await mkdtemp(join(process.env["THINVOL_TEST_TMP"] ?? tmpdir(), "thinvol-hostfull-"));
    // The pool's directory on a small filesystem of its own, far smaller than the pool.
    const image = join(root, "hostfs.img");
    execFileSync("truncate", ["-s", "1536M", image]);
    execFileSync("mkfs.ext4", ["-q", "-F", image]);
    hostLoop = execFileSync("losetup", ["--find", "--show", image]).toString().trim();
    hostFs = join(root, "host");
    await mkdir(hostFs);
    execFileSync("mount", [hostLoop, hostFs]);
    p = await startPlugin(hostFs, { POOL_SIZE: "8G" });
  });

  after(async () => {
    await stopPlugin(p).catch(() => undefined);
    // tearDownPool unmounts everything under the pool's directory, this filesystem included.
    if ((await readMounts()).some((m) => m.mountPoint === hostFs)) execFileSync("umount", [hostFs]);
    execFileSync("losetup", ["--detach", hostLoop]);
    await rm(root, { recursive: true, force: true });
  });

  test("filling a volume fails its write with ENOSPC; the other volume keeps working; deleting data brings it back without a remount", async () => {
    await call("VolumeDriver.Create", { Name: "filler", Opts: { size: "4G" } });
    await call("VolumeDriver.Create", { Name: "bystander", Opts: { size: "2G" } });
    const fmp = await mount("filler", "c1");
    const bmp = await mount("bystander", "c2");
    await writeSynced(join(bmp, "table"), 16 * MiB);

    assert.equal(await fillUntilRefused(join(fmp, "fill")), "ENOSPC");

    // The bystander rewrites what it holds, and both filesystems are still read-write.
    await writeSynced(join(bmp, "table"), 16 * MiB, "r+");
    for (const mp of [fmp, bmp]) assert.match(await mountOptionsOf(mp), /^rw/, `${mp} is still read-write`);

    const refused = await callPlugin(p?.sock ?? "", "VolumeDriver.Create", { Name: "one-more", Opts: {} });
    assert.match(String(refused.body["Err"]), /cannot create volume "one-more": .*host filesystem under it .* free/);

    const status = ((await call("VolumeDriver.Get", { Name: "filler" }))["Volume"] as { Status: Record<string, unknown> }).Status;
    assert.match(String(status["pool"]), /host/, "Get says how much host space the pool holds and has left");

    // Deleting data in the full volume (and trimming it, so the pool gets the blocks back) lets it write again, without a remount.
    await rm(join(fmp, "fill"));
    // ext4 trims no block it has freed until its journal has committed the free.
    // (The sync also reports, once, the write that failed above.)
    try {
      execFileSync("sync", ["--file-system", fmp], { stdio: "ignore" });
    } catch {
      // ENOSPC: the failed fill.
    }
    execFileSync("fstrim", [fmp]);
    await writeSynced(join(fmp, "after"), 64 * MiB);
    assert.ok((await readMounts()).some((m) => m.mountPoint === fmp));
    await call("VolumeDriver.Unmount", { Name: "filler", ID: "c1" });
    await call("VolumeDriver.Unmount", { Name: "bystander", ID: "c2" });
    await call("VolumeDriver.Remove", { Name: "filler" });
  });

  test("the host filling up from outside the pool: volumes write into what the pool reserved, then get ENOSPC; freeing host space brings them back", async () => {
    const bmp = await mount("bystander", "c3");
    // Someone else fills the host filesystem.
    assert.equal(await fillUntilRefused(join(hostFs, "outsider")), "ENOSPC");
    // The pool had its headroom backed already: a volume can still write into it.
    await writeSynced(join(bmp, "more"), 64 * MiB);
    assert.equal(await fillUntilRefused(join(bmp, "fill")), "ENOSPC");
    assert.match(await mountOptionsOf(bmp), /^rw/);
    // With room on the host again the pool backs more of itself, and the volume writes again.
    const held = await hostBytes(poolFile());
    await unlink(join(hostFs, "outsider"));
    // The reserve is topped up within a fraction of a second; ten seconds is a hang.
    const deadline = Date.now() + 10_000;
    while ((await hostBytes(poolFile())) < held + 64 * MiB && Date.now() < deadline) await sleep(50);
    assert.ok((await hostBytes(poolFile())) >= held + 64 * MiB, "the pool took no more host space once the host had room again");
    await writeSynced(join(bmp, "again"), 64 * MiB);
    await call("VolumeDriver.Unmount", { Name: "bystander", ID: "c3" });
    await call("VolumeDriver.Remove", { Name: "bystander" });
  });
});
