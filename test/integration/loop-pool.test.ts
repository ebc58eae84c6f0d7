import { LoopPool } from "../../src/pool/loop.js";
import { silentLogger } from "../../src/log.js";
import { ExecaRunner } from "../../src/system/runner.js";
import { poolConformance } from "../support/pool-conformance.js";
import { loopDevicesUnder, mountsUnder, tearDownPool } from "../support/kernel.js";

poolConformance({
  label: "loop",
  make: (dir, dataSizeBytes) => new LoopPool({ runner: new ExecaRunner(), dir, dataSizeBytes, log: silentLogger }),
  tearDown: (dir) => tearDownPool(dir),
  leftovers: async (dir) => [...(await loopDevicesUnder(dir)), ...(await mountsUnder(dir))],
});
