#!/usr/bin/env bash
# Integration tier: real loop devices, real mkfs and mounts, as root, with the loop pool driver.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" != 0 ]; then
  echo "test:integration needs root (loop devices, mkfs, mount)" >&2
  exit 1
fi
bash build/host-setup.sh
npm run -s build
# Test files given as arguments run alone; otherwise every file of the tier runs.
if [ $# -gt 0 ]; then files=("$@"); else files=(test/integration/*.test.ts); fi
exec node --import tsx --test --test-concurrency=1 --test-reporter=spec "${files[@]}"
