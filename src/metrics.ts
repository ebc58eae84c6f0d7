import type { PoolDetail, SnapshotDetail, VolumeDetail } from "./volumes/types.js";

/** Seconds: from a List of the cache (milliseconds) to a resize of a large filesystem. */
const BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120];

interface Series {
  labels: string;
  count: number;
  sum: number;
  /** Counts per bucket (not cumulative); the last is +Inf. */
  buckets: number[];
}

/** A label value in the exposition format: backslash, quote and newline escaped. */
function labelValue(text: string): string {
  return `"${text.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n")}"`;
}

function labels(pairs: Readonly<Record<string, string>>): string {
  const inner = Object.entries(pairs)
    .map(([k, v]) => `${k}=${labelValue(v)}`)
    .join(",");
  return inner === "" ? "" : `{${inner}}`;
}

/**
 * Request counts and latencies for both APIs, kept in memory since the start. Methods are
 * the routes' own names, never text from a request, so the number of series is bounded.
 */
export class RequestMetrics {
  private readonly series = new Map<string, Series>();

  observe(api: "docker" | "admin", method: string, outcome: "ok" | "error", seconds: number): void {
    const key = labels({ api, method, outcome });
    let s = this.series.get(key);
    if (!s) {
      s = { labels: key, count: 0, sum: 0, buckets: new Array<number>(BUCKETS.length + 1).fill(0) };
      this.series.set(key, s);
    }
    s.count++;
    s.sum += seconds;
    const i = BUCKETS.findIndex((b) => seconds <= b);
    s.buckets[i === -1 ? BUCKETS.length : i]! += 1;
  }

  render(): string[] {
    const all = [...this.series.values()].sort((a, b) => (a.labels < b.labels ? -1 : 1));
    const out = ["# HELP thinvol_requests_total Requests served, by API, method and outcome.", "# TYPE thinvol_requests_total counter"];
    for (const s of all) out.push(`thinvol_requests_total${s.labels} ${s.count}`);
    out.push("# HELP thinvol_request_duration_seconds Time to answer a request.", "# TYPE thinvol_request_duration_seconds histogram");
    for (const s of all) {
      const inner = s.labels.slice(1, -1);
      let cumulative = 0;
      BUCKETS.forEach((b, i) => {
        cumulative += s.buckets[i] ?? 0;
        out.push(`thinvol_request_duration_seconds_bucket{${inner},le="${b}"} ${cumulative}`);
      });
      out.push(`thinvol_request_duration_seconds_bucket{${inner},le="+Inf"} ${s.count}`);
      out.push(`thinvol_request_duration_seconds_sum${s.labels} ${s.sum}`);
      out.push(`thinvol_request_duration_seconds_count${s.labels} ${s.count}`);
    }
    return out;
  }
}

function gauge(out: string[], name: string, help: string, rows: [Record<string, string>, number | undefined][]): void {
  const present = rows.filter((r): r is [Record<string, string>, number] => r[1] !== undefined);
  if (present.length === 0) return;
  out.push(`# HELP ${name} ${help}`, `# TYPE ${name} gauge`);
  for (const [l, value] of present) out.push(`${name}${labels(l)} ${value}`);
}

/** The Prometheus text (format 0.0.4) of the pool, its volumes and snapshots, and the requests. */
export function renderMetrics(pool: PoolDetail, volumes: readonly VolumeDetail[], snapshots: readonly SnapshotDetail[], requests: RequestMetrics): string {
  const out: string[] = [];
  const driver = { driver: pool.driver };
  gauge(out, "thinvol_pool_data_bytes_total", "Bytes of data the pool can hold.", [[driver, pool.dataTotalBytes]]);
  gauge(out, "thinvol_pool_data_bytes_used", "Bytes of data the pool has allocated.", [[driver, pool.dataUsedBytes]]);
  gauge(out, "thinvol_pool_metadata_bytes_total", "Bytes of metadata space (dm-thin).", [[driver, pool.metaTotalBytes]]);
  gauge(out, "thinvol_pool_metadata_bytes_used", "Bytes of metadata space used (dm-thin).", [[driver, pool.metaUsedBytes]]);
  gauge(out, "thinvol_pool_host_reserved_bytes", "Host disk the pool has reserved for itself (pools kept in files).", [[driver, pool.hostReservedBytes]]);
  gauge(out, "thinvol_pool_host_free_bytes", "Free space on the host filesystem under the pool (pools kept in files).", [[driver, pool.hostFreeBytes]]);
  gauge(out, "thinvol_pool_min_free_ratio", "MIN_FREE_SPACE: new volumes are refused under this free share.", [[{}, pool.minFreePercent / 100]]);
  gauge(out, "thinvol_volumes", "Volumes.", [[{}, pool.volumes]]);
  gauge(out, "thinvol_snapshots", "Snapshots.", [[{}, pool.snapshots]]);
  gauge(out, "thinvol_volume_size_bytes", "A volume's size.", volumes.map((v) => [{ volume: v.name }, v.sizeBytes]));
  gauge(out, "thinvol_volume_allocated_bytes", "Bytes the pool holds for a volume.", volumes.map((v) => [{ volume: v.name }, v.allocatedBytes]));
  gauge(out, "thinvol_volume_used_bytes", "Bytes used inside a mounted volume's filesystem.", volumes.map((v) => [{ volume: v.name }, v.usedBytes]));
  gauge(out, "thinvol_volume_mounted", "1 while a volume is mounted.", volumes.map((v) => [{ volume: v.name }, v.mounted ? 1 : 0]));
  gauge(out, "thinvol_volume_snapshots", "A volume's snapshots.", volumes.map((v) => [{ volume: v.name }, v.snapshots.length]));
  gauge(out, "thinvol_snapshot_size_bytes", "A snapshot's size.", snapshots.map((s) => [{ volume: s.volume, snapshot: s.name }, s.sizeBytes]));
  out.push(...requests.render());
  return out.join("\n") + "\n";
}
