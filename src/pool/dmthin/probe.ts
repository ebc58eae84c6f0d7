import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { errorMessage } from "../../errors.js";
import type { Logger } from "../../log.js";
import { createDevice, deviceInfo, kernelDriverVersion, listTargets, removeDevice, thinPoolTable } from "../../system/dmsetup.js";
import { attachLoop, detachLoop } from "../../system/losetup.js";
import type { Runner } from "../../system/runner.js";
import { growSparseFile } from "./backing.js";

async function hasThinPoolTarget(runner: Runner): Promise<boolean> {
  return (await listTargets(runner)).has("thin-pool");
}

/**
 * Creates and at once removes a tiny pool on two sparse files: loading a
 * thin-pool table makes the kernel load dm-thin-pool when modprobe cannot run.
 */
async function probeThinPool(runner: Runner, log: Logger, probeDir: string): Promise<void> {
  const dir = await mkdtemp(join(probeDir, "thinvol-probe-"));
  const name = `thinvol-probe-${process.pid}`;
  const loops: string[] = [];
  try {
    const data = join(dir, "data.img");
    const meta = join(dir, "meta.img");
    await growSparseFile(data, 16 * 1024 * 1024);
    await growSparseFile(meta, 2 * 1024 * 1024);
    loops.push(await attachLoop(runner, meta));
    loops.push(await attachLoop(runner, data));
    const [metaLoop, dataLoop] = loops as [string, string];
    await createDevice(runner, name, thinPoolTable({ lengthSectors: 32768, metaDevice: metaLoop, dataDevice: dataLoop, blockSizeSectors: 128, lowWaterBlocks: 0, features: ["skip_block_zeroing"] }));
  } catch (err) {
    log.debug("dm-thin probe pool could not be created", { error: errorMessage(err) });
  } finally {
    try {
      if (await deviceInfo(runner, name)) await removeDevice(runner, name);
    } catch (err) {
      log.warn("could not remove the dm-thin probe pool", { device: name, error: errorMessage(err) });
    }
    for (const loop of loops) {
      try {
        await detachLoop(runner, loop);
      } catch (err) {
        log.warn("could not detach a dm-thin probe loop device", { device: loop, error: errorMessage(err) });
      }
    }
    await rm(dir, { recursive: true, force: true });
  }
}

/**
 * True when the kernel has device-mapper with the thin-pool target. When
 * device-mapper is there but thin-pool is not listed, the module may simply not
 * be loaded yet: try modprobe, then a throwaway pool, and look again. Never throws.
 */
export async function dmThinAvailable(runner: Runner, log: Logger, probeDir: string = tmpdir()): Promise<boolean> {
  try {
    let driver: string | undefined;
    try {
      driver = await kernelDriverVersion(runner);
    } catch (err) {
      log.info("dm-thin unavailable: the kernel has no device-mapper", { error: errorMessage(err) });
      return false;
    }
    if (driver === undefined) {
      log.info("dm-thin unavailable: the kernel has no device-mapper");
      return false;
    }
    if (await hasThinPoolTarget(runner)) {
      log.info("dm-thin available", { driver });
      return true;
    }
    try {
      await runner.run("modprobe", ["dm_thin_pool"]);
    } catch (err) {
      log.debug("modprobe dm_thin_pool failed", { error: errorMessage(err) });
    }
    if (!(await hasThinPoolTarget(runner))) await probeThinPool(runner, log, probeDir);
    const ok = await hasThinPoolTarget(runner);
    log.info(ok ? "dm-thin available (module loaded on demand)" : "dm-thin unavailable: device-mapper has no thin-pool target", { driver });
    return ok;
  } catch (err) {
    log.warn("dm-thin unavailable: probing device-mapper failed", { error: errorMessage(err) });
    return false;
  }
}
