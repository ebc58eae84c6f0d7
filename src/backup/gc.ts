import { errorMessage, NotFoundError, quote, ThinvolError } from "../errors.js";
import { digestOfKey } from "./blocks.js";
import { Lease, type LeaseOptions } from "./lease.js";
import { listBackups, manifestKey, readManifest } from "./manifest.js";
import type { BackupStore } from "./store.js";

/**
 * Forgets a backup: its record goes at once, so it is no longer listed or restorable. Its
 * blocks stay until collectGarbage finds no other backup naming them.
 */
export async function removeBackup(store: BackupStore, volume: string, id: string): Promise<void> {
  const key = manifestKey(volume, id);
  if (!(await store.has(key))) throw new NotFoundError(`backup ${quote(id)} of volume ${quote(volume)} is not at ${store.url}`);
  await store.delete(key);
}

export interface GarbageReport {
  blocksDeleted: number;
  blocksKept: number;
  /** Leases of processes that died, removed. */
  leasesRemoved: number;
  /** Objects left half-written by processes that died (a directory's temporary files), removed. */
  leftoversRemoved: number;
}

/**
 * Deletes the blocks no backup record names. It holds the target's exclusive lease (see
 * lease.ts), so no backup runs meanwhile, and it reads every record before deleting
 * anything: a record it cannot read stops it, since the blocks that record names are unknown.
 */
export async function collectGarbage(store: BackupStore, options: LeaseOptions = {}): Promise<GarbageReport> {
  const lease = await Lease.acquire(store, "gc", "garbage collection", options);
  try {
    let leasesRemoved = 0;
    for (const other of await lease.others()) {
      if (!other.stale) continue;
      await store.delete(other.key);
      leasesRemoved++;
    }
    const named = new Set<string>();
    for (const { volume, id } of await listBackups(store)) {
      const manifest = await readManifest(store, volume, id).catch((err: unknown) => {
        throw new ThinvolError(`garbage collection at ${store.url} stopped before deleting anything: ${errorMessage(err)}`, { cause: err });
      });
      for (const [, digest] of manifest.blocks) named.add(digest);
    }
    let blocksDeleted = 0;
    let blocksKept = 0;
    for (const key of await store.list("blocks/")) {
      const digest = digestOfKey(key);
      // A key that is not a block's (left by someone else) is not ours to delete.
      if (digest === undefined || named.has(digest)) {
        blocksKept++;
        continue;
      }
      await store.delete(key);
      blocksDeleted++;
      await lease.refreshIfDue();
    }
    // Holding the exclusive lease, no backup writes: every temporary file is a dead writer's.
    const leftoversRemoved = (await store.removeLeftovers?.()) ?? 0;
    return { blocksDeleted, blocksKept, leasesRemoved, leftoversRemoved };
  } finally {
    await lease.release().catch(() => undefined);
  }
}
