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
  sourcemap: "inline",
  legalComments: "none",
  metafile: true,
  // Some dependencies still call require(); give the ESM bundle one.
  banner: { js: "import { createRequire as __thinvolRequire } from 'node:module'; const require = __thinvolRequire(import.meta.url);" },
  logLevel: "warning",
});

const bytes = Object.values(result.metafile.outputs).reduce((n, o) => n + o.bytes, 0);
console.log(`dist/thinvol.mjs: ${(bytes / 1024).toFixed(0)} KiB`);
