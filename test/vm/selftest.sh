#!/usr/bin/env bash
# Checks that the VM harness works: exit status, environment, closed stdin, dm-thin end to
# end and dockerd inside the VM. Takes a few minutes under TCG.
#
#   bash test/vm/selftest.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
vm=$here/vm.sh
fails=0
check() { # check <name> <command...>: run, report
  local name=$1 start=$SECONDS
  shift
  if "$@"; then echo "ok   $name ($((SECONDS - start))s)"; else echo "FAIL $name"; fails=$((fails + 1)); fi
}

t_true() { bash "$vm" true </dev/null; }
t_status() { local rc=0; bash "$vm" sh -c 'exit 7' </dev/null || rc=$?; [[ $rc == 7 ]]; }
t_env() {
  local out
  out=$(cd / && CI=true THINVOL_X="a b'c" VM_ENV=SELFTEST_Y SELFTEST_Y=y SELFTEST_Z=z \
    bash "$vm" sh -c 'echo "$CI|$THINVOL_X|$SELFTEST_Y|${SELFTEST_Z-unset}|$(pwd)|$(id -u)|$HOME"' </dev/null)
  [[ $out == "true|a b'c|y|unset|/|0|/root" ]] || { echo "got: $out"; return 1; }
}
t_node() { [[ $(bash "$vm" node -e 'console.log(1+1)' </dev/null) == 2 ]]; }
t_guest() {
  local share=${VM_SHARE_DIR:-$here/../../.cache/vm/out}
  mkdir -p "$share"
  share=$(cd "$share" && pwd)
  local result=$share/selftest.result
  rm -f "$result"
  bash "$vm" bash "$here/selftest-guest.sh" "$result" </dev/null && [[ $(<"$result") == OK ]]
}

check "boot and run true" t_true
check "exit status 7 passes through" t_status
check "environment, cwd, root" t_env
check "node runs in the VM" t_node
check "dm-thin and dockerd in the VM" t_guest
((fails == 0)) && echo "selftest: all OK" || { echo "selftest: $fails failed"; exit 1; }
