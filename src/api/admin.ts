import { Hono, type Context } from "hono";
import * as v from "valibot";
import { ConflictError, InvalidRequestError, NoSpaceError, NotFoundError, RequestTooLargeError, errorMessage, quote } from "../errors.js";
import type { Logger } from "../log.js";
import { renderMetrics, type RequestMetrics } from "../metrics.js";
import { parseSize } from "../size.js";
import { BACKUP_ID_PATTERN, MAX_SIZE, SnapshotNameSchema, VOLUME_NAME_PATTERN, VolumeNameSchema, checkName } from "../volumes/options.js";
import type { AdminService, BackupAdmin, Progress } from "../volumes/types.js";
import { parseBody, readBodyBytes } from "./app.js";

/** A size as a string with a unit ("20G") or a number of bytes. */
const Size = v.pipe(
  v.union([v.string(), v.number()], "size must be a size such as 20G, or a number of bytes"),
  v.rawTransform(({ dataset, addIssue, NEVER }) => {
    const bytes = typeof dataset.value === "number" ? dataset.value : parseSize(dataset.value);
    if (bytes === undefined || !Number.isSafeInteger(bytes) || bytes <= 0) {
      addIssue({ message: `size ${quote(String(dataset.value))} is not a size: use a number with an optional unit, such as 20G or 1T` });
      return NEVER;
    }
    return bytes;
  }),
  v.maxValue(MAX_SIZE, "size must be at most 64 TiB"),
);

/** Every body is an object with exactly the fields a route reads: a misspelt field is refused, not ignored. */
const body = <E extends v.ObjectEntries>(entries: E) =>
  v.strictObject(entries, (i) =>
    i.expected?.startsWith('"') ? `the request has no ${i.expected.slice(1, -1)}` : i.expected === "never" ? `unknown field ${quote(String(i.input ?? ""))}` : "the request must be a JSON object",
  );
const SizeBody = body({ size: Size });
const SnapshotBody = body({ name: SnapshotNameSchema });
const RollbackBody = body({ snapshot: SnapshotNameSchema });
/** A backup target's URL: checked in full where it is opened (BackupTargets), here only for its size. */
const Target = v.pipe(v.string("a backup target must be a URL string"), v.minLength(1, "a backup target is needed: file:///path or s3://bucket/prefix"), v.maxLength(1024, "a backup target is at most 1024 characters"));
const BackupId = v.pipe(v.string("a backup id must be a string"), v.regex(BACKUP_ID_PATTERN, (i) => `${quote(String(i.input))} is not a backup id (thinvol backup ls shows them)`));
const BackupBody = body({ to: Target });
const VerifyBody = body({ to: v.optional(Target) });
const RestoreBody = body({ from: Target, id: BackupId, volume: VolumeNameSchema });

const KINDS = [
  [RequestTooLargeError, "invalid", 413],
  [InvalidRequestError, "invalid", 400],
  [NotFoundError, "not-found", 404],
  [ConflictError, "conflict", 409],
  [NoSpaceError, "no-space", 507],
] as const;

function kindOf(err: unknown): { kind: string; status: 400 | 404 | 409 | 413 | 500 | 507 } {
  for (const [type, kind, status] of KINDS) if (err instanceof type) return { kind, status };
  return { kind: "error", status: 500 };
}

/** The body, read under the size limit and decoded as Docker's routes decode theirs. */
async function readJson<S extends v.GenericSchema>(c: Context, schema: S): Promise<v.InferOutput<S>> {
  return parseBody(await readBodyBytes(c), schema);
}

/** The `to` query parameter: the backup target. */
function targetQuery(c: Context): string {
  return checkName(Target, c.req.query("to") ?? "");
}

function backupIdParam(c: Context): string {
  return checkName(BackupId, c.req.param("id") ?? "");
}

/** A path segment that must be a name; checked before anything runs. */
function nameParam(c: Context, key: string, schema: typeof VolumeNameSchema): string {
  return checkName(schema, c.req.param(key) ?? "");
}

const NDJSON = "application/x-ndjson";

/**
 * The admin API (docs/admin-api.md) over the volume layer: the same validation, locks and
 * journal as Docker's routes, because it calls the same VolumeManager. Errors become
 * `{error, kind}` with a status in one place; a client that accepts ndjson gets progress.
 */
export function createAdminApp(service: () => Promise<AdminService>, log: Logger, metrics: RequestMetrics, backupService?: () => Promise<BackupAdmin>): Hono {
  const app = new Hono();
  const backups = backupService ?? (() => Promise.reject(new NotFoundError("this server offers no backups")));

  const handle = routeOn(service);
  const handleBackup = routeOn(backups);
  /** A route's handler over one service: logging, metrics, errors as `{error, kind}`, ndjson when asked. */
  function routeOn<S>(get: () => Promise<S>) {
    return (method: string, work: (c: Context, s: S, progress: Progress, seen: { volume?: string }) => Promise<unknown>) => async (c: Context) => {
      const started = performance.now();
      const seen: { volume?: string } = {};
      const raw = c.req.param("volume");
      if (raw !== undefined) seen.volume = VOLUME_NAME_PATTERN.test(raw) ? raw : quote(raw);
      const finish = (outcome: "ok" | "error", err?: unknown) => {
        const ms = performance.now() - started;
        metrics.observe("admin", method, outcome, ms / 1000);
        log.info("request", { api: "admin", method, volume: seen.volume, outcome, ms: Math.round(ms), ...(err === undefined ? {} : { error: errorMessage(err) }) });
      };
      if ((c.req.header("accept") ?? "").includes(NDJSON)) return streamed(c, get, work, seen, finish);
      try {
        const reply = await work(c, await get(), () => undefined, seen);
        finish("ok");
        return typeof reply === "string" ? c.text(reply, 200, { "Content-Type": "text/plain; version=0.0.4; charset=utf-8" }) : c.json(reply ?? {});
      } catch (err) {
        finish("error", err);
        const { kind, status } = kindOf(err);
        return c.json({ error: errorMessage(err), kind }, status);
      }
    };
  }

  app.get("/v1/volumes", handle("volumes", async (_c, s) => ({ volumes: await s.volumes() })));
  app.get("/v1/volumes/:volume", handle("volume", async (c, s) => s.volume(nameParam(c, "volume", VolumeNameSchema))));
  app.get("/v1/pool", handle("pool", async (_c, s) => s.pool()));
  app.post(
    "/v1/pool/grow",
    handle("pool.grow", async (c, s, progress) => s.growPool((await readJson(c, SizeBody)).size, progress)),
  );
  app.post(
    "/v1/volumes/:volume/resize",
    handle("resize", async (c, s, progress) => {
      const name = nameParam(c, "volume", VolumeNameSchema);
      return s.resize(name, (await readJson(c, SizeBody)).size, progress);
    }),
  );
  app.get(
    "/v1/snapshots",
    handle("snapshot.ls", async (c, s) => {
      const volume = c.req.query("volume");
      if (volume !== undefined) checkName(VolumeNameSchema, volume);
      return { snapshots: await s.snapshots(volume) };
    }),
  );
  app.post(
    "/v1/volumes/:volume/snapshots",
    handle("snapshot.create", async (c, s, progress) => {
      const name = nameParam(c, "volume", VolumeNameSchema);
      return s.createSnapshot(name, (await readJson(c, SnapshotBody)).name, progress);
    }),
  );
  app.delete(
    "/v1/volumes/:volume/snapshots/:snapshot",
    handle("snapshot.rm", async (c, s, progress) => {
      await s.removeSnapshot(nameParam(c, "volume", VolumeNameSchema), nameParam(c, "snapshot", SnapshotNameSchema), progress);
      return {};
    }),
  );
  app.post(
    "/v1/volumes/:volume/rollback",
    handle("rollback", async (c, s, progress) => {
      const name = nameParam(c, "volume", VolumeNameSchema);
      return s.rollback(name, (await readJson(c, RollbackBody)).snapshot, progress);
    }),
  );
  app.post(
    "/v1/volumes/:volume/backups",
    handleBackup("backup.create", async (c, b, progress) => {
      const name = nameParam(c, "volume", VolumeNameSchema);
      return b.createBackup(name, (await readJson(c, BackupBody)).to, progress);
    }),
  );
  app.get(
    "/v1/backups",
    handleBackup("backup.ls", async (c, b) => {
      const to = targetQuery(c);
      const volume = c.req.query("volume");
      return { backups: await b.backups(to, volume === undefined ? undefined : checkName(VolumeNameSchema, volume)) };
    }),
  );
  app.delete(
    "/v1/backups/:id",
    handleBackup("backup.rm", async (c, b) => b.removeBackup(c.req.query("to") === undefined ? undefined : targetQuery(c), backupIdParam(c))),
  );
  app.post(
    "/v1/backups/:id/verify",
    handleBackup("backup.verify", async (c, b) => b.verifyBackup((await readJson(c, VerifyBody)).to, backupIdParam(c))),
  );
  app.post(
    "/v1/restore",
    handleBackup("restore", async (c, b, progress, seen) => {
      const r = await readJson(c, RestoreBody);
      seen.volume = r.volume;
      return b.restore(r.from, r.id, r.volume, progress);
    }),
  );
  app.get(
    "/metrics",
    handle("metrics", async (_c, s) => {
      const [pool, volumes, snapshots] = await Promise.all([s.pool(), s.volumes(), s.snapshots()]);
      return renderMetrics(pool, volumes, snapshots, metrics);
    }),
  );

  app.notFound((c) => {
    const error = `the thinvol admin API has no ${c.req.method} ${quote(c.req.path)} (see docs/admin-api.md)`;
    log.info("request", { api: "admin", path: quote(c.req.path), outcome: "error", error });
    return c.json({ error, kind: "not-found" }, 404);
  });
  return app;
}

/** The reply as ndjson: progress lines while the work runs, then its result or its error. */
function streamed<S>(
  c: Context,
  service: () => Promise<S>,
  work: (c: Context, s: S, progress: Progress, seen: { volume?: string }) => Promise<unknown>,
  seen: { volume?: string },
  finish: (outcome: "ok" | "error", err?: unknown) => void,
): Response {
  const encoder = new TextEncoder();
  const stream = new ReadableStream<Uint8Array>({
    async start(controller) {
      let open = true;
      const send = (event: object) => {
        if (!open) return;
        try {
          controller.enqueue(encoder.encode(JSON.stringify(event) + "\n"));
        } catch {
          open = false; // The client went away; the work goes on to its end.
        }
      };
      try {
        const result = await work(c, await service(), (message) => send({ event: "progress", message }), seen);
        finish("ok");
        send({ event: "result", result: result ?? {} });
      } catch (err) {
        finish("error", err);
        send({ event: "error", error: errorMessage(err), kind: kindOf(err).kind });
      }
      if (open) controller.close();
    },
  });
  return new Response(stream, { status: 200, headers: { "Content-Type": NDJSON, "Cache-Control": "no-store" } });
}
