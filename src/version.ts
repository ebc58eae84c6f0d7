declare const THINVOL_VERSION: string | undefined;

/** The version build/bundle.mjs stamps into the bundle; "development" when run from source. */
export const VERSION: string = typeof THINVOL_VERSION === "string" ? THINVOL_VERSION : "development";
