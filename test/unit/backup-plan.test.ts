import assert from "node:assert/strict";
import { test } from "node:test";
import {
  allBlocks, allocatedBlocks, blocksTouching, changedBlocksFromExtents, changedBlocksFromThinDelta, parseThinDelta, readThinDelta,
} from "../../src/backup/plan.js";
import { FakeRunner } from "../support/fake-runner.js";

const MiB = 1024 * 1024;
const g = { sizeBytes: 10 * MiB + 512, blockSizeBytes: 2 * MiB }; // 6 blocks, the last 512 bytes

/** As thin-provisioning-tools prints it (tests/thin_delta.rs and delta_visitor.rs): 64 KiB pool blocks. */
const DELTA = `<superblock uuid="" time="3" transaction="4" data_block_size="128" nr_data_blocks="16384">
  <diff left="1" right="2">
    <same begin="0" length="32"/>
    <different begin="32" length="1"/>
    <same begin="33" length="31"/>
    <right_only begin="64" length="40"/>
    <left_only begin="150" length="2"/>
  </diff>
</superblock>`;

test("thin_delta output: the pool block size and every run", () => {
  const delta = parseThinDelta(DELTA);
  assert.equal(delta.dataBlockSizeSectors, 128);
  assert.deepEqual(delta.ranges, [
    { kind: "same", begin: 0, length: 32 },
    { kind: "different", begin: 32, length: 1 },
    { kind: "same", begin: 33, length: 31 },
    { kind: "right_only", begin: 64, length: 40 },
    { kind: "left_only", begin: 150, length: 2 },
  ]);
});

test("thin_delta --verbose output: runs inside a section element", () => {
  const verbose = `<superblock uuid="" time="1" transaction="2" data_block_size="256" nr_data_blocks="100">
  <diff left="3" right="4">
    <different>
      <range begin="0" left_data_begin="10" right_data_begin="20" length="2"/>
    </different>
    <right_only>
      <range begin="7" data_begin="30" length="1"/>
    </right_only>
    <same>
      <range begin="8" data_begin="31" length="5"/>
    </same>
  </diff>
</superblock>`;
  assert.deepEqual(parseThinDelta(verbose), {
    dataBlockSizeSectors: 256,
    ranges: [
      { kind: "different", begin: 0, length: 2 },
      { kind: "right_only", begin: 7, length: 1 },
      { kind: "same", begin: 8, length: 5 },
    ],
  });
});

test("thin_delta output that is not what it should be is refused", () => {
  assert.throws(() => parseThinDelta("thin_delta: no such device"), /no <superblock/);
  assert.throws(() => parseThinDelta(`<superblock data_block_size="128"><different begin="x" length="1"/></superblock>`), /begin="x", not a number/);
  assert.throws(() => parseThinDelta(`<superblock data_block_size="128"><same begin="1"/></superblock>`), /length=null/);
});

test("changed pool blocks map to backup blocks; same runs are not read; left_only runs are (to drop them)", () => {
  // 64 KiB pool blocks: 32 per 2 MiB backup block. Pool block 32 is in backup block 1;
  // 64..103 in 2..3; 150..151 are in backup block 4.
  const blocks = changedBlocksFromThinDelta(parseThinDelta(DELTA), { sizeBytes: 20 * MiB, blockSizeBytes: 2 * MiB });
  assert.deepEqual(blocks, [1, 2, 3, 4]);
});

test("a pool block larger than a backup block marks every backup block it covers", () => {
  const delta = { dataBlockSizeSectors: 8192, ranges: [{ kind: "different" as const, begin: 1, length: 1 }] }; // 4 MiB pool blocks
  assert.deepEqual(changedBlocksFromThinDelta(delta, { sizeBytes: 16 * MiB, blockSizeBytes: 2 * MiB }), [2, 3]);
});

test("thin_delta runs with its arguments as an array, on the metadata snapshot", async () => {
  const runner = new FakeRunner((command) => (command === "thin_delta" ? DELTA : ""));
  const delta = await readThinDelta(runner, "/dev/loop7", 1, 2);
  assert.equal(delta.ranges.length, 5);
  assert.deepEqual(runner.calls, [["thin_delta", "--metadata-snap", "--snap1", "1", "--snap2", "2", "/dev/loop7"]]);
});

test("byte ranges to blocks: edges, overlaps, ranges past the end, the short last block", () => {
  assert.deepEqual(blocksTouching([{ offset: 0, length: 1 }], g), [0]);
  assert.deepEqual(blocksTouching([{ offset: 2 * MiB - 1, length: 2 }], g), [0, 1]);
  assert.deepEqual(blocksTouching([{ offset: 2 * MiB, length: 2 * MiB }], g), [1]);
  assert.deepEqual(blocksTouching([{ offset: 9 * MiB, length: 100 * MiB }, { offset: 3 * MiB, length: 1 }], g), [1, 4, 5]);
  assert.deepEqual(blocksTouching([{ offset: 50 * MiB, length: 1 }, { offset: 0, length: 0 }], g), []);
  assert.deepEqual(allBlocks(g), [0, 1, 2, 3, 4, 5]);
});

test("loop pool: a first backup reads the blocks the image has allocated", () => {
  const extents = [
    { fileOffset: 0, deviceOffset: 100 * MiB, length: 64 * 1024 },
    { fileOffset: 6 * MiB, deviceOffset: 300 * MiB, length: 3 * MiB },
  ];
  assert.deepEqual(allocatedBlocks(extents, g), [0, 3, 4]);
});

test("loop pool: an incremental backup reads what no longer shares its place on the device with the previous snapshot", () => {
  const previous = [
    { fileOffset: 0, deviceOffset: 100 * MiB, length: 4 * MiB }, // blocks 0-1
    { fileOffset: 8 * MiB, deviceOffset: 200 * MiB, length: 2 * MiB }, // block 4, punched since
  ];
  const current = [
    { fileOffset: 0, deviceOffset: 100 * MiB, length: 2 * MiB }, // block 0 shared: unchanged
    { fileOffset: 2 * MiB, deviceOffset: 500 * MiB, length: 4 * 1024 }, // block 1 rewritten (copy on write)
    { fileOffset: 2 * MiB + 4096, deviceOffset: 100 * MiB + 2 * MiB + 4096, length: 2 * MiB - 4096 }, // rest of block 1 shared
    { fileOffset: 6 * MiB, deviceOffset: 600 * MiB, length: 4096 }, // block 3 new
  ];
  assert.deepEqual(changedBlocksFromExtents(previous, current, g), [1, 3, 4]);
  assert.deepEqual(changedBlocksFromExtents(previous, previous, g), []);
});
