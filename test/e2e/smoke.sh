#!/usr/bin/env bash
# Smoke test of a published plugin: a fresh private Docker engine installs REFERENCE from
# its registry the way the README says, then a volume is created, mounted by a container,
# written, read back by another, and removed. Everything started here is stopped on exit.
# The release workflow runs it on what it has just pushed; the e2e tier runs it on its own
# registry's push, so the release's last check is itself tested.
#
#   bash test/e2e/smoke.sh docker.io/acme/thinvol:1.2.3
#
# The registry's login, if it needs one, is the docker CLI's (DOCKER_CONFIG).
# SMOKE_DATA_ROOT / SMOKE_EXEC_ROOT: the engine's roots (default /var/lib/thinvol-smoke,
# /run/thinvol-smoke), apart from the e2e tier's.
set -euo pipefail

[[ $# -eq 1 ]] || { echo "usage: $0 REPOSITORY:TAG" >&2; exit 2; }
readonly reference=$1
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo_root"
export E2E_DATA_ROOT=${SMOKE_DATA_ROOT:-/var/lib/thinvol-smoke}
export E2E_EXEC_ROOT=${SMOKE_EXEC_ROOT:-/run/thinvol-smoke}
unset DOCKER_HOST
# shellcheck source=test/e2e/engine.sh
source test/e2e/engine.sh

readonly plugin=thinvol-smoke volume=smoke
log() { printf '[smoke] %s\n' "$*" >&2; }
die() { printf '[smoke] error: %s\n' "$*" >&2; exit 1; }
run() {
  log "\$ $*"
  "$@" || die "'$*' failed"
}

[[ $(id -u) -eq 0 ]] || die "the smoke test starts dockerd and needs root"

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if ((rc != 0)); then
    log "the engine's last lines (plugin output included):"
    tail -n 40 "$E2E_LOG" >&2 || true
  fi
  engine_remove_plugin "$plugin"
  engine_cleanup
  rm -rf "$E2E_DATA_ROOT" "$E2E_EXEC_ROOT"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
engine_fresh_start

start=$SECONDS
mkdir -p "$E2E_DATA_ROOT/plugins"
# Both mounts' default source, /var/lib/docker/plugins, exists only where an engine has the
# default data root.
run docker plugin install --alias "$plugin" --grant-all-permissions "$reference" \
  "state.source=$E2E_DATA_ROOT/plugins" "backups.source=$E2E_DATA_ROOT/plugins" POOL_SIZE=2G
[[ $(docker plugin inspect -f '{{.Enabled}} {{.PluginReference}}' "$plugin") == "true $reference" ]] ||
  die "the plugin is not enabled from $reference: $(docker plugin inspect -f '{{.Enabled}} {{.PluginReference}}' "$plugin")"

run docker volume create -d "$plugin" -o size=64M "$volume"
token=$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')
run docker run --rm --network none -v "$volume:/d" "$E2E_IMAGE" sh -c "echo $token > /d/token && sync"
read_back=$(docker run --rm --network none -v "$volume:/d" "$E2E_IMAGE" cat /d/token) || die "reading the volume back failed"
[[ $read_back == "$token" ]] || die "the volume gave back '$read_back', not '$token'"
size=$(docker volume inspect -f '{{json .Status.sizeBytes}}' "$volume")
[[ $size == 67108864 ]] || die "the volume's size is $size bytes, not 64 MiB"
run docker volume rm "$volume"
if docker volume ls -q | grep -qx "$volume"; then die "the volume is still listed after docker volume rm"; fi
run docker plugin disable "$plugin"
run docker plugin rm "$plugin"
log "ok: $reference installed from its registry; a volume was created, mounted, written, read and removed ($((SECONDS - start)) s)"
