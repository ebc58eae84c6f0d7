import { readFileSync } from "node:fs";

/** Replaced by the package version when build/bundle.mjs writes dist/thinvol-cli.mjs. */
declare const __THINVOL_VERSION__: string | undefined;

/** The package version: built in by the bundle; read from package.json when run from source. */
export function version(): string {
  if (typeof __THINVOL_VERSION__ === "string") return __THINVOL_VERSION__;
  const pkg = JSON.parse(readFileSync(new URL("../../package.json", import.meta.url), "utf8")) as { version?: unknown };
  return String(pkg.version);
}
