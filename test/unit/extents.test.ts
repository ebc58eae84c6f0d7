import assert from "node:assert/strict";
import { test } from "node:test";
import { gapsBetween, parseFiemap } from "../../src/system/extents.js";

test("fiemap output: extents in bytes, holes left out", () => {
  const text = ["pool.img:", " 0: [0..2047]: 96..2143", " 1: [2048..4095]: hole", " 2: [4096..4103]: 8192..8199"].join("\n");
  assert.deepEqual(parseFiemap(text), [
    { fileOffset: 0, deviceOffset: 96 * 512, length: 2048 * 512 },
    { fileOffset: 4096 * 512, deviceOffset: 8192 * 512, length: 8 * 512 },
  ]);
});

test("the gaps between ranges: unsorted and overlapping ranges, ranges past the end", () => {
  assert.deepEqual(gapsBetween([], 100), [{ offset: 0, length: 100 }]);
  assert.deepEqual(
    gapsBetween(
      [
        { offset: 50, length: 10 },
        { offset: 10, length: 20 },
        { offset: 20, length: 15 },
      ],
      100,
    ),
    [
      { offset: 0, length: 10 },
      { offset: 35, length: 15 },
      { offset: 60, length: 40 },
    ],
  );
  assert.deepEqual(gapsBetween([{ offset: 0, length: 100 }], 100), []);
  assert.deepEqual(gapsBetween([{ offset: 90, length: 50 }], 100), [{ offset: 0, length: 90 }]);
});
