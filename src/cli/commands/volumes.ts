import { quote } from "../../errors.js";
import { formatSize } from "../../size.js";
import { seg, type Command } from "../command.js";
import { json, size, table } from "../format.js";
import { ResizeReply, VolumeListReply, VolumeReply, type Volume } from "../replies.js";
import { Size, SnapshotName, VolumeName } from "../validate.js";

/** The volumes table, shared by `ls` and `df`. */
export function volumeTable(volumes: readonly Volume[]): string {
  return table(
    [
      { title: "NAME" },
      { title: "SIZE", right: true },
      { title: "USED", right: true },
      { title: "ALLOCATED", right: true },
      { title: "ORIGIN" },
      { title: "SNAPSHOTS", right: true },
      { title: "MOUNTS", right: true },
    ],
    volumes.map((v) => [
      v.name,
      size(v.sizeBytes),
      v.mounted ? size(v.usedBytes) : "-",
      size(v.allocatedBytes),
      v.origin ?? "-",
      String(v.snapshots.length),
      String(v.mounts),
    ]),
  );
}

export const ls: Command = {
  name: "ls",
  args: [],
  summary: "List the volumes",
  description:
    "Lists every volume, sorted by name. SIZE is the volume's size; USED is what its filesystem holds (only while it is mounted, else -); ALLOCATED is the space the pool gives it (shared blocks of clones and snapshots count for each); ORIGIN is the volume or VOLUME@SNAPSHOT a clone was made from; MOUNTS counts the containers using it.",
  examples: ["thinvol ls"],
  async run(ctx) {
    const reply = await ctx.client.call(VolumeListReply, "GET", "/v1/volumes");
    return { json: reply, text: volumeTable(reply.volumes) };
  },
};

export const inspect: Command = {
  name: "inspect",
  args: [{ name: "VOLUME", schema: VolumeName }],
  summary: "Show one volume as JSON",
  description:
    "Prints the volume as the admin API gives it, as JSON (with or without --json): sizes in bytes, the mountpoint and the filesystem's use while mounted, the origin of a clone, the names of its snapshots.",
  examples: ["thinvol inspect db"],
  async run(ctx, [volume = ""]) {
    const reply = await ctx.client.call(VolumeReply, "GET", `/v1/volumes/${seg(volume)}`);
    return { json: reply, text: json(reply) };
  },
};

export const resize: Command = {
  name: "resize",
  args: [
    { name: "VOLUME", schema: VolumeName },
    { name: "SIZE", schema: Size },
  ],
  summary: "Grow a volume and its filesystem",
  description:
    "Grows the volume to SIZE, and its filesystem with it, online if it is mounted (xfs always; ext4 only where the plugin holds CAP_SYS_RESOURCE, else once its containers are stopped). A volume never shrinks: a smaller SIZE is refused; its current size changes nothing. SIZE is a number with an optional unit in powers of 1024 (512M, 20G, 1T).",
  examples: ["thinvol resize db 20G"],
  async run(ctx, [volume = "", newSize = ""]) {
    const reply = await ctx.change(`resizing volume ${quote(volume)} to ${newSize}`, (onProgress) =>
      ctx.client.call(ResizeReply, "POST", `/v1/volumes/${seg(volume)}/resize`, { body: { size: newSize }, onProgress }),
    );
    const text =
      reply.previousSizeBytes === reply.sizeBytes
        ? `volume ${quote(reply.name)} is already ${formatSize(reply.sizeBytes)}: nothing to do\n`
        : `resized volume ${quote(reply.name)}: ${formatSize(reply.previousSizeBytes)} → ${formatSize(reply.sizeBytes)}\n`;
    return { json: reply, text };
  },
};

export const rollback: Command = {
  name: "rollback",
  args: [
    { name: "VOLUME", schema: VolumeName },
    { name: "SNAPSHOT", schema: SnapshotName },
  ],
  summary: "Put a volume back to one of its snapshots",
  description:
    "Puts the volume's data back to the snapshot, in place: same name, and the size the snapshot had. Everything written since the snapshot is lost. Refused while the volume is mounted: stop the containers using it first. The snapshot stays.",
  examples: ["thinvol rollback db before-upgrade"],
  async run(ctx, [volume = "", snapshot = ""]) {
    const reply = await ctx.change(`rolling volume ${quote(volume)} back to snapshot ${quote(snapshot)}`, (onProgress) =>
      ctx.client.call(VolumeReply, "POST", `/v1/volumes/${seg(volume)}/rollback`, { body: { snapshot }, onProgress }),
    );
    return { json: reply, text: `rolled volume ${quote(reply.name)} back to snapshot ${quote(snapshot)} (${formatSize(reply.sizeBytes)})\n` };
  },
};
