import { quote } from "../../errors.js";
import { formatSize } from "../../size.js";
import { seg, type Command } from "../command.js";
import { CliError } from "../errors.js";
import { size, table, time } from "../format.js";
import { BackupListReply, BackupRemovalReply, BackupResultReply, VerifyReply, VolumeReply } from "../replies.js";
import { BackupId, VolumeName } from "../validate.js";

const TARGETS =
  "URL is file:///path, a directory on this host that the plugin's backups mount shows (docker plugin set thinvol backups.source=/path), " +
  "or s3://bucket/prefix, with the endpoint and credentials in the plugin's S3_* settings. THINVOL_BACKUP_TARGET stands for a URL left out.";

function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(1)} s`;
}

export const backupCreate: Command = {
  name: "backup create",
  args: [{ name: "VOLUME", schema: VolumeName }],
  summary: "Back up a volume; only changed blocks are sent",
  description:
    "Takes a snapshot of the volume (a mounted volume is frozen only for that instant) and stores its blocks at the target: " +
    "the first backup there stores every block that holds data, later ones only the blocks changed since the last. Blocks are " +
    "compressed and stored once per target, whichever volume they came from. The backup is listed only once all its blocks are " +
    "stored; an interrupted backup can be run again and skips what is there. The snapshot stays (as backup-ID) for the next backup " +
    `to tell what changed; it goes with the volume. ${TARGETS}`,
  examples: ["thinvol backup create db --to file:///mnt/backup", "thinvol backup create db --to s3://backups/prod"],
  async run(ctx, [volume = ""]) {
    const to = ctx.target("to");
    const r = await ctx.change(`backing up volume ${quote(volume)}`, (onProgress) =>
      ctx.client.call(BackupResultReply, "POST", `/v1/volumes/${seg(volume)}/backups`, { body: { to }, onProgress }),
    );
    const kind = r.incremental ? `incremental to ${r.previous ?? "the last backup"}` : r.previous ? "every block with data read again" : "full";
    return {
      json: r,
      text:
        `backed up volume ${quote(r.volume)} as ${r.id} at ${r.target} (${kind})\n` +
        `  ${r.blocksRead} blocks read (${formatSize(r.bytesRead)}), ${r.blocksChanged} changed, ${r.blocksUploaded} stored (${formatSize(r.bytesUploaded)} sent) in ${seconds(r.durationMs)}\n`,
    };
  },
};

export const backupLs: Command = {
  name: "backup ls",
  args: [{ name: "VOLUME", schema: VolumeName, optional: true }],
  summary: "List the backups at --to URL",
  description: `Lists backups oldest first. DATA is what the backup holds (blocks with data), not what it took to store it. ${TARGETS}`,
  examples: ["thinvol backup ls --to file:///mnt/backup", "thinvol backup ls db --to s3://backups/prod"],
  async run(ctx, [volume]) {
    const to = ctx.target("to");
    const query = `?to=${encodeURIComponent(to)}${volume === undefined ? "" : `&volume=${seg(volume)}`}`;
    const reply = await ctx.client.call(BackupListReply, "GET", `/v1/backups${query}`);
    return {
      json: reply,
      text: table(
        [{ title: "ID" }, { title: "VOLUME" }, { title: "CREATED" }, { title: "SIZE", right: true }, { title: "DATA", right: true }, { title: "FS" }],
        reply.backups.map((b) => [b.id, b.volume, time(b.createdAt), size(b.sizeBytes), size(b.dataBytes), b.filesystem ?? "-"]),
      ),
    };
  },
};

export const backupRm: Command = {
  name: "backup rm",
  args: [{ name: "ID", schema: BackupId }],
  summary: "Remove a backup and the blocks only it needed",
  description: `Forgets the backup at once, then deletes the blocks that no other backup at the target names. Backups of the same volume made after it stay whole: each backup is complete on its own. Without --to, the backup is looked for at every target this plugin has backed up to. ${TARGETS}`,
  examples: ["thinvol backup rm 20261129T101500123Z-1a2b3c4d --to file:///mnt/backup"],
  async run(ctx, [id = ""]) {
    const to = ctx.maybeTarget("to");
    const query = to === undefined ? "" : `?to=${encodeURIComponent(to)}`;
    const r = await ctx.change(`removing backup ${id}`, (onProgress) => ctx.client.call(BackupRemovalReply, "DELETE", `/v1/backups/${seg(id)}${query}`, { onProgress }));
    return { json: r, text: `removed backup ${r.id} of volume ${quote(r.volume)}: ${r.blocksDeleted} blocks deleted, ${r.blocksKept} kept for other backups\n` };
  },
};

export const backupVerify: Command = {
  name: "backup verify",
  args: [{ name: "ID", schema: BackupId }],
  summary: "Check every block of a backup",
  description: `Reads every block the backup names, decompresses it and checks its SHA-256. Exits 1 when a block is missing or damaged. Without --to, the backup is looked for at every target this plugin has backed up to. ${TARGETS}`,
  examples: ["thinvol backup verify 20261129T101500123Z-1a2b3c4d --to s3://backups/prod"],
  async run(ctx, [id = ""]) {
    const to = ctx.maybeTarget("to");
    const r = await ctx.change(`verifying backup ${id}`, (onProgress) =>
      ctx.client.call(VerifyReply, "POST", `/v1/backups/${seg(id)}/verify`, { body: to === undefined ? {} : { to }, onProgress }),
    );
    if (!r.ok) {
      const list = (what: string, blocks: readonly number[]) => (blocks.length === 0 ? [] : [`${blocks.length} ${what} (blocks ${blocks.slice(0, 10).join(", ")}${blocks.length > 10 ? ", ..." : ""})`]);
      throw new CliError(`backup ${r.id} of volume ${quote(r.volume)} is damaged: ${[...list("missing", r.missing), ...list("damaged", r.damaged)].join(", ")} of ${r.blocksChecked} blocks`, "damaged");
    }
    return { json: r, text: `backup ${r.id} of volume ${quote(r.volume)} is intact: ${r.blocksChecked} blocks checked\n` };
  },
};

export const restore: Command = {
  name: "restore",
  args: [
    { name: "ID", schema: BackupId },
    { name: "NEWVOLUME", schema: VolumeName },
  ],
  summary: "Make a new volume from a backup at --from URL",
  description:
    "Creates NEWVOLUME with the backup's size and filesystem and writes the backup's blocks into it; blocks that held no data are " +
    "not written, so the volume stays thin. It is byte for byte the volume at the time of the backup. A restore interrupted by a crash " +
    "leaves no volume; run it again. `docker volume create -d thinvol -o backup=URL#ID NEWVOLUME` does the same, within Docker's " +
    `two-minute limit for a create. ${TARGETS}`,
  examples: ["thinvol restore 20261129T101500123Z-1a2b3c4d --from s3://backups/prod db-copy"],
  async run(ctx, [id = "", volume = ""]) {
    const from = ctx.target("from");
    const v = await ctx.change(`restoring backup ${id} into volume ${quote(volume)}`, (onProgress) =>
      ctx.client.call(VolumeReply, "POST", "/v1/restore", { body: { from, id, volume }, onProgress }),
    );
    return { json: v, text: `restored backup ${id} into volume ${quote(v.name)} (${formatSize(v.sizeBytes)}, ${v.filesystem ?? "-"})\n` };
  },
};
