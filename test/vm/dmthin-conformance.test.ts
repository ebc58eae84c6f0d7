/**
 * The shared pool conformance suite against the dm-thin driver on a real kernel.
 * Run as root inside the VM:
 *   npm run vm -- node --import tsx --test test/vm/dmthin-conformance.test.ts
 */
import { join } from "node:path";
import { createLogger } from "../../src/log.js";
import { DmThinPool } from "../../src/pool/dmthin/index.js";
import { ExecaRunner } from "../../src/system/runner.js";
import { poolConformance } from "../support/pool-conformance.js";

const NAME = "tvconf";
const runner = new ExecaRunner();
const log = createLogger(process.env["LOG_LEVEL"] === "debug" ? "debug" : "warn");

async function dmDevices(): Promise<string[]> {
  const { stdout } = await runner.run("dmsetup", ["ls"]);
  return stdout
    .split("\n")
    .map((l) => l.split(/\s+/)[0] ?? "")
    .filter((n) => n.startsWith(`${NAME}-`));
}

async function loopsUnder(dir: string): Promise<string[]> {
  const { stdout } = await runner.run("losetup", ["--list", "--noheadings", "--raw", "--output", "NAME,BACK-FILE"]);
  return stdout.split("\n").filter((l) => (l.split(" ")[1] ?? "").startsWith(dir));
}

poolConformance({
  label: "dm-thin",
  make: (dir, dataSizeBytes) => new DmThinPool({ runner, dir, dataSizeBytes, log, name: NAME }),
  // What a reboot does: volumes, then the pool, then its loop devices go away.
  async tearDown(dir) {
    const names = await dmDevices();
    for (const n of names.filter((n) => n !== `${NAME}-pool`)) await runner.run("dmsetup", ["remove", "--noudevsync", n]);
    if (names.includes(`${NAME}-pool`)) await runner.run("dmsetup", ["remove", "--noudevsync", `${NAME}-pool`]);
    for (const file of ["data.img", "meta.img"]) {
      const { stdout } = await runner.run("losetup", ["--list", "--noheadings", "--output", "NAME", "--associated", join(dir, file)]);
      for (const dev of stdout.split("\n").map((l) => l.trim()).filter(Boolean)) await runner.run("losetup", ["--detach", dev]);
    }
  },
  async leftovers(dir) {
    return [...(await dmDevices()), ...(await loopsUnder(dir))];
  },
});
