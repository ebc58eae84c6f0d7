#!/usr/bin/env bash
# Runs as root on a kernel with dm-thin (inside the VM, or on a host that has it): every
# suite that can prove the dm-thin driver, each reported by node's test runner.
set -uo pipefail
cd "$(dirname "$0")/../.."

export THINVOL_TEST_POOL_DRIVER=dm-thin
rc=0
suite() {
  echo "=== vm tier: $*"
  local start=$SECONDS
  if ! "$@"; then
    rc=1
    # A test file that dies from a signal shows only "test failed": the kernel says which signal
    # and where (a crash of node under software emulation, the OOM killer), so show what it said.
    echo "=== vm tier: the kernel's messages about killed or crashed processes:"
    dmesg | grep -iE 'segfault|traps:|general protection|invalid opcode|out of memory|killed process|oom-kill' | tail -20 || true
  fi
  echo "=== vm tier: $((SECONDS - start)) s"
}

suite node --import tsx --test --test-concurrency=1 --test-reporter=spec \
  test/vm/dmthin-smoke.test.ts test/vm/dmthin-conformance.test.ts test/vm/dmthin-specifics.test.ts \
  test/vm/dmthin-device.test.ts test/vm/dmthin-ops.test.ts test/vm/dmthin-backup.test.ts
suite node --import tsx --test --test-concurrency=1 --test-reporter=spec test/integration/server.test.ts test/integration/operations.test.ts test/integration/backup.test.ts
# The scenarios that depend on the pool driver: size limits and space, clones, restarts.
# (Option errors and mount sharing do not, and run in the e2e tier with the loop pool.)
# overlay2 cannot sit on the VM's overlay root, so the engine lives on /tmp (a tmpfs there).
# The plugin is created from plugin/ (E2E_INSTALL=create): the e2e tier proves the registry
# install, and pushing and pulling it under emulation would take minutes.
suite env E2E_INSTALL=create E2E_POOL_DRIVER=dm-thin E2E_DATA_ROOT=/tmp/thinvol-e2e E2E_TEST_TIMEOUT_MS=900000 \
  E2E_TESTS="test/e2e/capacity.test.ts test/e2e/clone.test.ts test/e2e/restart.test.ts test/e2e/operations.test.ts" bash test/e2e/run.sh
exit $rc
