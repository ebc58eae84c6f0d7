#!/usr/bin/env bash
# The whole test suite: every tier, in order, then one closing line with the totals.
#   unit         pure logic and command sequences against fakes
#   integration  root, real loop devices, mkfs and mounts, the real server bundle
#   e2e          a real dockerd with the real plugin bundle installed
#   vm           the same against dm-thin on Debian's kernel inside qemu
# A tier is skipped only when asked: THINVOL_SKIP_INTEGRATION=1, THINVOL_SKIP_E2E=1, THINVOL_SKIP_VM=1.
set -uo pipefail
cd "$(dirname "$0")/.."

logdir=$(mktemp -d /tmp/thinvol-tests.XXXXXX)
failed_tiers=()
declare -A seconds

tier() {
  local name=$1; shift
  local skip_var="THINVOL_SKIP_${name^^}"
  if [ "${!skip_var:-}" = 1 ]; then
    echo "=== tier $name: skipped ($skip_var=1)"
    return
  fi
  echo "=== tier $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$logdir/$name.log"
  local rc=${PIPESTATUS[0]}
  seconds[$name]=$((SECONDS - start))
  echo "=== tier $name: exit $rc after ${seconds[$name]} s"
  [ "$rc" = 0 ] || failed_tiers+=("$name")
}

if [ "$(id -u)" = 0 ]; then
  bash build/host-setup.sh || failed_tiers+=(host-setup)
fi

tier unit npm run -s test:unit
tier integration bash test/integration/run.sh
tier e2e bash test/e2e/run.sh
tier vm bash test/vm/run-tier.sh

# Node's spec reporter closes each run with "ℹ pass N", "ℹ fail N", "ℹ skipped N".
sum() { cat "$logdir"/*.log 2>/dev/null | sed -n "s/^ℹ $1 \([0-9]*\)$/\1/p" | awk '{s+=$1} END {print s+0}'; }
passed=$(sum pass)
failed=$(( $(sum fail) + $(sum cancelled) ))
skipped=$(sum skipped)
echo
for t in "${!seconds[@]}"; do echo "tier $t: ${seconds[$t]} s"; done
if [ ${#failed_tiers[@]} -gt 0 ]; then
  echo "failed tiers: ${failed_tiers[*]} (logs in $logdir)"
  # A tier that died before its tests ran still fails the run.
  [ "$failed" -gt 0 ] || failed=1
fi
echo "thinvol: $passed passed, $failed failed, $skipped skipped"
[ ${#failed_tiers[@]} -eq 0 ]
