import { mkdir } from "node:fs/promises";
import { CommandError, ThinvolError, errorMessage } from "../../errors.js";
import { formatSize } from "../../size.js";
import { createDevice, deviceInfo, listDevices, makeNodes, parseThinPoolTable, removeDevice, resumeDevice, tableOf, thinPoolStatus } from "../../system/dmsetup.js";
import { attachOrReuseLoop, detachLoop, loopsOf, refreshLoopSize } from "../../system/losetup.js";
import { checkThinMetadata } from "../../system/thin-tools.js";
import { headroomBytes } from "../host-space.js";
import { fileSize, growSparseFile, loopDeviceNumber, metadataIsBlank, metadataSizeFor } from "./backing.js";
import { releaseLeftMetadataSnapshot } from "./changes.js";
import type { Locked } from "./context.js";
import { checkBacking, deviceBusyError, deviceLength, findDataDevice, refuseUnlessEmpty, type DataDevice } from "./device.js";
import { foreignDevice, occupant, resumeLeftSuspended } from "./devices.js";
import { FEATURES, adoptSparseData, allocateOrFail, growLocked, initialLength, poolTable, reloadPool } from "./growth.js";
import { settlePending } from "./journal.js";
import { removeIdleReaders, removeLeftoverReaders } from "./readers.js";
import { loadState, saveState, stateFile, type PoolState } from "./state.js";

/** No volume was ever made: the pool may still be (re)made from nothing. */
const isFresh = (state: PoolState): boolean => state.transactionId === 0 && state.volumes.size === 0 && state.pending === undefined;

/**
 * Sets the pool up from its files (or its data device), or finds it live after a restart:
 * reserves the files, attaches their loop devices, checks and loads the pool table, then
 * settles an interrupted operation and checks that the state file belongs to the metadata.
 */
export async function openPool(ctx: Locked): Promise<void> {
  const started = Date.now();
  await mkdir(ctx.dir, { recursive: true, mode: 0o700 });
  // Everything about the device is checked before anything is written.
  const device = ctx.onDevice ? await findDataDevice(ctx) : undefined;
  const loaded = await loadState(ctx.dir);
  if (loaded) await checkBacking(ctx, loaded, device);
  if (device && (!loaded || isFresh(loaded)) && (await metadataIsAbsentOrBlank(ctx.metaFile))) await refuseUnlessEmpty(ctx, device);
  const state = loaded ?? (await initState(ctx, device));
  if (state.blockSizeSectors !== ctx.wantBlockSize) {
    ctx.log.warn("dm-thin pool keeps the block size it was made with", { pool: ctx.poolName, blockSizeSectors: state.blockSizeSectors, asked: ctx.wantBlockSize });
  }
  const blockBytes = state.blockSizeSectors * 512;
  ctx.blockBytes = blockBytes;
  const fresh = isFresh(state);
  if (!fresh) {
    for (const file of ctx.backingFiles) {
      if ((await fileSize(file)) === undefined) {
        throw new ThinvolError(`dm-thin pool file ${file} is missing, but ${stateFile(ctx.dir)} says the pool holds volumes; restore the file or move the directory aside to start an empty pool`);
      }
    }
  }

  let poolMax = device ? deviceLength(ctx, state, device) : Math.floor(ctx.wantDataBytes / blockBytes) * blockBytes;
  if (!device && state.maxDataBytes !== undefined && poolMax < state.maxDataBytes) {
    ctx.log.warn("POOL_SIZE is smaller than the size the pool was grown to at run time; keeping that (a pool never shrinks)", {
      pool: ctx.poolName,
      size: formatSize(state.maxDataBytes),
      asked: formatSize(poolMax),
    });
    poolMax = state.maxDataBytes;
  }
  if (poolMax < state.dataSizeBytes) {
    ctx.log.warn("dm-thin pool cannot shrink; keeping its size", { pool: ctx.poolName, size: formatSize(state.dataSizeBytes), asked: formatSize(poolMax) });
    poolMax = state.dataSizeBytes;
  }

  // Metadata is sized for the whole pool at once and fully allocated: it is small.
  const metaBytes = Math.max(state.metaSizeBytes, metadataSizeFor(poolMax, state.blockSizeSectors));
  await allocateOrFail(ctx, ctx.metaFile, metaBytes, "metadata");
  let lengthBytes = state.dataSizeBytes;
  if (device) {
    lengthBytes = poolMax;
  } else if (lengthBytes === 0) {
    lengthBytes = await initialLength(ctx, poolMax, blockBytes);
    await allocateOrFail(ctx, ctx.dataFile, lengthBytes, "data");
  } else {
    await growSparseFile(ctx.dataFile, lengthBytes);
    await adoptSparseData(ctx, lengthBytes);
  }

  const live = await attachLoops(ctx, state, device);
  const liveLength = live?.lengthBytes ?? 0;

  // Never shorter than the live pool (a grow the state file missed).
  lengthBytes = Math.max(lengthBytes, liveLength);
  poolMax = Math.max(poolMax, lengthBytes);
  ctx.poolMaxBytes = poolMax;
  ctx.headroom = headroomBytes(poolMax, blockBytes);
  const metaGrew = metaBytes > state.metaSizeBytes;
  const table = poolTable(ctx, lengthBytes);

  if (live) {
    // A pool made by an earlier version also gets this version's features and low-water mark.
    const settingsDiffer = live.settings !== `${ctx.headroom / blockBytes} ${FEATURES.join(" ")}`;
    if (lengthBytes > liveLength || metaGrew || settingsDiffer) {
      // The loop devices may predate the growth (or a crash interrupted it).
      if (!device) await refreshLoopSize(ctx.runner, ctx.dataDevice);
      await refreshLoopSize(ctx.runner, ctx.metaLoop);
      await reloadPool(ctx, table);
    }
  } else {
    await createPoolDevice(ctx, state, fresh, table);
  }
  await makeNodes(ctx.runner, ctx.poolName);
  const dev = await deviceInfo(ctx.runner, ctx.poolName);
  if (!dev) throw new ThinvolError(`dm-thin pool ${ctx.poolName} vanished right after it was set up`);
  ctx.poolDevice = `${dev.major}:${dev.minor}`;

  if (lengthBytes !== state.dataSizeBytes || metaBytes !== state.metaSizeBytes) {
    const before = state.dataSizeBytes;
    state.dataSizeBytes = lengthBytes;
    state.metaSizeBytes = metaBytes;
    await saveState(ctx.dir, state);
    if (before > 0) ctx.log.info("dm-thin pool grown", { pool: ctx.poolName, size: formatSize(lengthBytes), metadata: formatSize(metaBytes) });
  }
  ctx.state = state;
  try {
    // Before settling: a reader left on a snapshot would keep an interrupted removal's delete busy.
    await removeLeftoverReaders(ctx);
    await settlePending(ctx);
    const status = await thinPoolStatus(ctx.runner, ctx.poolName);
    if (status.transactionId !== state.transactionId) {
      throw new ThinvolError(
        `dm-thin pool ${ctx.poolName} is at transaction ${status.transactionId} but ${stateFile(ctx.dir)} records ${state.transactionId}: ` +
          `the state file does not belong to this metadata (restored from a backup?). Refusing to guess which volumes exist`,
      );
    }
    if (status.needsCheck) ctx.log.warn("dm-thin pool metadata is flagged needs_check; run thin_check on it while the pool is down", { pool: ctx.poolName });
    if (status.metadataSnapHeld) await releaseLeftMetadataSnapshot(ctx);
    await resumeLeftSuspended(ctx);
    await growLocked(ctx);
  } catch (err) {
    ctx.state = undefined;
    throw err;
  }
  const hostFree = await ctx.host.freeBytes(ctx.dir);
  ctx.log.info("dm-thin pool open", {
    pool: ctx.poolName,
    volumes: state.volumes.size,
    reused: live !== undefined,
    transaction: state.transactionId,
    data: device?.path ?? ctx.dataFile,
    reserved: formatSize(state.dataSizeBytes),
    size: formatSize(poolMax),
    hostFree: formatSize(hostFree),
    ms: Date.now() - started,
  });
}

/** The pool device as it was found live: its length and its low-water mark and features, as one string. */
interface LivePool {
  lengthBytes: number;
  settings: string;
}

/**
 * Attaches (or finds) the loop devices of the pool's files and records them in the context;
 * a data device is used as it is. When the pool device is already live, uses the loop
 * devices it uses, and stops if it is not this directory's pool.
 */
async function attachLoops(ctx: Locked, state: PoolState, device: DataDevice | undefined): Promise<LivePool | undefined> {
  let dataDev = device?.path ?? (await attachOrReuseLoop(ctx.runner, ctx.dataFile, ctx.log));
  let metaLoop = await attachOrReuseLoop(ctx.runner, ctx.metaFile, ctx.log);
  let dataNo = device?.number ?? (await loopDeviceNumber(ctx.runner, dataDev));
  let metaNo = await loopDeviceNumber(ctx.runner, metaLoop);

  const live = (await listDevices(ctx.runner)).get(ctx.poolName);
  let found: LivePool | undefined;
  if (live) {
    // Left suspended by a crash during a grow: resuming makes a loaded larger table live.
    if (live.suspended) await resumeDevice(ctx.runner, ctx.poolName);
    const table = parseThinPoolTable(ctx.poolName, await tableOf(ctx.runner, ctx.poolName));
    // A file can have more than one loop device; use the ones the live pool uses.
    if (!device && table.dataDevice !== dataNo) [dataDev, dataNo] = await loopOfFileNumbered(ctx, ctx.dataFile, table.dataDevice, [dataDev, dataNo]);
    if (table.metaDevice !== metaNo) [metaLoop, metaNo] = await loopOfFileNumbered(ctx, ctx.metaFile, table.metaDevice, [metaLoop, metaNo]);
    if (table.dataDevice !== dataNo || table.metaDevice !== metaNo || table.blockSizeSectors !== state.blockSizeSectors) {
      throw new ThinvolError(
        `device ${ctx.poolName} is active but is not the pool in ${ctx.dir}: it uses data ${table.dataDevice}, metadata ${table.metaDevice}, ` +
          `block size ${table.blockSizeSectors}; expected ${dataDev} (${dataNo}), ${metaLoop} (${metaNo}), block size ${state.blockSizeSectors}. ` +
          `Another pool has this name: set a different pool name or remove that device`,
      );
    }
    found = { lengthBytes: table.lengthSectors * 512, settings: `${table.lowWaterBlocks} ${table.features.join(" ")}` };
  }
  ctx.dataDevice = dataDev;
  ctx.metaLoop = metaLoop;
  return found;
}

/** The loop device of `file` whose number is `devno`, or `fallback`. */
async function loopOfFileNumbered(ctx: Locked, file: string, devno: string, fallback: [string, string]): Promise<[string, string]> {
  for (const dev of await loopsOf(ctx.runner, file)) {
    if ((await loopDeviceNumber(ctx.runner, dev)) === devno) return [dev, devno];
  }
  return fallback;
}

/** Creates the pool device from its files, after making sure that metadata is not lost or damaged. */
async function createPoolDevice(ctx: Locked, state: PoolState, fresh: boolean, table: string): Promise<void> {
  if (await metadataIsBlank(ctx.metaFile)) {
    if (!fresh) {
      throw new ThinvolError(
        `dm-thin metadata ${ctx.metaFile} is blank, but ${stateFile(ctx.dir)} says the pool holds volumes (transaction ${state.transactionId}); ` +
          `creating the pool now would lose them. Restore the metadata file, or move the directory aside to start an empty pool`,
      );
    }
  } else {
    await checkMetadata(ctx, ctx.metaLoop);
  }
  try {
    await createDevice(ctx.runner, ctx.poolName, table);
  } catch (err) {
    const data = ctx.onDevice ? ctx.dataDevice : ctx.dataFile;
    throw deviceBusyError(ctx, err) ?? new ThinvolError(`cannot create dm-thin pool ${ctx.poolName} from ${data} and ${ctx.metaFile}: ${errorMessage(err)}`, { cause: err });
  }
}

async function metadataIsAbsentOrBlank(metaFile: string): Promise<boolean> {
  return (await fileSize(metaFile)) === undefined || (await metadataIsBlank(metaFile));
}

async function initState(ctx: Locked, device: DataDevice | undefined): Promise<PoolState> {
  if (!(await metadataIsAbsentOrBlank(ctx.metaFile))) {
    throw new ThinvolError(
      `found dm-thin metadata ${ctx.metaFile} but no state file ${stateFile(ctx.dir)}: refusing to reuse a pool whose volumes are unknown; restore the state file or move the directory aside`,
    );
  }
  // Sizes start at 0, so openPool() makes the files as if growing the pool.
  const state: PoolState = {
    blockSizeSectors: ctx.wantBlockSize,
    dataSizeBytes: 0,
    metaSizeBytes: 0,
    transactionId: 0,
    nextId: 1,
    volumes: new Map(),
    snapshots: new Map(),
    pending: undefined,
    dataDevice: device ? { setting: device.setting, path: device.path, sizeBytes: device.sizeBytes, ids: device.ids } : undefined,
    maxDataBytes: undefined,
  };
  if (device && device.ids.length === 0) {
    ctx.log.warn("POOL_DEVICE has no /dev/disk/by-id name: should kernel names move between boots, only its size would tell it from another disk", {
      pool: ctx.poolName,
      device: device.path,
    });
  }
  await saveState(ctx.dir, state);
  ctx.log.info("dm-thin pool state created", { pool: ctx.poolName, dir: ctx.dir, blockSizeSectors: ctx.wantBlockSize });
  return state;
}

async function checkMetadata(ctx: Locked, metaLoop: string): Promise<void> {
  try {
    await checkThinMetadata(ctx.runner, metaLoop);
  } catch (err) {
    if (err instanceof CommandError && err.exitCode === undefined && /ENOENT/.test(err.message)) {
      ctx.log.warn("thin_check is not installed; starting the pool without checking its metadata", { pool: ctx.poolName });
      return;
    }
    const report = err instanceof CommandError ? (err.stderr || err.message).trim() : errorMessage(err);
    throw new ThinvolError(
      `dm-thin metadata ${ctx.metaFile} (on ${metaLoop}) failed thin_check, so pool ${ctx.poolName} was not started: ${report}. ` +
        `Repair it with thin_repair (keep a copy of the file first)`,
      { cause: err },
    );
  }
}

/**
 * Forgets the open pool and takes it down unless a volume is active. An idle pool is taken
 * down, so a disabled or removed plugin leaves no device on the host; the next open() sets
 * it up again from its files. Active volumes keep it up; a device that only has a volume's
 * name is not one of them.
 */
export async function closePool(ctx: Locked): Promise<void> {
  const state = ctx.state;
  if (!state) return;
  const active: string[] = [];
  for (const [name, vol] of state.volumes) {
    const o = await occupant(ctx, name, vol);
    if (o.kind === "ours") active.push(name);
    else if (o.kind === "foreign") ctx.log.warn("a device with a volume's name is not that volume; left untouched", { volume: name, error: foreignDevice(ctx, name, vol, o.table).message });
  }
  // Snapshot readers hold the pool open too: idle ones go, open ones keep it up.
  const reading = await removeIdleReaders(ctx);
  ctx.state = undefined;
  ctx.poolDevice = "";
  if (active.length > 0 || reading.length > 0) {
    ctx.log.info("dm-thin pool left up: volumes are active or snapshots are being read", { pool: ctx.poolName, active: active.length, readers: reading.length });
    return;
  }
  if (await deviceInfo(ctx.runner, ctx.poolName)) await removeDevice(ctx.runner, ctx.poolName);
  // A data device is not ours to detach: only the files' loop devices are.
  for (const file of ctx.backingFiles) {
    for (const dev of await loopsOf(ctx.runner, file)) await detachLoop(ctx.runner, dev);
  }
  ctx.log.info("dm-thin pool taken down: no volume is active", { pool: ctx.poolName });
}
