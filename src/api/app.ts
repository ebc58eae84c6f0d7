import { Hono, type Context } from "hono";
import * as v from "valibot";
import { InvalidRequestError, RequestTooLargeError, errorMessage, escapeUnprintable, quote } from "../errors.js";
import type { Logger } from "../log.js";
import type { RequestMetrics } from "../metrics.js";
import { VOLUME_NAME_PATTERN, VolumeNameSchema, parseCreateOptions } from "../volumes/options.js";
import type { VolumeInfo, VolumeService, VolumeSummary } from "../volumes/types.js";

/** Docker's requests are a few hundred bytes; a body near this size is not from Docker. */
export const MAX_BODY_BYTES = 1024 * 1024;
/** Docker's mount IDs are 64 hex characters; other callers get room up to this. */
export const MAX_MOUNT_ID_CHARS = 256;

/** valibot reports a missing field as an invalid key; say which field is missing instead. */
const request = <E extends v.ObjectEntries>(entries: E) =>
  v.object(entries, (i) => (i.expected?.startsWith('"') ? `the request has no ${i.expected.slice(1, -1)}` : "the request must be a JSON object"));

const Name = v.pipe(v.string("Name must be a string"), VolumeNameSchema);
const NameOnly = request({ Name });

const isJsonObject = (x: unknown): x is Record<string, unknown> => typeof x === "object" && x !== null && !Array.isArray(x);

/**
 * Copied by own keys into an object without a prototype: valibot's record drops
 * `__proto__` and `constructor`, and an option nobody reads must be refused, not lost.
 */
const Opts = v.nullish(
  v.pipe(
    v.custom<Record<string, unknown>>(isJsonObject, "Opts must be an object of option names and string values"),
    v.rawTransform(({ dataset, addIssue, NEVER }) => {
      const opts: Record<string, string> = Object.create(null) as Record<string, string>;
      const notStrings: string[] = [];
      for (const [key, value] of Object.entries(dataset.value)) {
        if (typeof value === "string") opts[key] = value;
        else notStrings.push(key);
      }
      if (notStrings.length === 0) return opts;
      addIssue({ message: `the value of option ${quote(notStrings[0] ?? "")} must be a string` });
      return NEVER;
    }),
  ),
);
const CreateRequest = request({ Name, Opts });

/** Callers older than Docker 1.12 send no ID: they share one reference, "". */
const MountId = v.optional(
  v.pipe(
    v.string("ID must be a string: Docker sends the mount ID of the caller"),
    v.maxLength(MAX_MOUNT_ID_CHARS, (i) => `ID is ${i.input.length} characters long; the most is ${MAX_MOUNT_ID_CHARS}`),
    v.regex(/^[^\u0000-\u001f\u007f]*$/, (i) => `ID ${quote(i.input)} must not contain control characters`),
  ),
  "",
);
const MountRequest = request({ Name, ID: MountId });

const tooLarge = (what: string) =>
  new RequestTooLargeError(`the request body is ${what}, over thinvol's limit of ${MAX_BODY_BYTES} bytes (1 MiB); Docker's requests are far smaller`);

/**
 * Reads the body, refusing it as soon as it passes the limit: a Content-Length over
 * it before a byte is read, a chunked body at the chunk that crosses it. Nothing is
 * buffered past the limit; the server drains or drops the rest after the reply.
 */
export async function readBodyBytes(c: Context): Promise<Uint8Array> {
  const declared = Number(c.req.header("content-length"));
  if (declared > MAX_BODY_BYTES) throw tooLarge(`${declared} bytes`);
  const body = c.req.raw.body;
  if (body === null) return new Uint8Array(0);
  const reader = body.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      size += value.byteLength;
      if (size > MAX_BODY_BYTES) throw tooLarge(`more than ${MAX_BODY_BYTES} bytes`);
      chunks.push(value);
    }
  } finally {
    reader.releaseLock();
  }
  return Buffer.concat(chunks);
}

/**
 * Docker sends plugin requests without a Content-Type header, so the body is
 * decoded here: UTF-8 (strictly), empty means `{}`, anything else must be a
 * JSON object. The volume is noted in `seen` before validation, so a refusal is
 * logged with it.
 */
export function parseBody<S extends v.GenericSchema>(bytes: Uint8Array, schema: S, seen: Seen = {}): v.InferOutput<S> {
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    throw new InvalidRequestError("the request body is not valid UTF-8");
  }
  let json: unknown = {};
  if (text.trim() !== "") {
    try {
      json = JSON.parse(text);
    } catch (err) {
      // V8 quotes a little of the input; escaped, so it cannot break a log line.
      throw new InvalidRequestError(`the request body is not JSON: ${escapeUnprintable(errorMessage(err).slice(0, 200))}`);
    }
  }
  if (!isJsonObject(json)) {
    throw new InvalidRequestError(`the request body must be a JSON object, not ${Array.isArray(json) ? "an array" : json === null ? "null" : `a ${typeof json}`}`);
  }
  const name = json["Name"];
  if (typeof name === "string") seen.volume = VOLUME_NAME_PATTERN.test(name) ? name : quote(name);
  const result = v.safeParse(schema, json);
  if (!result.success) throw new InvalidRequestError(`bad request: ${result.issues.map((i) => i.message).join("; ")}`);
  return result.output;
}

function volumeJson(volume: VolumeSummary | VolumeInfo): Record<string, unknown> {
  const out: Record<string, unknown> = { Name: volume.name, CreatedAt: volume.createdAt };
  if (volume.mountpoint !== undefined) out["Mountpoint"] = volume.mountpoint;
  if ("status" in volume) out["Status"] = volume.status;
  return out;
}

/** Set as soon as the request names a volume (quoted if the name is not valid), so failures are logged with it too. */
export interface Seen {
  volume?: string;
}

/** The one place an error becomes a status: 413 for a body over the limit, else the protocol's 500. */
const statusOf = (err: unknown) => (err instanceof RequestTooLargeError ? 413 : 500);

/** The Docker VolumeDriver protocol over a VolumeService. Routes stay thin; errors become `{Err}` in one place. */
export function createApp(service: VolumeService, log: Logger, metrics?: RequestMetrics): Hono {
  const app = new Hono();
  const methods = new Set<string>();

  /** Every body is read under the limit, even by methods that take no arguments. */
  const route = (method: string, handler: (body: Uint8Array, seen: Seen) => Promise<object>) => {
    methods.add(`/${method}`);
    app.post(`/${method}`, async (c) => {
      const started = performance.now();
      const seen: Seen = {};
      try {
        const reply = await handler(await readBodyBytes(c), seen);
        const ms = performance.now() - started;
        metrics?.observe("docker", method, "ok", ms / 1000);
        log.info("request", { method, volume: seen.volume, outcome: "ok", ms: Math.round(ms) });
        return c.json(reply);
      } catch (err) {
        const message = errorMessage(err);
        const ms = performance.now() - started;
        metrics?.observe("docker", method, "error", ms / 1000);
        log.info("request", { method, volume: seen.volume, outcome: "error", ms: Math.round(ms), error: message });
        return c.json({ Err: message }, statusOf(err));
      }
    });
  };

  route("Plugin.Activate", async () => ({ Implements: ["VolumeDriver"] }));
  route("VolumeDriver.Capabilities", async () => ({ Capabilities: { Scope: "local" } }));

  route("VolumeDriver.Create", async (body, seen) => {
    const req = parseBody(body, CreateRequest, seen);
    const opts = req.Opts ?? null;
    // Every option is checked here too, so the volume layer is only asked for what can be made.
    parseCreateOptions(req.Name, opts);
    await service.create(req.Name, opts);
    return {};
  });
  route("VolumeDriver.Remove", async (body, seen) => {
    const req = parseBody(body, NameOnly, seen);
    await service.remove(req.Name);
    return {};
  });
  route("VolumeDriver.Mount", async (body, seen) => {
    const req = parseBody(body, MountRequest, seen);
    return { Mountpoint: await service.mount(req.Name, req.ID) };
  });
  route("VolumeDriver.Unmount", async (body, seen) => {
    const req = parseBody(body, MountRequest, seen);
    await service.unmount(req.Name, req.ID);
    return {};
  });
  route("VolumeDriver.Path", async (body, seen) => {
    const req = parseBody(body, NameOnly, seen);
    const mountpoint = await service.path(req.Name);
    return mountpoint === undefined ? {} : { Mountpoint: mountpoint };
  });
  route("VolumeDriver.Get", async (body, seen) => {
    const req = parseBody(body, NameOnly, seen);
    return { Volume: volumeJson(await service.get(req.Name)) };
  });
  route("VolumeDriver.List", async () => ({ Volumes: (await service.list()).map(volumeJson) }));

  app.notFound((c) => {
    const path = quote(c.req.path);
    const [Err, status] = methods.has(c.req.path)
      ? [`${path} must be called with POST, not ${quote(c.req.method)}`, 405 as const]
      : [`thinvol does not implement ${path}`, 404 as const];
    log.info("request", { path, outcome: "error", error: Err });
    return c.json({ Err }, status);
  });
  return app;
}
