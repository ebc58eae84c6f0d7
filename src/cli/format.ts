import { escapeUnprintable } from "../errors.js";
import { formatSize } from "../size.js";

/** Column gap, as `docker volume ls` uses. */
const GAP = "   ";

export interface Column {
  title: string;
  /** Figures line up on the right. */
  right?: boolean;
}

/** A plain text table: a header row, then one row per item; the last column is not padded. */
export function table(columns: readonly Column[], rows: readonly (readonly string[])[]): string {
  const cells = rows.map((row) => row.map((cell) => escapeUnprintable(cell)));
  const widths = columns.map((c, i) => Math.max(c.title.length, ...cells.map((row) => (row[i] ?? "").length)));
  const line = (row: readonly string[]) =>
    columns
      .map((c, i) => {
        const cell = row[i] ?? "";
        const width = widths[i] ?? 0;
        if (i === columns.length - 1 && !c.right) return cell;
        return c.right ? cell.padStart(width) : cell.padEnd(width);
      })
      .join(GAP)
      .trimEnd();
  return [line(columns.map((c) => c.title)), ...cells.map(line)].map((l) => `${l}\n`).join("");
}

/** Bytes for a person; `-` when there is no figure (a volume not mounted has no "used"). */
export function size(bytes: number | undefined): string {
  return bytes === undefined ? "-" : formatSize(bytes);
}

/** `12.5%` of a total; `-` for an empty total. */
export function percent(part: number, total: number): string {
  if (total <= 0) return "-";
  const p = (part / total) * 100;
  if (p > 0 && p < 0.1) return "<0.1%";
  return `${p >= 10 || Number.isInteger(p) ? p.toFixed(0) : p.toFixed(1)}%`;
}

/** `1.2 GiB of 100 GiB used (1.2%)` */
export function usedOf(used: number, total: number): string {
  return `${formatSize(used)} of ${formatSize(total)} used (${percent(used, total)})`;
}

/** `label   value` lines, the values lined up. */
export function fields(rows: readonly (readonly [string, string])[]): string {
  const width = Math.max(...rows.map(([k]) => k.length));
  return rows.map(([k, value]) => `${`${k}:`.padEnd(width + 2)}${value}\n`).join("");
}

/** An ISO time without the milliseconds: `2026-11-29T10:00:00Z`. */
export function time(iso: string | undefined): string {
  return iso === undefined ? "-" : iso.replace(/\.\d+Z$/, "Z");
}

/** Replies pretty-printed, one document. */
export function json(value: unknown): string {
  return `${JSON.stringify(value, null, 2)}\n`;
}
