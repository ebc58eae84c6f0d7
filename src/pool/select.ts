import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import * as v from "valibot";
import { ThinvolError } from "../errors.js";
import type { Logger } from "../log.js";
import { readJsonFile, writeFileAtomic } from "../system/atomic-file.js";
import type { Runner } from "../system/runner.js";
import { DmThinPool, dmThinAvailable } from "./dmthin/index.js";
import { LoopPool } from "./loop.js";
import type { Pool, PoolDriverName } from "./types.js";

export interface PoolSelection {
  runner: Runner;
  stateDir: string;
  setting: "auto" | PoolDriverName;
  dataSizeBytes: number;
  /** POOL_DEVICE: a block device for dm-thin's data; "" for a data file. Needs dm-thin. */
  dataDevice: string;
  /** MIN_FREE_SPACE: dm-thin also checks it under its own lock, where creates are serialised. */
  minFreePercent: number;
  log: Logger;
}

const ChoiceSchema = v.object({ driver: v.picklist(["dm-thin", "loop"]) });

/**
 * Picks the pool driver. The first choice is written down: a pool's volumes
 * live in that driver's files, so `auto` must not switch drivers on a later
 * start because the kernel changed.
 */
export async function selectPool(o: PoolSelection): Promise<Pool> {
  await mkdir(o.stateDir, { recursive: true, mode: 0o700 });
  const choiceFile = join(o.stateDir, "pool-driver.json");
  const saved = await readJsonFile(choiceFile);
  let driver: PoolDriverName;
  if (saved !== undefined) {
    driver = v.parse(ChoiceSchema, saved).driver;
    if (o.setting !== "auto" && o.setting !== driver) {
      throw new Error(
        `POOL_DRIVER=${o.setting}, but the pool in ${o.stateDir} was created with the ${driver} driver; ` +
          `set POOL_DRIVER=${driver} or auto, or use an empty STATE_DIR`,
      );
    }
  } else if (o.setting === "auto") {
    driver = (await dmThinAvailable(o.runner, o.log, o.stateDir)) ? "dm-thin" : "loop";
    o.log.info("pool driver chosen", { driver, reason: driver === "dm-thin" ? "the kernel has dm-thin" : "the kernel has no dm-thin" });
  } else {
    driver = o.setting;
  }
  if (o.dataDevice !== "" && driver !== "dm-thin") {
    const why =
      saved !== undefined
        ? `the pool in ${o.stateDir} was created with the ${driver} driver; unset POOL_DEVICE, or use an empty STATE_DIR`
        : o.setting === "auto"
          ? "this kernel has no dm-thin (device-mapper with the thin-pool target); unset POOL_DEVICE to use the loop driver with files"
          : "POOL_DRIVER=loop; set POOL_DRIVER=dm-thin or auto";
    throw new ThinvolError(`POOL_DEVICE=${o.dataDevice} needs the dm-thin driver, but ${why}`);
  }
  const dir = join(o.stateDir, `pool-${driver}`);
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const pool: Pool =
    driver === "dm-thin"
      ? new DmThinPool({ runner: o.runner, dir, dataSizeBytes: o.dataSizeBytes, dataDevice: o.dataDevice, log: o.log, minFreePercent: o.minFreePercent })
      : new LoopPool({ runner: o.runner, dir, dataSizeBytes: o.dataSizeBytes, log: o.log, minFreePercent: o.minFreePercent });
  await pool.open();
  if (saved === undefined) await writeFileAtomic(choiceFile, JSON.stringify({ driver }) + "\n");
  return pool;
}
