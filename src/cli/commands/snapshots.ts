import { quote } from "../../errors.js";
import { formatSize } from "../../size.js";
import { seg, type Command } from "../command.js";
import { size, table, time } from "../format.js";
import { EmptyReply, SnapshotListReply, SnapshotReply, type Snapshot } from "../replies.js";
import { SnapshotName, VolumeName } from "../validate.js";

export function snapshotTable(snapshots: readonly Snapshot[]): string {
  return table(
    [{ title: "VOLUME" }, { title: "NAME" }, { title: "CREATED" }, { title: "SIZE", right: true }, { title: "ALLOCATED", right: true }],
    snapshots.map((s) => [s.volume, s.name, time(s.createdAt), size(s.sizeBytes), size(s.allocatedBytes)]),
  );
}

export const snapshotCreate: Command = {
  name: "snapshot create",
  args: [
    { name: "VOLUME", schema: VolumeName },
    { name: "NAME", schema: SnapshotName },
  ],
  summary: "Take a snapshot of a volume",
  description:
    "Takes a point-in-time snapshot of the volume, named NAME (the volume name rules apply). A mounted volume is frozen for the instant of the copy. The snapshot shares every block with the volume until either is written.",
  examples: ["thinvol snapshot create db before-upgrade"],
  async run(ctx, [volume = "", name = ""]) {
    const snapshot = await ctx.change(`taking snapshot ${quote(name)} of volume ${quote(volume)}`, (onProgress) =>
      ctx.client.call(SnapshotReply, "POST", `/v1/volumes/${seg(volume)}/snapshots`, { body: { name }, onProgress }),
    );
    return {
      json: snapshot,
      text: `created snapshot ${quote(snapshot.name)} of volume ${quote(snapshot.volume)} (${formatSize(snapshot.sizeBytes)})\n`,
    };
  },
};

export const snapshotLs: Command = {
  name: "snapshot ls",
  args: [{ name: "VOLUME", schema: VolumeName, optional: true }],
  summary: "List snapshots, of every volume or of one",
  description:
    "Lists snapshots sorted by volume, then name. SIZE is the volume's size when the snapshot was taken; ALLOCATED is the space the pool gives it (blocks shared with the volume count too).",
  examples: ["thinvol snapshot ls", "thinvol snapshot ls db"],
  async run(ctx, [volume]) {
    const query = volume === undefined ? "" : `?volume=${seg(volume)}`;
    const reply = await ctx.client.call(SnapshotListReply, "GET", `/v1/snapshots${query}`);
    return { json: reply, text: snapshotTable(reply.snapshots) };
  },
};

export const snapshotRm: Command = {
  name: "snapshot rm",
  args: [
    { name: "VOLUME", schema: VolumeName },
    { name: "NAME", schema: SnapshotName },
  ],
  summary: "Remove a snapshot",
  description: "Removes the snapshot NAME of the volume and gives its blocks back to the pool. A snapshot that does not exist is an error.",
  examples: ["thinvol snapshot rm db before-upgrade"],
  async run(ctx, [volume = "", name = ""]) {
    const reply = await ctx.change(`removing snapshot ${quote(name)} of volume ${quote(volume)}`, (onProgress) =>
      ctx.client.call(EmptyReply, "DELETE", `/v1/volumes/${seg(volume)}/snapshots/${seg(name)}`, { onProgress }),
    );
    return { json: reply, text: `removed snapshot ${quote(name)} of volume ${quote(volume)}\n` };
  },
};
