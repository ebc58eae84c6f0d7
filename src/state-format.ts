import { join } from "node:path";
import * as v from "valibot";
import { StateFormatError, ThinvolError, errorMessage } from "./errors.js";
import { readJsonFile, writeFileAtomic } from "./system/atomic-file.js";

/**
 * The format of everything under STATE_DIR (pool state, volume records, journals).
 * Raise it when a version writes state that an older version would misread (a record
 * field it would drop, a file it would take for a leftover): the older version then
 * refuses to start on that pool instead of damaging it. Downgrading to any version
 * that reads the current format is supported; nothing else is needed for it.
 */
export const STATE_FORMAT = 1;

/** The file in STATE_DIR that says which format the pool is in and who last opened it. */
export const STATE_FORMAT_FILE = "format.json";

const MarkerSchema = v.object({
  format: v.pipe(v.number(), v.integer(), v.minValue(1)),
  writtenBy: v.string(),
});

/**
 * Refuses a pool whose state a newer version wrote in a format this one cannot read;
 * otherwise records this version as the pool's last user. A pool without the file is
 * format 1 (made before the file existed, or new). Runs before anything reads the pool.
 */
export async function checkStateFormat(stateDir: string, version: string): Promise<void> {
  const path = join(stateDir, STATE_FORMAT_FILE);
  let raw: unknown;
  try {
    raw = await readJsonFile(path);
  } catch (err) {
    throw new ThinvolError(`cannot read the pool's format file ${path}: ${errorMessage(err)}`, { cause: err });
  }
  const parsed = raw === undefined ? undefined : v.safeParse(MarkerSchema, raw);
  if (parsed !== undefined && !parsed.success) {
    throw new ThinvolError(`the pool's format file ${path} is damaged: ${parsed.issues.map((i) => i.message).join("; ")}`);
  }
  const marker = parsed?.output ?? { format: 1, writtenBy: "unknown" };
  if (marker.format > STATE_FORMAT) {
    throw new StateFormatError(
      `the pool in ${stateDir} was last used by thinvol ${marker.writtenBy}, which keeps it in state format ${marker.format}; ` +
        `this is thinvol ${version}, which reads format ${STATE_FORMAT} at most, so it leaves the pool untouched. ` +
        `Go back to thinvol ${marker.writtenBy} or later: docker plugin disable -f <name>, ` +
        `docker plugin upgrade --skip-remote-check --grant-all-permissions <name> <repository>:<version>, docker plugin enable <name>`,
    );
  }
  if (parsed === undefined || marker.format !== STATE_FORMAT || marker.writtenBy !== version) {
    await writeFileAtomic(path, JSON.stringify({ format: STATE_FORMAT, writtenBy: version }) + "\n");
  }
}
