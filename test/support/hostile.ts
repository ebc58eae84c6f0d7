/** What the fuzz tests of the protocol layer and of the real server share. */
import { QUOTE_MAX_CHARS } from "../../src/errors.js";

/** mulberry32: small, fast and the same on every machine, so a failing seed replays. */
export function prng(seed: number) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const int = (n: number) => Math.floor(next() * n);
  const pick = <T>(items: readonly T[]): T => items[int(items.length)] as T;
  return { next, int, pick };
}
export type Rng = ReturnType<typeof prng>;

/** Long enough for every message thinvol writes with a handful of quoted inputs in it. */
export const MAX_ERR_CHARS = 1200;

/** Characters no log line or error may carry raw: they would forge lines or hide text. */
export const UNPRINTABLE = /[\u0000-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e]/;

/** True when `text` quotes more of `input` than the cap allows (raw or JSON-escaped). */
export function quotesPastCap(text: string, input: string): boolean {
  const chars = Array.from(input);
  if (chars.length <= QUOTE_MAX_CHARS) return false;
  for (const start of new Set([0, chars.length - QUOTE_MAX_CHARS - 1])) {
    const run = chars.slice(start, start + QUOTE_MAX_CHARS + 1).join("");
    if (text.includes(run) || text.includes(JSON.stringify(run).slice(1, -1))) return true;
  }
  return false;
}
