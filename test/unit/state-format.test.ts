/**
 * Downgrades: a version may open a pool that a newer version used as long as it reads the
 * pool's state format; a pool in a newer format is refused, untouched, with the version
 * to go back to.
 */
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { StateFormatError } from "../../src/errors.js";
import { STATE_FORMAT, STATE_FORMAT_FILE, checkStateFormat } from "../../src/state-format.js";

const dirs: string[] = [];
after(() => Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true }))));

async function stateDir(marker?: object): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "thinvol-format-"));
  dirs.push(dir);
  if (marker !== undefined) await writeFile(join(dir, STATE_FORMAT_FILE), JSON.stringify(marker));
  return dir;
}

const readMarker = async (dir: string): Promise<unknown> => JSON.parse(await readFile(join(dir, STATE_FORMAT_FILE), "utf8"));

test("a new pool, or one made before the format file, is recorded in this format", async () => {
  const dir = await stateDir();
  await checkStateFormat(dir, "0.1.0");
  assert.deepEqual(await readMarker(dir), { format: STATE_FORMAT, writtenBy: "0.1.0" });
});

test("an upgrade or a downgrade within the format opens the pool and records the version", async () => {
  const dir = await stateDir({ format: STATE_FORMAT, writtenBy: "0.2.0" });
  await checkStateFormat(dir, "0.1.0");
  assert.deepEqual(await readMarker(dir), { format: STATE_FORMAT, writtenBy: "0.1.0" });
  await checkStateFormat(dir, "0.3.0");
  assert.deepEqual(await readMarker(dir), { format: STATE_FORMAT, writtenBy: "0.3.0" });
});

test("a pool in a newer format is refused, names both versions and is left as it was", async () => {
  const future = { format: STATE_FORMAT + 1, writtenBy: "9.0.0" };
  const dir = await stateDir(future);
  await assert.rejects(checkStateFormat(dir, "0.1.0"), (err: Error) => {
    assert.ok(err instanceof StateFormatError);
    assert.match(err.message, /last used by thinvol 9\.0\.0, which keeps it in state format 2; this is thinvol 0\.1\.0, which reads format 1 at most/);
    assert.match(err.message, /Go back to thinvol 9\.0\.0 or later: .*docker plugin upgrade/);
    return true;
  });
  assert.deepEqual(await readMarker(dir), future);
});

test("a damaged format file is an error naming the file, not a fresh start", async () => {
  const dir = await stateDir({ format: "two" });
  await assert.rejects(checkStateFormat(dir, "0.1.0"), new RegExp(`format file ${join(dir, STATE_FORMAT_FILE)} is damaged`));
});
