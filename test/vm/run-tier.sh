#!/usr/bin/env bash
# The VM tier: dm-thin on a real kernel. Boots Debian's kernel in qemu (test/vm/vm.sh) and
# runs test/vm/tier-guest.sh inside: the pool conformance suite and the dm-thin specifics,
# the server tests and the end-to-end suite, all with the dm-thin pool driver.
#
# THINVOL_DMTHIN_ON_HOST=1: the host kernel has dm-thin (GitHub's runners); the same guest
# script runs directly on the host instead of in a VM.
set -euo pipefail
cd "$(dirname "$0")/../.."

[ "$(id -u)" = 0 ] || { echo "test:vm needs root" >&2; exit 1; }
if [ "${THINVOL_DMTHIN_ON_HOST:-0}" = 1 ]; then
  npm run -s build
  modprobe -a dm_thin_pool loop 2>/dev/null || true
  exec bash test/vm/tier-guest.sh
fi
bash test/vm/setup.sh
# The bundle and the plugin are built here, where it is fast; the e2e suite in the VM
# installs the plugin as it is.
npm run -s plugin
export THINVOL_PLUGIN_PREBUILT=1
# Well under CI's limit; the tier takes about ten minutes under software emulation.
export VM_TIMEOUT=${VM_TIMEOUT:-1500}
exec bash test/vm/vm.sh bash test/vm/tier-guest.sh
