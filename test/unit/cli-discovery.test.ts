import assert from "node:assert/strict";
import { join } from "node:path";
import { afterEach, beforeEach, describe, test } from "node:test";
import { dockerSocketPath, pluginReference } from "../../src/cli/discovery.js";
import { UnavailableError } from "../../src/cli/errors.js";
import { FakeServer, pluginInspect, runCli, tempDir } from "../support/cli-fakes.js";

/**
 * Finding the admin socket through a fake Docker engine whose plugin reply is built
 * from plugin/config.json, with the state mount's source in the test's directory
 * (`docker plugin set thinvol state.source=DIR/host`). The default STATE_DIR then
 * puts the socket at DIR/host/thinvol/admin.sock on the host.
 */
let dir: Awaited<ReturnType<typeof tempDir>>;
let docker: FakeServer;
let host: string;
let env: Record<string, string>;
const open: FakeServer[] = [];

beforeEach(async () => {
  dir = await tempDir();
  host = join(dir.path, "host");
  docker = await FakeServer.start(join(dir.path, "docker.sock"));
  env = { DOCKER_HOST: `unix://${docker.socketPath}` };
});
afterEach(async () => {
  await Promise.all([docker, ...open.splice(0)].map((s) => s.close()));
  await dir.remove();
});

/** A fake admin API at `path`, answering `thinvol ls` with one volume. */
async function adminAt(path: string): Promise<FakeServer> {
  const admin = await FakeServer.start(path);
  admin.on("GET", "/v1/volumes", { json: { volumes: [{ name: "found", sizeBytes: 1024, mounted: false, mounts: 0, allocatedBytes: 0, snapshots: [] }] } });
  open.push(admin);
  return admin;
}

describe("finding the admin socket through Docker", () => {
  test("the default plugin: asks for thinvol:latest and uses the state mount's source on the host", async () => {
    docker.on("GET", "/plugins/thinvol:latest/json", { json: await pluginInspect({ stateSource: host }) });
    const admin = await adminAt(join(host, "thinvol", "admin.sock"));
    const r = await runCli(["ls"], { env });
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^found /m);
    assert.deepEqual(docker.requests.map((q) => `${q.method} ${q.path}`), ["GET /plugins/thinvol:latest/json"]);
    assert.equal(admin.requests.length, 1);
  });

  test("--plugin with a tag is asked for as given", async () => {
    docker.on("GET", "/plugins/acme/thinvol:1.2/json", { json: await pluginInspect({ name: "acme/thinvol:1.2", stateSource: host }) });
    await adminAt(join(host, "thinvol", "admin.sock"));
    const r = await runCli(["ls", "--plugin", "acme/thinvol:1.2"], { env });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(docker.requests[0]?.path, "/plugins/acme/thinvol:1.2/json");
  });

  test("STATE_DIR set with docker plugin set overrides the config's default", async () => {
    docker.on("GET", "/plugins/thinvol:latest/json", {
      json: await pluginInspect({ stateSource: host, env: { STATE_DIR: "/var/lib/docker-plugins/tv-prod/state" } }),
    });
    await adminAt(join(host, "tv-prod", "state", "admin.sock"));
    const r = await runCli(["ls"], { env });
    assert.equal(r.code, 0, r.stderr);
  });

  test("an engine that gives no Settings.Env falls back to Config.Env's default", async () => {
    const info = await pluginInspect({ stateSource: host });
    (info["Settings"] as Record<string, unknown>)["Env"] = null;
    docker.on("GET", "/plugins/thinvol:latest/json", { json: info });
    await adminAt(join(host, "thinvol", "admin.sock"));
    const r = await runCli(["ls"], { env });
    assert.equal(r.code, 0, r.stderr);
  });

  test("the mount's source comes from Config.Mounts, which the engine binds, when Settings.Mounts is a stale copy", async () => {
    const info = await pluginInspect({ stateSource: host });
    const settings = info["Settings"] as { Mounts: { Name: string; Source: string }[] };
    for (const m of settings.Mounts) if (m.Name === "state") m.Source = "/var/lib/docker/plugins";
    docker.on("GET", "/plugins/thinvol:latest/json", { json: info });
    await adminAt(join(host, "thinvol", "admin.sock"));
    const r = await runCli(["ls"], { env });
    assert.equal(r.code, 0, r.stderr);
  });

  test("an empty STATE_DIR means the server's default, which lies in no mount: say so, and point at --socket", async () => {
    docker.on("GET", "/plugins/thinvol:latest/json", { json: await pluginInspect({ stateSource: host, env: { STATE_DIR: "" } }) });
    const r = await runCli(["ls"], { env });
    assert.equal(r.code, 1);
    assert.equal(
      r.stderr,
      'thinvol: plugin thinvol:latest keeps its STATE_DIR "/var/lib/thinvol" in no mount, so its admin socket is not reachable from the host; pass --socket PATH\n',
    );
  });

  test("--socket skips Docker altogether", async () => {
    const admin = await adminAt(join(dir.path, "elsewhere.sock"));
    const r = await runCli(["ls", "--socket", admin.socketPath], { env });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(docker.requests.length, 0);
  });
});

describe("when the plugin cannot be used", () => {
  test("not installed: exit 1, pointing at docker plugin ls and --plugin", async () => {
    docker.on("GET", "/plugins/thinvol:latest/json", { status: 404, json: { message: 'plugin "thinvol:latest" not found' } });
    const r = await runCli(["ls"], { env });
    assert.equal(r.code, 1);
    assert.equal(r.stderr, "thinvol: plugin thinvol:latest is not installed (see docker plugin ls); pass --plugin NAME if it was installed under another name\n");
  });

  test("disabled: exit 1, saying how to enable it; the admin socket is not tried", async () => {
    docker.on("GET", "/plugins/thinvol:latest/json", { json: await pluginInspect({ stateSource: host, enabled: false }) });
    const admin = await adminAt(join(host, "thinvol", "admin.sock"));
    const r = await runCli(["df"], { env });
    assert.equal(r.code, 1);
    assert.equal(r.stderr, "thinvol: plugin thinvol:latest is disabled: enable it with docker plugin enable thinvol:latest\n");
    assert.equal(admin.requests.length, 0);
  });

  test("enabled but no admin socket: still starting, or a version without the admin API", async () => {
    docker.on("GET", "/plugins/thinvol:latest/json", { json: await pluginInspect({ stateSource: host }) });
    const r = await runCli(["ls"], { env });
    assert.equal(r.code, 1);
    assert.equal(
      r.stderr,
      `thinvol: no admin socket at ${join(host, "thinvol", "admin.sock")}: plugin thinvol:latest is enabled, but it is still starting or its version has no admin API (see docker plugin inspect thinvol:latest)\n`,
    );
  });

  test("the engine's own error is passed on", async () => {
    docker.on("GET", "/plugins/thinvol:latest/json", { status: 500, json: { message: "daemon is shutting down" } });
    const r = await runCli(["ls"], { env });
    assert.equal(r.code, 1);
    assert.equal(r.stderr, `thinvol: the Docker engine at ${docker.socketPath} refused GET /plugins/thinvol:latest/json (status 500): daemon is shutting down\n`);
  });

  test("no engine at DOCKER_HOST: exit 1, naming it", async () => {
    const r = await runCli(["ls"], { env: { DOCKER_HOST: `unix://${join(dir.path, "no-docker.sock")}` } });
    assert.equal(r.code, 1);
    assert.equal(
      r.stderr,
      `thinvol: cannot reach the Docker engine at unix://${join(dir.path, "no-docker.sock")}: no such socket; is Docker running? (set DOCKER_HOST, or pass --socket PATH to use the plugin's admin socket directly)\n`,
    );
  });

  test("a remote DOCKER_HOST is refused with a pointer to --socket", async () => {
    const r = await runCli(["ls", "--json"], { env: { DOCKER_HOST: "tcp://docker.example:2376" } });
    assert.equal(r.code, 1);
    assert.deepEqual(JSON.parse(r.stdout), {
      error: `DOCKER_HOST="tcp://docker.example:2376" is not a local unix socket: thinvol finds the admin socket on this host only; pass --socket PATH (the admin.sock in the plugin's STATE_DIR on the plugin's host)`,
      kind: "unavailable",
    });
  });
});

describe("DOCKER_HOST and plugin references", () => {
  test("DOCKER_HOST: unset or empty is the default socket; unix:// is a path; anything else is refused", () => {
    assert.equal(dockerSocketPath(undefined), "/var/run/docker.sock");
    assert.equal(dockerSocketPath(""), "/var/run/docker.sock");
    assert.equal(dockerSocketPath("unix:///run/user/1000/docker.sock"), "/run/user/1000/docker.sock");
    for (const host of ["tcp://127.0.0.1:2375", "ssh://me@box", "npipe:////./pipe/docker_engine", "/var/run/docker.sock", "unix://"]) {
      assert.throws(() => dockerSocketPath(host), UnavailableError, host);
    }
  });

  test("a name without a tag means :latest, as docker plugin reads it", () => {
    assert.equal(pluginReference("thinvol"), "thinvol:latest");
    assert.equal(pluginReference("acme/thinvol"), "acme/thinvol:latest");
    assert.equal(pluginReference("acme/thinvol:1.2"), "acme/thinvol:1.2");
    assert.equal(pluginReference("registry.local:5000/thinvol"), "registry.local:5000/thinvol:latest");
  });
});
