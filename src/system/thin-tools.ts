import type { Runner } from "./runner.js";

/**
 * Checks thin-pool metadata with thin_check (thin-provisioning-tools). The pool
 * must be down: thin_check opens the device exclusively. Throws a CommandError
 * carrying thin_check's report when the metadata is damaged.
 */
export async function checkThinMetadata(runner: Runner, metadataDevice: string, options: { skipMappings?: boolean } = {}): Promise<void> {
  const args: string[] = [];
  if (options.skipMappings) args.push("--skip-mappings");
  args.push(metadataDevice);
  // A full check reads every mapping; give it longer than a plain command.
  await runner.run("thin_check", args, { timeoutMs: 120_000 });
}
