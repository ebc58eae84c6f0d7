#!/usr/bin/env bash
# The VM tier: dm-thin on a real kernel. Boots Debian's kernel in qemu (test/vm/vm.sh) and
# runs test/vm/tier-guest.sh inside: the pool conformance suite and the dm-thin specifics,
# the server tests and the end-to-end suite, all with the dm-thin pool driver. Then, from
# this host, the power-cut proof (test/vm/powercut.test.ts): VM boots on a persistent disk
# whose power is cut at random points, for both pool drivers (about 5 minutes under TCG).
#
# THINVOL_DMTHIN_ON_HOST=1: the host kernel has dm-thin (GitHub's runners); the same guest
# script runs directly on the host instead of in a VM. The power-cut proof still needs qemu
# (it resets its VM) and runs where qemu-system-x86_64 is installed.
set -euo pipefail
cd "$(dirname "$0")/../.."

[ "$(id -u)" = 0 ] || { echo "test:vm needs root" >&2; exit 1; }

powercut() {
  echo "=== vm tier: power cuts (test/vm/powercut.test.ts)"
  local start=$SECONDS rc=0
  node --import tsx --test --test-reporter=spec test/vm/powercut.test.ts || rc=$?
  echo "=== vm tier: $((SECONDS - start)) s"
  return "$rc"
}

rc=0
if [ "${THINVOL_DMTHIN_ON_HOST:-0}" = 1 ]; then
  npm run -s build
  modprobe -a dm_thin_pool loop 2>/dev/null || true
  bash test/vm/tier-guest.sh || rc=1
  if command -v qemu-system-x86_64 >/dev/null; then
    powercut || rc=1
  else
    echo "=== vm tier: power cuts not run: no qemu-system-x86_64 here (bash test/vm/setup.sh installs it)"
  fi
  exit $rc
fi
bash test/vm/setup.sh
# The bundle and the plugin are built here, where it is fast; the e2e suite in the VM
# installs the plugin as it is, and the power-cut guest runs the same bundle.
npm run -s plugin
export THINVOL_PLUGIN_PREBUILT=1
# Well under CI's limit; the tier takes about ten minutes under software emulation. The pools'
# reserved files live on the VM's tmpfs, that is in its memory: give it room.
export VM_MEMORY=${VM_MEMORY:-8G}
VM_TIMEOUT=${VM_TIMEOUT:-1500} bash test/vm/vm.sh bash test/vm/tier-guest.sh || rc=1
powercut || rc=1
exit $rc
