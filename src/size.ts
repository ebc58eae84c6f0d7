const UNITS: Record<string, number> = {
  "": 1,
  b: 1,
  k: 1024,
  m: 1024 ** 2,
  g: 1024 ** 3,
  t: 1024 ** 4,
  p: 1024 ** 5,
};

/**
 * Parses a size such as `64M`, `20G`, `1.5GiB`, `512m` or `1048576` into bytes.
 * Units are powers of 1024, as `docker volume create -o size=` users expect from
 * other volume drivers. Returns undefined when the text is not a size.
 */
export function parseSize(text: string): number | undefined {
  // Trimmed first: a pattern with leading and trailing \s* runs in quadratic time on long runs of spaces.
  const m = /^(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?$/i.exec(text.trim());
  if (!m || m[1] === undefined) return undefined;
  const unit = UNITS[(m[2] ?? "").toLowerCase()];
  if (unit === undefined) return undefined;
  const bytes = Math.floor(Number(m[1]) * unit);
  return Number.isSafeInteger(bytes) ? bytes : undefined;
}

/** Bytes as a short human figure: `64 MiB`, `1.5 GiB`. */
export function formatSize(bytes: number): string {
  const names = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < names.length - 1) {
    v /= 1024;
    i++;
  }
  const shown = i === 0 || Number.isInteger(v) ? String(v) : v.toFixed(v < 10 ? 2 : 1);
  return `${shown} ${names[i]}`;
}
