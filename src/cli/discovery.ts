import { posix } from "node:path";
import * as v from "valibot";
import { escapeUnprintable, quote } from "../errors.js";
import { SettingsError, loadSettings } from "../settings.js";
import type { AdminSocket } from "./client.js";
import { UnavailableError } from "./errors.js";
import { SocketError, readText, send } from "./http.js";

/**
 * Finds the admin socket of an installed plugin by asking the Docker engine: the
 * socket is `admin.sock` in the plugin's STATE_DIR, and STATE_DIR lies in a bind
 * mount whose source is a host directory.
 */

export const DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock";
export const ADMIN_SOCKET_NAME = "admin.sock";
const ENGINE_TIMEOUT_MS = 30_000;

/** The engine's socket from DOCKER_HOST. Only a local unix socket can lead to a file on this host. */
export function dockerSocketPath(dockerHost: string | undefined): string {
  const host = dockerHost === undefined || dockerHost.trim() === "" ? DEFAULT_DOCKER_HOST : dockerHost.trim();
  if (host.startsWith("unix://") && host.length > "unix://".length) return host.slice("unix://".length);
  throw new UnavailableError(
    `DOCKER_HOST=${quote(host)} is not a local unix socket: thinvol finds the admin socket on this host only; pass --socket PATH (the admin.sock in the plugin's STATE_DIR on the plugin's host)`,
  );
}

/** The engine stores plugins with a tag; a bare name means `:latest`, as `docker plugin` treats it. */
export function pluginReference(name: string): string {
  if (name.includes("@")) return name;
  const last = name.slice(name.lastIndexOf("/") + 1);
  return last.includes(":") ? name : `${name}:latest`;
}

const Mount = v.looseObject({ Source: v.nullish(v.string()), Destination: v.string() });
const EnvDefault = v.looseObject({ Name: v.string(), Value: v.nullish(v.string()) });

/** The parts of `GET /plugins/{name}/json` (the Engine API's Plugin object) this needs. */
const PluginReply = v.looseObject({
  Name: v.optional(v.string()),
  Enabled: v.boolean(),
  Settings: v.looseObject({
    Env: v.nullish(v.array(v.string())),
    Mounts: v.nullish(v.array(Mount)),
  }),
  Config: v.looseObject({
    Env: v.nullish(v.array(EnvDefault)),
    Mounts: v.nullish(v.array(Mount)),
  }),
});
type PluginInfo = v.InferOutput<typeof PluginReply>;

/** Asks the engine at `DOCKER_HOST` where plugin `name`'s admin socket is on this host. */
export async function discoverAdminSocket(name: string, env: Readonly<Record<string, string | undefined>>): Promise<AdminSocket> {
  const engine = dockerSocketPath(env["DOCKER_HOST"]);
  const ref = pluginReference(name);
  const info = await inspectPlugin(engine, ref);
  if (!info.Enabled) throw new UnavailableError(`plugin ${ref} is disabled: enable it with docker plugin enable ${ref}`);
  const stateDir = stateDirOf(info, ref);
  return { path: hostPathOf(info, stateDir, ref), plugin: ref };
}

async function inspectPlugin(engine: string, ref: string): Promise<PluginInfo> {
  const path = `/plugins/${ref}/json`;
  let status: number;
  let text: string;
  try {
    const res = await send(engine, { method: "GET", path, accept: "application/json", idleTimeoutMs: ENGINE_TIMEOUT_MS });
    status = res.statusCode ?? 0;
    text = await readText(res);
  } catch (err) {
    throw err instanceof SocketError ? engineError(engine, err) : err;
  }
  if (status === 404) {
    throw new UnavailableError(`plugin ${ref} is not installed (see docker plugin ls); pass --plugin NAME if it was installed under another name`);
  }
  const body = parseOrUndefined(text);
  if (status >= 400) {
    const message = v.is(v.object({ message: v.string() }), body) ? body.message : text.slice(0, 200);
    throw new UnavailableError(`the Docker engine at ${engine} refused GET ${path} (status ${status}): ${escapeUnprintable(message)}`);
  }
  const info = v.safeParse(PluginReply, body);
  if (!info.success) throw new UnavailableError(`the Docker engine at ${engine} gave an unexpected reply to GET ${path}: ${info.issues[0]?.message ?? "not a plugin"}`);
  return info.output;
}

function parseOrUndefined(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/**
 * STATE_DIR as the plugin's process sees it. The process gets Settings.Env (filled
 * from Config.Env's defaults at install, changed by `docker plugin set`); Config.Env
 * is the fallback for an engine that left Settings empty. An unset or empty value
 * means the server's own default, decided by the same code the server runs.
 */
function stateDirOf(info: PluginInfo, ref: string): string {
  const setting = (info.Settings.Env ?? []).findLast((e) => e.startsWith("STATE_DIR="))?.slice("STATE_DIR=".length);
  const fallback = (info.Config.Env ?? []).find((e) => e.Name === "STATE_DIR")?.Value ?? undefined;
  const value = setting ?? fallback;
  try {
    return loadSettings(value === undefined ? {} : { STATE_DIR: value }).STATE_DIR;
  } catch (err) {
    if (err instanceof SettingsError) throw new UnavailableError(`plugin ${ref} has a bad STATE_DIR, so it cannot be running: ${err.message}`, { cause: err });
    throw err;
  }
}

/**
 * The host path of STATE_DIR/admin.sock: through the bind mount whose destination
 * holds STATE_DIR (the deepest one if several do). Config.Mounts comes first because
 * it is what the engine binds when it starts the plugin, and what `docker plugin set
 * state.source=...` changes; Settings.Mounts is a copy made at install.
 */
function hostPathOf(info: PluginInfo, stateDir: string, ref: string): string {
  const target = posix.join(stateDir, ADMIN_SOCKET_NAME);
  for (const mounts of [info.Config.Mounts, info.Settings.Mounts]) {
    const mount = (mounts ?? [])
      .filter((m) => typeof m.Source === "string" && m.Source !== "" && isUnder(target, m.Destination))
      .sort((a, b) => posix.normalize(b.Destination).length - posix.normalize(a.Destination).length)[0];
    if (mount?.Source) return posix.join(mount.Source, posix.relative(posix.normalize(mount.Destination), target));
  }
  throw new UnavailableError(
    `plugin ${ref} keeps its STATE_DIR ${quote(stateDir)} in no mount, so its admin socket is not reachable from the host; pass --socket PATH`,
  );
}

function isUnder(path: string, dir: string): boolean {
  const d = posix.normalize(dir).replace(/\/+$/, "");
  return d === "" || path === d || path.startsWith(`${d}/`);
}

function engineError(engine: string, err: SocketError): UnavailableError {
  const at = `the Docker engine at unix://${engine}`;
  const hint = "or pass --socket PATH to use the plugin's admin socket directly";
  const options = { cause: err };
  switch (err.code) {
    case "ENOENT":
    case "ECONNREFUSED":
      return new UnavailableError(`cannot reach ${at}: ${err.code === "ENOENT" ? "no such socket" : "nothing is listening"}; is Docker running? (set DOCKER_HOST, ${hint})`, options);
    case "EACCES":
    case "EPERM":
      return new UnavailableError(`permission denied on ${at}: run thinvol as root or as a member of the docker group, ${hint}`, options);
    default:
      return new UnavailableError(`cannot reach ${at}: ${err.message} (${hint})`, options);
  }
}
