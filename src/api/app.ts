import { Hono, type Context } from "hono";
import * as v from "valibot";
import { InvalidRequestError, errorMessage } from "../errors.js";
import type { Logger } from "../log.js";
import type { VolumeInfo, VolumeService, VolumeSummary } from "../volumes/types.js";

const Name = v.string("Name must be a string");
const NameOnly = v.object({ Name });
const CreateRequest = v.object({
  Name,
  Opts: v.optional(v.nullable(v.record(v.string(), v.string("every option value must be a string")))),
});
const MountRequest = v.object({ Name, ID: v.optional(v.string("ID must be a string"), "") });

/**
 * Docker sends plugin requests without a Content-Type header, so the body is
 * read as text: empty means `{}`, anything else must be a JSON object.
 */
async function readBody<S extends v.GenericSchema>(c: Context, schema: S): Promise<v.InferOutput<S>> {
  const text = await c.req.text();
  let json: unknown = {};
  if (text.trim() !== "") {
    try {
      json = JSON.parse(text);
    } catch (err) {
      throw new InvalidRequestError(`the request body is not JSON: ${errorMessage(err)}`);
    }
  }
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

/** The Docker VolumeDriver protocol over a VolumeService. Routes stay thin; errors become `{Err}` in one place. */
export function createApp(service: VolumeService, log: Logger): Hono {
  const app = new Hono();

  /** `seen.volume` is set as soon as the request names one, so failures are logged with it too. */
  const route = (method: string, handler: (c: Context, seen: { volume?: string }) => Promise<object>) => {
    app.post(`/${method}`, async (c) => {
      const started = performance.now();
      const seen: { volume?: string } = {};
      try {
        const reply = await handler(c, seen);
        log.info("request", { method, volume: seen.volume, outcome: "ok", ms: Math.round(performance.now() - started) });
        return c.json(reply);
      } catch (err) {
        const message = errorMessage(err);
        log.info("request", { method, volume: seen.volume, outcome: "error", ms: Math.round(performance.now() - started), error: message });
        return c.json({ Err: message }, 500);
      }
    });
  };

  route("Plugin.Activate", async () => ({ Implements: ["VolumeDriver"] }));
  route("VolumeDriver.Capabilities", async () => ({ Capabilities: { Scope: "local" } }));

  route("VolumeDriver.Create", async (c, seen) => {
    const req = await readBody(c, CreateRequest);
    seen.volume = req.Name;
    await service.create(req.Name, req.Opts ?? null);
    return {};
  });
  route("VolumeDriver.Remove", async (c, seen) => {
    const req = await readBody(c, NameOnly);
    seen.volume = req.Name;
    await service.remove(req.Name);
    return {};
  });
  route("VolumeDriver.Mount", async (c, seen) => {
    const req = await readBody(c, MountRequest);
    seen.volume = req.Name;
    const mountpoint = await service.mount(req.Name, req.ID);
    return { Mountpoint: mountpoint };
  });
  route("VolumeDriver.Unmount", async (c, seen) => {
    const req = await readBody(c, MountRequest);
    seen.volume = req.Name;
    await service.unmount(req.Name, req.ID);
    return {};
  });
  route("VolumeDriver.Path", async (c, seen) => {
    const req = await readBody(c, NameOnly);
    seen.volume = req.Name;
    const mountpoint = await service.path(req.Name);
    return mountpoint === undefined ? {} : { Mountpoint: mountpoint };
  });
  route("VolumeDriver.Get", async (c, seen) => {
    const req = await readBody(c, NameOnly);
    seen.volume = req.Name;
    return { Volume: volumeJson(await service.get(req.Name)) };
  });
  route("VolumeDriver.List", async () => ({ Volumes: (await service.list()).map(volumeJson) }));

  app.notFound((c) => c.json({ Err: `thinvol does not implement ${c.req.method} ${c.req.path}` }, 404));
  return app;
}
