// Bundles the server into one ESM file for the plugin's rootfs: dist/thinvol.mjs.
import { build } from "esbuild";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("..", import.meta.url));

const result = await build({
  absWorkingDir: root,
  entryPoints: ["src/main.ts"],
  outfile: "dist/thinvol.mjs",
  bundle: true,
  platform: "node",
  format: "esm",
  target: "node20",
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
console.log(`dist/thinvol.mjs: ${(bundleBytes / 1024).toFixed(0)} KiB (source map beside it, not shipped)`);
