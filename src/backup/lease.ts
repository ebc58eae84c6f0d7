import { randomBytes } from "node:crypto";
import { readFile } from "node:fs/promises";
import { hostname } from "node:os";
import * as v from "valibot";
import { ConflictError, quote } from "../errors.js";
import { writeFileAtomic } from "../system/atomic-file.js";
import type { BackupStore } from "./store.js";

/**
 * Who is working on a target, so that garbage collection never deletes a block a backup in
 * progress relies on. A running backup relies on blocks it found already stored (it skips
 * their upload) and on blocks its previous backup names; neither is in a record yet.
 *
 * The rule, as restic's: a backup holds a shared lease, a collection an exclusive one, and
 * neither runs beside the other. Each writes its lease first and then lists the leases; of
 * two that start together the later lister sees the earlier writer (a store lists what was
 * put before, as a directory and S3 do), so they can never both go on. A lease is refreshed
 * while its holder works; one not refreshed for `staleMs` belongs to a process that died,
 * and a collection removes it. A backup checks that its lease still exists just before it
 * writes its record, so one that stalled past `staleMs` fails rather than name blocks a
 * collection may have removed meanwhile.
 */
export type LeaseKind = "backup" | "gc";

/**
 * Who takes leases: `owner` names a pool's state (one process at a time holds it), and
 * `instance` that process. A lease of the same owner from another instance belongs to a
 * process that is gone (killed, or the host rebooted), so it is abandoned at once, not
 * after `staleMs`.
 */
export interface LeaseHolder {
  owner: string;
  instance: string;
}

export interface LeaseOptions {
  holder?: LeaseHolder;
  now?: () => Date;
  /** A lease older than this without a refresh is abandoned. Default 30 minutes. */
  staleMs?: number;
}

export const DEFAULT_LEASE_STALE_MS = 30 * 60_000;

const LeaseSchema = v.object({
  kind: v.picklist(["backup", "gc"]),
  what: v.string(),
  host: v.string(),
  pid: v.number(),
  refreshedAt: v.pipe(v.string(), v.isoTimestamp()),
  owner: v.optional(v.string()),
  instance: v.optional(v.string()),
});
type LeaseRecord = v.InferOutput<typeof LeaseSchema>;

export class Lease {
  private constructor(
    private readonly store: BackupStore,
    readonly key: string,
    private readonly record: LeaseRecord,
    private readonly now: () => Date,
    private readonly staleMs: number,
    private readonly holder: LeaseHolder | undefined,
  ) {}

  /**
   * Takes a lease, or throws ConflictError naming the holder of the one in the way: a
   * backup waits for no collection, a collection for nothing at all.
   */
  static async acquire(store: BackupStore, kind: LeaseKind, what: string, options: LeaseOptions = {}): Promise<Lease> {
    const now = options.now ?? (() => new Date());
    const staleMs = options.staleMs ?? DEFAULT_LEASE_STALE_MS;
    const key = `locks/${kind}-${randomBytes(8).toString("hex")}.json`;
    const record: LeaseRecord = { kind, what, host: hostname(), pid: process.pid, refreshedAt: now().toISOString(), ...(options.holder ?? {}) };
    const lease = new Lease(store, key, record, now, staleMs, options.holder);
    await lease.write();
    const others = await lease.others();
    const inTheWay = others.find((o) => !o.stale && (kind === "gc" || o.kind === "gc"));
    if (inTheWay !== undefined) {
      await lease.release();
      throw new ConflictError(`${what} cannot start at ${store.url}: ${inTheWay.what} is in progress (lease ${inTheWay.key}); try again when it is done`);
    }
    return lease;
  }

  /** The other leases at the target, with whether each is abandoned. Unreadable ones count as live: never guess in favour of deleting. */
  async others(): Promise<{ key: string; kind: LeaseKind | undefined; what: string; stale: boolean }[]> {
    const found = [];
    for (const key of await this.store.list("locks/")) {
      if (key === this.key) continue;
      const data = await this.store.get(key);
      if (data === undefined) continue; // released meanwhile
      let parsed: v.SafeParseResult<typeof LeaseSchema> | undefined;
      try {
        parsed = v.safeParse(LeaseSchema, JSON.parse(Buffer.from(data).toString("utf8")));
      } catch {
        parsed = undefined;
      }
      if (!parsed?.success) {
        found.push({ key, kind: undefined, what: `an unreadable lease (delete ${quote(key)} if no thinvol is working there)`, stale: false });
        continue;
      }
      const age = this.now().getTime() - Date.parse(parsed.output.refreshedAt);
      const o = parsed.output;
      const orphan = this.holder !== undefined && o.owner === this.holder.owner && o.instance !== this.holder.instance;
      found.push({ key, kind: o.kind, what: `${o.what} on ${o.host}`, stale: orphan || age > this.staleMs });
    }
    return found;
  }

  /** Refreshes the lease when a good part of `staleMs` has passed since the last time. */
  async refreshIfDue(): Promise<void> {
    if (this.now().getTime() - Date.parse(this.record.refreshedAt) < this.staleMs / 4) return;
    this.record.refreshedAt = this.now().toISOString();
    await this.write();
  }

  /** Throws unless the lease is still there: a collection removed it as abandoned. */
  async confirm(): Promise<void> {
    if (!(await this.store.has(this.key))) {
      throw new ConflictError(`${this.record.what} lost its lease ${this.key} at ${this.store.url} (it was idle past ${this.staleMs} ms and deemed abandoned); run it again`);
    }
  }

  async release(): Promise<void> {
    await this.store.delete(this.key);
  }

  private async write(): Promise<void> {
    await this.store.put(this.key, Buffer.from(JSON.stringify(this.record)));
  }
}

/**
 * The lease owner id of a pool's state directory, made once and kept in `file`: leases this
 * state's earlier processes left are then known for abandoned as soon as a new one starts.
 */
export async function loadLeaseOwner(file: string): Promise<string> {
  const existing = await readFile(file, "utf8").catch((err: NodeJS.ErrnoException) => {
    if (err.code === "ENOENT") return undefined;
    throw err;
  });
  const id = existing?.trim();
  if (id !== undefined && /^[0-9a-f]{32}$/.test(id)) return id;
  const made = randomBytes(16).toString("hex");
  await writeFileAtomic(file, `${made}\n`);
  return made;
}
