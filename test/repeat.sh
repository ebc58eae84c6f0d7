#!/usr/bin/env bash
# Stability: runs the integration and e2e tiers N times in a row (default 10) and stops at
# the first failure, naming the round and the tier. A test that fails once in N runs is a
# defect of the product or of the test, to be found, not retried.
#   npm run test:repeat -- 10
set -uo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-10}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "usage: npm run test:repeat -- N (a positive number of rounds)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "test:repeat needs root (the integration and e2e tiers)" >&2; exit 1; }
logdir=$(mktemp -d /tmp/thinvol-repeat.XXXXXX)
start=$SECONDS
for ((round = 1; round <= rounds; round++)); do
  for tier in integration e2e; do
    log="$logdir/$round-$tier.log"
    t0=$SECONDS
    if ! bash "test/$tier/run.sh" >"$log" 2>&1; then
      grep -E "^ℹ (pass|fail)|^✖" "$log" | head -20
      echo "test:repeat: round $round of $rounds: the $tier tier failed after $((SECONDS - t0)) s (log: $log)"
      exit 1
    fi
    echo "round $round/$rounds: $tier passed ($(sed -n 's/^ℹ pass //p' "$log" | awk '{s+=$1} END {print s+0}') tests, $((SECONDS - t0)) s)"
  done
done
echo "test:repeat: $rounds rounds of integration and e2e passed in $((SECONDS - start)) s (logs: $logdir)"
