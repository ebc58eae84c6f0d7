#!/usr/bin/env bash
# End-to-end tests: a private Docker engine, a real image registry beside it, the freshly
# built plugin pushed there with every tag a release pushes (build/plugin-push.sh) and
# installed from it the way the README tells users (`docker plugin install --alias ...
# --grant-all-permissions REPOSITORY:VERSION SETTING=value...`), containers from an
# offline busybox image, and scenarios that check what a user would see. Everything
# started here is stopped on exit.
#
# What is built and pushed to the registry (127.0.0.1:<free port>/thinvol):
#   plugin/             this version (package.json's) for this machine (amd64): installed
#   dist/plugin-arm64/  this version for the other architecture (arm64), whose tools are
#                       run under qemu user emulation when it is built
#   dist/plugin-next/   the next version, a pre-release (0.1.0 -> 0.1.1-rc.1), for this
#                       machine: test/e2e/upgrade.test.ts upgrades to it and back
#
# For test/e2e/backup.test.ts (registry install only): a second private engine with the
# plugin installed the same way (host B), an S3 server (s3rver) on the loopback, and a
# backups directory both hosts' plugins mount (test/e2e/backup-hosts.sh).
#
# Environment:
#   E2E_INSTALL      registry (default) or create: `docker plugin create` from plugin/ with
#                    build/plugin-install.sh, no registry (the VM tier, where pushing and
#                    pulling under emulation would cost minutes)
#   E2E_POOL_DRIVER  the pool driver (default loop; the VM tier, which also runs on hosts
#                    with dm-thin, sets dm-thin)
#   E2E_POOL_SIZE    POOL_SIZE for the plugin (default 4G)
#   E2E_TESTS        the scenario files to run (default every test/e2e/*.test.ts)
#   E2E_TEST_TIMEOUT_MS  a scenario that takes longer has hung (default 300000; the VM,
#                    under software emulation, needs more)
#   E2E_PLUGIN       the plugin's name, its --alias (default thinvol-e2e)
#   E2E_KEEP=1       keep the engine's data root after the run, for a post-mortem
#   THINVOL_BUNDLE   install this server file instead of a fresh build (see build/plugin.sh)
# Extra arguments are passed to node's test runner (e.g. --test-name-pattern=clone).
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo_root"
# shellcheck source=test/e2e/engine.sh
source test/e2e/engine.sh
# shellcheck source=test/e2e/registry.sh
source test/e2e/registry.sh

log() { printf '[e2e] %s\n' "$*" >&2; }
die() { printf '[e2e] error: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "the end-to-end tests start dockerd and need root (sudo -E npm run test:e2e)"

export E2E_INSTALL=${E2E_INSTALL:-registry}
[[ $E2E_INSTALL == registry || $E2E_INSTALL == create ]] || die "E2E_INSTALL=$E2E_INSTALL: registry or create"
export E2E_POOL_SIZE=${E2E_POOL_SIZE:-4G}
export E2E_PLUGIN=${E2E_PLUGIN:-thinvol-e2e}
# The plugin's STATE_DIR default is /var/lib/docker-plugins/thinvol inside, the state
# mount's destination being /var/lib/docker-plugins; on the host that is:
export E2E_STATE_SOURCE="$E2E_DATA_ROOT/plugins"
export E2E_STATE_DIR="$E2E_STATE_SOURCE/thinvol"
export E2E_ENGINE_SCRIPT="$repo_root/test/e2e/engine.sh"
export E2E_PG_IMAGE=thinvol-e2e/postgres:15
# The backups mount's source (its default, /var/lib/docker/plugins, exists only where an
# engine has the default data root); test/e2e/backup.test.ts's two hosts share it.
export E2E_BACKUPS_SOURCE="$E2E_DATA_ROOT-backups"
# shellcheck source=test/e2e/backup-hosts.sh
source test/e2e/backup-hosts.sh
E2E_TAP="$E2E_EXEC_ROOT/scenarios.tap"

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  log "cleaning up"
  backup_hosts_stop
  engine_remove_plugin "$E2E_PLUGIN"
  registry_stop
  engine_cleanup
  if [[ ${E2E_KEEP:-0} == 1 ]]; then
    log "kept $E2E_DATA_ROOT (E2E_KEEP=1)"
  else
    rm -rf "$E2E_DATA_ROOT" "$E2E_EXEC_ROOT" "$E2E_BACKUPS_SOURCE"
  fi
  exit "$rc"
}

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
registry_stop
backup_hosts_stop
engine_fresh_start
rm -rf "$E2E_BACKUPS_SOURCE"
mkdir -p "$E2E_BACKUPS_SOURCE"

read -r -a scenario_files <<<"${E2E_TESTS:-$(echo test/e2e/*.test.ts)}"
wants() { [[ " ${scenario_files[*]} " == *" test/e2e/$1 "* ]]; }

# Builds this version for both architectures and the next version, pushes every tag a
# release would push to the test's registry, and exports what the scenarios need to know.
publish_to_registry() {
  export E2E_VERSION E2E_NEXT_VERSION E2E_REPOSITORY E2E_PUSHED_TAGS="$E2E_EXEC_ROOT/pushed-tags"
  E2E_VERSION=$(node -p 'require("./package.json").version')
  # The next patch release, as a pre-release: it must not move :latest, :amd64 or :arm64.
  # shellcheck disable=SC2016 # a JavaScript template string
  E2E_NEXT_VERSION=$(node -p 'const [a, b, c] = require("./package.json").version.split("-")[0].split(".").map(Number); `${a}.${b}.${c + 1}-rc.1`')
  local host_arch other_arch
  host_arch=$(dpkg --print-architecture)
  other_arch=arm64
  [[ $host_arch != arm64 ]] || other_arch=amd64
  # The next version first: each build writes dist/thinvol.mjs, which is left as this version's.
  log "building the next version, $E2E_NEXT_VERSION ($host_arch), and $E2E_VERSION for $other_arch and $host_arch"
  THINVOL_VERSION=$E2E_NEXT_VERSION PLUGIN_DIR=dist/plugin-next bash build/plugin.sh
  PLUGIN_ARCH=$other_arch PLUGIN_DIR=dist/plugin-$other_arch bash build/plugin.sh
  if [[ ${THINVOL_PLUGIN_PREBUILT:-0} == 1 ]]; then
    log "using the plugin already assembled in plugin/ (THINVOL_PLUGIN_PREBUILT=1)"
  else
    bash build/plugin.sh
  fi
  registry_start
  E2E_REPOSITORY=$E2E_REGISTRY/thinvol
  local start=$SECONDS
  bash build/plugin-push.sh "$E2E_REPOSITORY" plugin "dist/plugin-$other_arch" dist/plugin-next >"$E2E_PUSHED_TAGS"
  log "pushed $(wc -l <"$E2E_PUSHED_TAGS") tags in $((SECONDS - start)) s: $(sed 's/.*://' "$E2E_PUSHED_TAGS" | xargs)"
}

# Installs the plugin the way the README tells users to: from the registry, under an
# alias, permissions granted, settings given to the install itself.
install_from_registry() {
  local ref="$E2E_REPOSITORY:$E2E_VERSION"
  log "\$ docker plugin install --alias $E2E_PLUGIN --grant-all-permissions $ref $*"
  docker plugin install --alias "$E2E_PLUGIN" --grant-all-permissions "$ref" "$@" >&2 ||
    die "docker plugin install $ref failed; the plugin's own output is in $E2E_LOG"
}

# The README's Compose example is run by Debian's Compose.
if wants compose.test.ts && ! command -v docker-compose >/dev/null 2>&1; then
  log "installing docker-compose"
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends docker-compose </dev/null
fi

if [[ $E2E_INSTALL == registry ]]; then
  publish_to_registry
  if wants upgrade.test.ts || wants operations.test.ts || wants backup.test.ts; then engine_import_postgres "$E2E_PG_IMAGE"; fi
  # A second host, an S3 server and a backups directory both hosts share; both installs get
  # BACKUP_SETTINGS. The scenarios skip themselves without them (E2E_INSTALL=create).
  if wants backup.test.ts; then backup_hosts_start; fi
fi

# Installs the plugin with a fresh pool (engine_fresh_start emptied the data root) of the
# given driver and runs every scenario.
run_scenarios() {
  export E2E_POOL_DRIVER=$1
  shift
  local -a settings=("state.source=$E2E_STATE_SOURCE" "POOL_DRIVER=$E2E_POOL_DRIVER" "POOL_SIZE=$E2E_POOL_SIZE" "LOG_LEVEL=debug"
    "backups.source=$E2E_BACKUPS_SOURCE" "${BACKUP_SETTINGS[@]}")
  if [[ $E2E_INSTALL == registry ]]; then
    install_from_registry "${settings[@]}"
  else
    log "installing the plugin as $E2E_PLUGIN with docker plugin create (POOL_DRIVER=$E2E_POOL_DRIVER POOL_SIZE=$E2E_POOL_SIZE)"
    PLUGIN_NAME=$E2E_PLUGIN bash build/plugin-install.sh "${settings[@]}"
  fi

  log "running the scenarios with the $E2E_POOL_DRIVER pool"
  local status=0
  # The TAP copy keeps what spec leaves out when a scenario file dies: its exit code, the
  # signal that ended it, and its stderr.
  node --import tsx --test --test-concurrency=1 --test-reporter=spec --test-reporter-destination=stdout \
    --test-reporter=tap --test-reporter-destination="$E2E_TAP" \
    --test-timeout="${E2E_TEST_TIMEOUT_MS:-300000}" "$@" "${scenario_files[@]}" || status=$?
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

# The release's last check, on this run's registry: so that it is known to work before a
# release depends on it.
if [[ $E2E_INSTALL == registry && -z ${E2E_TESTS:-} ]]; then
  bash test/e2e/smoke.sh "$E2E_REPOSITORY:$E2E_VERSION" || die "the release's smoke test (test/e2e/smoke.sh) failed"
fi
