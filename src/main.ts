import { randomBytes } from "node:crypto";
import type { Server } from "node:http";
import { join } from "node:path";
import { createAdminApp } from "./api/admin.js";
import { createApp } from "./api/app.js";
import { loadLeaseOwner } from "./backup/lease.js";
import { s3SettingsFromEnv, type S3Settings } from "./backup/s3-settings.js";
import { openStore } from "./backup/store.js";
import { BackupTargets } from "./backup/targets.js";
import { InvalidRequestError, StateDirTakenError, StateFormatError, ThinvolError, errorMessage } from "./errors.js";
import { createLogger } from "./log.js";
import { RequestMetrics } from "./metrics.js";
import { selectPool } from "./pool/select.js";
import type { Pool } from "./pool/types.js";
import { closeServer, listenOnSocket } from "./server.js";
import { SettingsError, loadSettings } from "./settings.js";
import { checkStateFormat } from "./state-format.js";
import { claimStateDir } from "./system/flock.js";
import { ExecaRunner } from "./system/runner.js";
import { DeferredVolumeService } from "./volumes/deferred.js";
import { BackupService } from "./volumes/backups.js";
import { VolumeManager } from "./volumes/manager.js";
import { RecordStore } from "./volumes/records.js";
import { VERSION } from "./version.js";

/** The admin API's socket, in STATE_DIR: the host reaches it through the state mount. */
const ADMIN_SOCKET = "admin.sock";

async function main(): Promise<void> {
  let settings;
  let s3: S3Settings;
  try {
    settings = loadSettings();
    s3 = s3SettingsFromEnv(process.env);
  } catch (err) {
    if (err instanceof SettingsError || err instanceof InvalidRequestError) {
      process.stderr.write(`thinvol: ${err.message}\n`);
      process.exit(2);
    }
    throw err;
  }
  const log = createLogger(settings.LOG_LEVEL);
  const runner = new ExecaRunner();
  const service = new DeferredVolumeService();
  const metrics = new RequestMetrics();

  // Docker gives a plugin about 9 s to open its socket: bind first, recover after.
  const server = await listenOnSocket(createApp(service, log, metrics), settings.SOCKET_PATH);
  log.info("listening", { version: VERSION, socket: settings.SOCKET_PATH });
  let admin: Server | undefined;

  let pool: Pool | undefined;
  let stopping = false;
  const stop = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    log.info("stopping: finishing requests in flight; volumes stay as they are", { signal });
    await Promise.all([closeServer(server), admin && closeServer(admin)]);
    try {
      await pool?.close();
    } catch (err) {
      log.warn("could not release the pool", { error: errorMessage(err) });
    }
    log.info("stopped");
    process.exit(0);
  };
  process.on("SIGTERM", () => void stop("SIGTERM"));
  process.on("SIGINT", () => void stop("SIGINT"));

  try {
    const started = performance.now();
    // Before anything touches the pool: two instances on one STATE_DIR would corrupt it.
    await claimStateDir(runner, settings.STATE_DIR);
    // Before anything reads the pool: a newer version's state is left alone (a downgrade too far).
    await checkStateFormat(settings.STATE_DIR, VERSION);
    // The admin API, for the thinvol command on the host (root only; Docker never calls it).
    // Bound only once STATE_DIR is this process's, so a second instance cannot take it over.
    const adminSocket = join(settings.STATE_DIR, ADMIN_SOCKET);
    admin = await listenOnSocket(createAdminApp(() => service.admin(), log, metrics, () => service.backups()), adminSocket, 0o600);
    log.info("admin API listening", { socket: adminSocket });
    pool = await selectPool({
      runner,
      stateDir: settings.STATE_DIR,
      setting: settings.POOL_DRIVER,
      dataSizeBytes: settings.POOL_SIZE,
      dataDevice: settings.POOL_DEVICE,
      minFreePercent: settings.MIN_FREE_SPACE,
      log,
    });
    const targets = new BackupTargets({ backupsDir: settings.BACKUPS_DIR, backupsSource: settings.BACKUPS_SOURCE, openOther: (url) => openStore(url, { s3 }) });
    const records = new RecordStore(join(settings.STATE_DIR, "volumes"));
    await records.init();
    const manager = new VolumeManager({
      pool,
      records,
      runner,
      log,
      mountDir: settings.MOUNT_DIR,
      defaultSizeBytes: settings.DEFAULT_SIZE,
      defaultFs: settings.DEFAULT_FS,
      minFreePercent: settings.MIN_FREE_SPACE,
      openBackupTarget: (url) => targets.open(url),
    });
    await manager.recover();
    const holder = { owner: await loadLeaseOwner(join(settings.STATE_DIR, "backup-lease-owner")), instance: randomBytes(8).toString("hex") };
    service.serve(manager, new BackupService({ manager, pool, log, openTarget: (url) => targets.open(url), holder, targetsFile: join(settings.STATE_DIR, "backup-targets.json") }));
    log.info("ready", {
      driver: pool.driver,
      stateDir: settings.STATE_DIR,
      mountDir: settings.MOUNT_DIR,
      ms: Math.round(performance.now() - started),
      processes: runner.started,
    });
  } catch (err) {
    // Keep serving so that Docker shows the reason on every call instead of a dead socket.
    const reason =
      err instanceof StateDirTakenError || err instanceof StateFormatError ? err : new ThinvolError(`thinvol could not start its pool: ${errorMessage(err)}`, { cause: err });
    log.error("start-up failed", { error: errorMessage(err) });
    service.fail(reason);
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`thinvol: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  process.exit(1);
});
