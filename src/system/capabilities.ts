import { readFile } from "node:fs/promises";

/** Growing a mounted ext4 filesystem (its resize ioctl) needs this capability. */
export const CAP_SYS_RESOURCE = 24;

/** Whether this process holds capability `bit` in its effective set. */
export async function hasCapability(bit: number, statusFile = "/proc/self/status"): Promise<boolean> {
  const text = await readFile(statusFile, "utf8").catch(() => "");
  const hex = /^CapEff:\s*([0-9a-f]+)$/m.exec(text)?.[1];
  if (hex === undefined) return false;
  return ((BigInt(`0x${hex}`) >> BigInt(bit)) & 1n) === 1n;
}
