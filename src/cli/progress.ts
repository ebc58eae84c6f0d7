import { escapeUnprintable } from "../errors.js";
import type { Progress } from "./replies.js";

/** Return to the start of the line and erase it. */
const CLEAR_LINE = "\r\x1b[K";
const TICK_MS = 1000;

/**
 * One stderr line, rewritten in place, for a change that is under way: the label,
 * the latest step from the plugin, and the seconds so far (ticking while the plugin
 * is silent). Cleared at the end so only the result stays on the terminal.
 */
export class ProgressLine {
  private step = "";
  private readonly started: number;
  private readonly timer: NodeJS.Timeout;

  constructor(
    private readonly label: string,
    private readonly write: (text: string) => void,
    private readonly now: () => number,
    private readonly columns: number | undefined,
  ) {
    this.started = now();
    this.draw();
    this.timer = setInterval(() => this.draw(), TICK_MS);
    // A line on a terminal must never keep the command alive.
    this.timer.unref();
  }

  update(event: Progress): void {
    const { message, done, total } = event;
    const share = done !== undefined && total !== undefined && total > 0 ? ` ${Math.min(100, Math.floor((done / total) * 100))}%` : "";
    this.step = `${escapeUnprintable(message)}${share}`;
    this.draw();
  }

  clear(): void {
    clearInterval(this.timer);
    this.write(CLEAR_LINE);
  }

  private draw(): void {
    const seconds = Math.floor((this.now() - this.started) / 1000);
    let line = `${this.label}${this.step === "" ? "…" : `: ${this.step}`} (${seconds}s)`;
    // A line longer than the terminal wraps, and \r then rewrites only its last row.
    if (this.columns !== undefined && this.columns > 1 && line.length >= this.columns) line = `${line.slice(0, this.columns - 2)}…`;
    this.write(`${CLEAR_LINE}${line}`);
  }
}
