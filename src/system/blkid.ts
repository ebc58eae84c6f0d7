import type { Runner } from "./runner.js";

/** blkid's exit status when it found nothing to report. */
const NOTHING_FOUND = 2;

/**
 * What a low-level probe (`blkid -p`, reading the device itself rather than a cache) finds on
 * a device: a filesystem, a partition table, an LVM or RAID member, swap, ... as blkid's
 * KEY=value pairs (TYPE, PTTYPE, USAGE, LABEL, ...); undefined when the device holds nothing
 * blkid knows.
 */
export async function probeSignatures(runner: Runner, device: string): Promise<Map<string, string> | undefined> {
  const { stdout, exitCode } = await runner.run("blkid", ["-p", "-o", "export", device], { okExitCodes: [NOTHING_FOUND] });
  if (exitCode === NOTHING_FOUND) return undefined;
  const found = new Map<string, string>();
  for (const line of stdout.split("\n")) {
    const eq = line.indexOf("=");
    if (eq > 0) found.set(line.slice(0, eq).trim(), line.slice(eq + 1).trim());
  }
  found.delete("DEVNAME");
  return found;
}
