/**
 * The plugin as users get it: test/e2e/run.sh pushed it to a real registry with every tag
 * a release pushes (build/plugin-push.sh) and installed it from there with --alias,
 * --grant-all-permissions and settings, as the README says. Skipped when run.sh used
 * `docker plugin create` (E2E_INSTALL=create).
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { after, test } from "node:test";
import {
  createVolume,
  docker,
  dockerOk,
  elfArch,
  env,
  inspectPlugin,
  noRegistry,
  pluginRootfs,
  registry,
  releaseOf,
  removeVolumes,
  runInOk,
  stateSourceOf,
  uniqueName,
} from "./support.js";

const MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json";

/** The registry's tags of the repository, and the digest of each tag's manifest. */
async function registryTags(repository: string): Promise<Map<string, string>> {
  const host = repository.slice(0, repository.indexOf("/"));
  const name = repository.slice(repository.indexOf("/") + 1);
  const list = (await (await fetch(`http://${host}/v2/${name}/tags/list`)).json()) as { tags: string[] | null };
  const digests = new Map<string, string>();
  for (const tag of list.tags ?? []) {
    const res = await fetch(`http://${host}/v2/${name}/manifests/${tag}`, { method: "HEAD", headers: { Accept: MANIFEST_V2 } });
    const digest = res.headers.get("docker-content-digest");
    assert.ok(res.ok && digest, `the registry has a manifest for :${tag}`);
    digests.set(tag, digest);
  }
  return digests;
}

const hostArch = process.arch === "arm64" ? "arm64" : "amd64";
const otherArch = hostArch === "arm64" ? "amd64" : "arm64";

const volumes: string[] = [];
const plugins: string[] = [];
after(async () => {
  await removeVolumes(...volumes);
  for (const p of plugins) await docker(["plugin", "rm", "-f", p]);
});

test("a release pushes :VERSION-ARCH and :ARCH for each architecture, :VERSION and :latest for amd64; a pre-release moves none of the floating tags", { skip: noRegistry }, async () => {
  assert.ok(registry);
  const { repository, version: v, nextVersion: next } = registry;
  const tags = await registryTags(repository);
  const expected = [`${v}-amd64`, "amd64", v, "latest", `${v}-arm64`, "arm64", `${next}-${hostArch}`];
  if (hostArch === "amd64") expected.push(next);
  assert.deepEqual([...tags.keys()].sort(), expected.sort(), "exactly the release's tags are in the registry");
  const pushed = (await readFile(registry.pushedTagsFile, "utf8")).trim().split("\n").map((ref) => ref.slice(repository.length + 1));
  assert.deepEqual(pushed.sort(), expected.sort(), "build/plugin-push.sh printed every tag it pushed");

  const digest = (tag: string) => tags.get(tag);
  for (const tag of ["amd64", v, "latest"]) assert.equal(digest(tag), digest(`${v}-amd64`), `:${tag} is ${v} for amd64`);
  assert.equal(digest("arm64"), digest(`${v}-arm64`), `:arm64 is ${v} for arm64`);
  assert.notEqual(digest(`${v}-arm64`), digest(`${v}-amd64`), "each architecture is a plugin of its own");
  assert.notEqual(digest(`${next}-${hostArch}`), digest(`${v}-${hostArch}`), "the next version is another plugin");
});

test("each architecture's tag holds a rootfs of that architecture, with Node >= 22 and the version it was tagged with", { skip: noRegistry }, async () => {
  assert.ok(registry);
  const { repository, version } = registry;
  for (const arch of [hostArch, otherArch]) {
    // Installed disabled: an arm64 plugin cannot start on amd64, but it can be pulled and looked at.
    const alias = `thinvol-check-${arch}`;
    plugins.push(alias);
    await dockerOk(["plugin", "install", "--disable", "--alias", alias, "--grant-all-permissions", `${repository}:${arch}`], 300_000);
    const rootfs = await pluginRootfs(await inspectPlugin(alias));
    const release = await releaseOf(rootfs);
    assert.equal(release["ARCH"], arch, `:${arch} says it is built for ${arch}`);
    assert.equal(release["VERSION"], version, `:${arch} is version ${version}`);
    assert.ok(Number(/^v(\d+)\./.exec(release["NODE"] ?? "")?.[1]) >= 22, `:${arch} ships Node >= 22 (${release["NODE"]})`);
    assert.equal(await elfArch(join(rootfs, "usr", "bin", "node")), arch, `:${arch}'s node binary is built for ${arch}`);
    assert.equal(await elfArch(join(rootfs, "usr", "sbin", "losetup")), arch, `:${arch}'s losetup is built for ${arch}`);
    await dockerOk(["plugin", "rm", "-f", alias]);
  }
});

test("the plugin was installed from the registry under its alias, with the settings given to install, and serves volumes", { skip: noRegistry }, async () => {
  assert.ok(registry);
  const plugin = await inspectPlugin();
  assert.equal(plugin.Name, `${env.plugin}:latest`, "the plugin is known by its alias");
  assert.equal(plugin.PluginReference, `${registry.repository}:${registry.version}`, "it came from the registry");
  assert.equal(plugin.Enabled, true, "install enabled it");
  for (const setting of [`POOL_DRIVER=${env.poolDriver}`, "LOG_LEVEL=debug"]) {
    assert.ok(plugin.Settings.Env.includes(setting), `the install's setting ${setting} is in effect: ${plugin.Settings.Env.join(" ")}`);
  }
  assert.equal(stateSourceOf(plugin), registry.stateSource, "the install's state.source is the state mount");
  assert.equal((await releaseOf(await pluginRootfs(plugin)))["VERSION"], registry.version);

  const name = uniqueName("from-registry");
  volumes.push(name);
  await createVolume(name, { size: "64M" });
  const token = randomBytes(6).toString("hex");
  await runInOk(name, `echo ${token} > /d/token && sync`);
  assert.equal(await runInOk(name, "cat /d/token"), token);
});
