#!/usr/bin/env bash
# End-to-end tests: a private Docker engine, the freshly built plugin installed with
# build/plugin-install.sh, containers from an offline busybox image, and scenarios
# that check what a user would see. Everything started here is stopped on exit.
#
# Environment:
#   E2E_POOL_DRIVER  the pool driver (default loop; the VM tier, which also runs on hosts
#                    with dm-thin, sets dm-thin)
#   E2E_POOL_SIZE    POOL_SIZE for the plugin (default 4G)
#   E2E_TESTS        the scenario files to run (default every test/e2e/*.test.ts)
#   E2E_TEST_TIMEOUT_MS  a scenario that takes longer has hung (default 300000; the VM,
#                    under software emulation, needs more)
#   E2E_PLUGIN       plugin name (default thinvol-e2e)
#   E2E_KEEP=1       keep the engine's data root after the run, for a post-mortem
#   THINVOL_BUNDLE   install this server file instead of a fresh build (see build/plugin.sh)
# Extra arguments are passed to node's test runner (e.g. --test-name-pattern=clone).
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo_root"
# shellcheck source=test/e2e/engine.sh
source test/e2e/engine.sh

log() { printf '[e2e] %s\n' "$*" >&2; }
die() { printf '[e2e] error: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "the end-to-end tests start dockerd and need root (sudo -E npm run test:e2e)"

export E2E_POOL_SIZE=${E2E_POOL_SIZE:-4G}
export E2E_PLUGIN=${E2E_PLUGIN:-thinvol-e2e}
# The plugin's STATE_DIR default is /var/lib/docker-plugins/thinvol inside, the state
# mount's destination being /var/lib/docker-plugins; on the host that is:
export E2E_STATE_DIR="$E2E_DATA_ROOT/plugins/thinvol"
export E2E_ENGINE_SCRIPT="$repo_root/test/e2e/engine.sh"
E2E_TAP="$E2E_EXEC_ROOT/scenarios.tap"

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  log "cleaning up"
  engine_remove_plugin "$E2E_PLUGIN"
  engine_cleanup
  if [[ ${E2E_KEEP:-0} == 1 ]]; then
    log "kept $E2E_DATA_ROOT (E2E_KEEP=1)"
  else
    rm -rf "$E2E_DATA_ROOT" "$E2E_EXEC_ROOT"
  fi
  exit "$rc"
}

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
engine_fresh_start

# Installs the plugin with a fresh pool (engine_fresh_start emptied the data root) of the
# given driver and runs every scenario.
run_scenarios() {
  export E2E_POOL_DRIVER=$1
  shift
  log "installing the plugin as $E2E_PLUGIN (POOL_DRIVER=$E2E_POOL_DRIVER POOL_SIZE=$E2E_POOL_SIZE)"
  PLUGIN_NAME=$E2E_PLUGIN bash build/plugin-install.sh \
    "state.source=$E2E_DATA_ROOT/plugins" \
    "POOL_DRIVER=$E2E_POOL_DRIVER" \
    "POOL_SIZE=$E2E_POOL_SIZE" \
    "LOG_LEVEL=debug"

  log "running the scenarios with the $E2E_POOL_DRIVER pool"
  local status=0
  local -a files
  read -r -a files <<<"${E2E_TESTS:-$(echo test/e2e/*.test.ts)}"
  # The TAP copy keeps what spec leaves out when a scenario file dies: its exit code, the
  # signal that ended it, and its stderr.
  node --import tsx --test --test-concurrency=1 --test-reporter=spec --test-reporter-destination=stdout \
    --test-reporter=tap --test-reporter-destination="$E2E_TAP" \
    --test-timeout="${E2E_TEST_TIMEOUT_MS:-300000}" "$@" "${files[@]}" || status=$?
  if ((status != 0)); then
    log "scenarios failed with the $E2E_POOL_DRIVER pool; what the test runner recorded of each failure:"
    grep -E -A14 '^not ok' "$E2E_TAP" | grep -E "^not ok|exitCode|signal|error|stderr|^    [^ ]" >&2 || true
    log "the last lines of the engine's log (plugin output included):"
    tail -n 60 "$E2E_LOG" >&2 || true
  fi
  return "$status"
}

driver=${E2E_POOL_DRIVER:-loop}
run_scenarios "$driver" "$@" || die "scenarios failed with the $driver pool"
log "all scenarios passed with the $driver pool"
