import type { Command } from "../command.js";
import { fields, usedOf } from "../format.js";
import { formatSize } from "../../size.js";
import { PoolReply, VolumeListReply, type Pool } from "../replies.js";
import { Size } from "../validate.js";
import { volumeTable } from "./volumes.js";

/** The pool as `label: value` lines; metadata for dm-thin, the host's disk for a pool kept in files. */
export function poolFields(pool: Pool): string {
  const rows: [string, string][] = [
    ["driver", pool.driver],
    ["data", usedOf(pool.dataUsedBytes, pool.dataTotalBytes)],
  ];
  if (pool.metaTotalBytes !== undefined && pool.metaUsedBytes !== undefined && pool.metaTotalBytes > 0) {
    rows.push(["metadata", usedOf(pool.metaUsedBytes, pool.metaTotalBytes)]);
  }
  if (pool.hostFreeBytes !== undefined) {
    const reserved = pool.hostReservedBytes === undefined ? "" : `${formatSize(pool.hostReservedBytes)} reserved for the pool, `;
    rows.push(["host disk", `${reserved}${formatSize(pool.hostFreeBytes)} free`]);
  }
  rows.push(
    ["min free", `${pool.minFreePercent}% (MIN_FREE_SPACE: no new volume when less of the pool is free)`],
    ["volumes", String(pool.volumes)],
    ["snapshots", String(pool.snapshots)],
  );
  return fields(rows);
}

export const df: Command = {
  name: "df",
  args: [],
  summary: "Show the pool's space, then the volumes",
  description:
    "Shows the pool: its driver, the data space used and its size, the metadata space (dm-thin), the host disk under a pool kept in files, the free-space threshold below which no volume is created (MIN_FREE_SPACE), and the counts of volumes and snapshots. Then the volumes table of thinvol ls. With --json: one document, {\"pool\": ..., \"volumes\": [...]}.",
  examples: ["thinvol df"],
  async run(ctx) {
    const pool = await ctx.client.call(PoolReply, "GET", "/v1/pool");
    const { volumes } = await ctx.client.call(VolumeListReply, "GET", "/v1/volumes");
    const text = volumes.length === 0 ? poolFields(pool) : `${poolFields(pool)}\n${volumeTable(volumes)}`;
    return { json: { pool, volumes }, text };
  },
};

export const poolGrow: Command = {
  name: "pool grow",
  args: [{ name: "SIZE", schema: Size }],
  summary: "Grow the pool's data space",
  description:
    "Grows the pool's data space to SIZE while volumes are in use. A pool never shrinks: a smaller SIZE is refused. SIZE is a number with an optional unit in powers of 1024 (512M, 20G, 1T).",
  examples: ["thinvol pool grow 200G"],
  async run(ctx, [newSize = ""]) {
    const pool = await ctx.change(`growing the pool to ${newSize}`, (onProgress) =>
      ctx.client.call(PoolReply, "POST", "/v1/pool/grow", { body: { size: newSize }, onProgress }),
    );
    return { json: pool, text: `pool data space is now ${formatSize(pool.dataTotalBytes)}: ${usedOf(pool.dataUsedBytes, pool.dataTotalBytes)}\n` };
  },
};

export const metrics: Command = {
  name: "metrics",
  args: [],
  summary: "Print the Prometheus metrics",
  description: "Prints GET /metrics as the plugin serves it (Prometheus text format 0.0.4), with or without --json.",
  examples: ["thinvol metrics | grep thinvol_pool"],
  async run(ctx) {
    return { text: await ctx.client.text("/metrics") };
  },
};
