// Bundles the server into one ESM file for the plugin's rootfs: dist/thinvol.mjs;
// and the `thinvol` command into another, for the host: dist/thinvol-cli.mjs.
// THINVOL_VERSION (default: package.json's version) is the version both report.
import { build } from "esbuild";
import { chmod, readFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("..", import.meta.url));
const pkg = JSON.parse(await readFile(new URL("../package.json", import.meta.url), "utf8"));
const version = process.env.THINVOL_VERSION || pkg.version;

const result = await build({
  absWorkingDir: root,
  entryPoints: ["src/main.ts"],
  outfile: "dist/thinvol.mjs",
  bundle: true,
  platform: "node",
  format: "esm",
  target: "node20",
  define: { THINVOL_VERSION: JSON.stringify(version) },
  // An external map beside the bundle for developers; the plugin ships the bundle alone.
  sourcemap: "external",
  legalComments: "none",
  metafile: true,
  // Some dependencies still call require(); give the ESM bundle one.
  banner: { js: "import { createRequire as __thinvolRequire } from 'node:module'; const require = __thinvolRequire(import.meta.url);" },
  logLevel: "warning",
});

const bytes = Object.values(result.metafile.outputs).reduce((n, o) => n + o.bytes, 0);
const bundleBytes = result.metafile.outputs["dist/thinvol.mjs"]?.bytes ?? bytes;
console.log(`dist/thinvol.mjs: thinvol ${version}, ${(bundleBytes / 1024).toFixed(0)} KiB (source map beside it, not shipped)`);

// The command runs on the host with whatever Node it has (20 or later), as `thinvol` (package.json "bin").
const CLI = "dist/thinvol-cli.mjs";
const cli = await build({
  absWorkingDir: root,
  entryPoints: ["src/cli/main.ts"],
  outfile: CLI,
  bundle: true,
  platform: "node",
  format: "esm",
  target: "node20",
  legalComments: "none",
  metafile: true,
  // src/cli/version.ts reads this; run from source, it reads package.json instead.
  define: { __THINVOL_VERSION__: JSON.stringify(version) },
  logLevel: "warning",
});
await chmod(new URL(`../${CLI}`, import.meta.url), 0o755);
console.log(`${CLI}: ${((cli.metafile.outputs[CLI]?.bytes ?? 0) / 1024).toFixed(0)} KiB (thinvol ${version})`);
