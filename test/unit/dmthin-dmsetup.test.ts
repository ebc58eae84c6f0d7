import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { listDevices, parseThinPoolStatus, parseThinPoolTable, parseThinStatus, thinPoolTable } from "../../src/system/dmsetup.js";
import { FakeRunner } from "../support/fake-runner.js";

describe("dmsetup output", () => {
  test("thin-pool status: transaction, metadata and data use, mode", () => {
    const s = parseThinPoolStatus("p", "0 2097152 thin-pool 7 139/512 1024/16384 - rw discard_passdown error_if_no_space - 128\n");
    assert.deepEqual(s, {
      transactionId: 7,
      metaUsedBlocks: 139,
      metaTotalBlocks: 512,
      dataUsedBlocks: 1024,
      dataTotalBlocks: 16384,
      mode: "rw",
      needsCheck: false,
      metadataSnapHeld: false,
    });
    assert.equal(parseThinPoolStatus("p", "0 8 thin-pool 0 1/2 16384/16384 - out_of_data_space discard_passdown error_if_no_space needs_check 1").mode, "out_of_data_space");
    assert.equal(parseThinPoolStatus("p", "0 8 thin-pool 0 1/2 3/4 - ro discard_passdown error_if_no_space needs_check 1").needsCheck, true);
  });

  test("thin-pool status: a reserved metadata snapshot shows as its held root (Debian's kernel, after reserve_metadata_snap)", () => {
    const s = parseThinPoolStatus("p", "0 2097152 thin-pool 0 422/4096 8/16384 51 rw discard_passdown queue_if_no_space - 1024 ");
    assert.equal(s.metadataSnapHeld, true);
    assert.equal(s.transactionId, 0);
  });

  test("a failed pool is reported, not misread", () => {
    assert.throws(() => parseThinPoolStatus("thinvol-pool", "0 2097152 thin-pool Fail"), /thinvol-pool has failed/);
    assert.throws(() => parseThinPoolStatus("x", "0 100 linear"), /not a thin-pool/);
  });

  test("thin status: mapped sectors and the highest mapped sector", () => {
    assert.deepEqual(parseThinStatus("v", "0 2097152 thin 1024 2047"), { mappedSectors: 1024, highestMappedSector: 2047 });
    assert.deepEqual(parseThinStatus("v", "0 2097152 thin 0 -"), { mappedSectors: 0, highestMappedSector: undefined });
  });

  test("thin-pool table round trip, with the feature count derived", () => {
    const text = thinPoolTable({ lengthSectors: 2097152, metaDevice: "/dev/loop1", dataDevice: "/dev/loop0", blockSizeSectors: 128, lowWaterBlocks: 1638, features: ["skip_block_zeroing", "error_if_no_space"] });
    assert.equal(text, "0 2097152 thin-pool /dev/loop1 /dev/loop0 128 1638 2 skip_block_zeroing error_if_no_space");
    const t = parseThinPoolTable("p", "0 2097152 thin-pool 7:1 7:0 128 1638 2 skip_block_zeroing error_if_no_space");
    assert.equal(t.metaDevice, "7:1");
    assert.equal(t.dataDevice, "7:0");
    assert.equal(t.blockSizeSectors, 128);
    assert.deepEqual(t.features, ["skip_block_zeroing", "error_if_no_space"]);
  });

  test("device list: none, and several", async () => {
    assert.equal((await listDevices(new FakeRunner(() => "No devices found"))).size, 0);
    const d = await listDevices(new FakeRunner(() => "thinvol-pool\t253\t0\tActive\t2\nthinvol-db\t253\t1\tSuspended\t1"));
    assert.deepEqual(d.get("thinvol-db"), { name: "thinvol-db", major: 253, minor: 1, suspended: true, openCount: 1 });
    assert.equal(d.get("thinvol-pool")?.openCount, 2);
  });
});
