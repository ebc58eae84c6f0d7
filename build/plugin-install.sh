#!/usr/bin/env bash
# Builds the plugin and (re)installs it into the Docker engine that DOCKER_HOST (or the
# default socket) points at, then enables it.
#
#   npm run plugin:install                              # thinvol with its defaults
#   npm run plugin:install -- POOL_SIZE=500G state.source=/srv/thinvol
#   PLUGIN_NAME=thinvol:dev PLUGIN_SETTINGS="POOL_DRIVER=loop LOG_LEVEL=debug" npm run plugin:install
#
# THINVOL_PLUGIN_PREBUILT=1 installs plugin/ as it is, without assembling it again.
#
# Settings are `docker plugin set` arguments (env KEY=value, or state.source=/dir for the
# state mount) and are applied while the plugin is still disabled, the only time Docker
# accepts them. PLUGIN_SETTINGS is split on whitespace; pass values containing spaces as
# positional arguments instead.
#
# Reinstalling removes the old plugin, not its data: pool files and volume records live
# in the state mount's source, outside the plugin's rootfs.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

readonly plugin_name=${PLUGIN_NAME:-thinvol}

log() { printf '[plugin-install] %s\n' "$*" >&2; }
die() { printf '[plugin-install] error: %s\n' "$*" >&2; exit 1; }
# Prints the command, runs it, and names it if it fails.
run() {
  log "\$ $*"
  "$@" || die "'$*' failed (exit $?)"
}

command -v docker >/dev/null 2>&1 || die "the docker CLI is not on PATH"

declare -a settings=()
if [[ -n ${PLUGIN_SETTINGS:-} ]]; then
  read -r -a settings <<<"$PLUGIN_SETTINGS"
fi
settings+=("$@")
for setting in "${settings[@]}"; do
  [[ $setting == *=* ]] || die "setting '$setting' is not KEY=value (e.g. POOL_SIZE=200G or state.source=/srv/thinvol)"
done

if ! docker_info=$(docker version --format '{{.Server.Version}}' 2>&1); then
  die "cannot reach the Docker engine at ${DOCKER_HOST:-the default socket}: $docker_info"
fi
log "engine ${DOCKER_HOST:-(default socket)} runs Docker $docker_info"

if [[ ${THINVOL_PLUGIN_PREBUILT:-0} == 1 ]]; then
  # The VM tier assembles plugin/ once on the host; rebuilding it under emulation is slow.
  [[ -f plugin/rootfs/thinvol.mjs ]] || die "THINVOL_PLUGIN_PREBUILT=1 but plugin/rootfs holds no bundle; run npm run plugin"
  log "using the plugin already assembled in plugin/ (THINVOL_PLUGIN_PREBUILT=1)"
else
  run npm run --silent plugin
fi

# A plugin of another architecture would install, then fail to start with "exec format error".
plugin_arch=$(sed -n 's/^ARCH=//p' plugin/rootfs/etc/thinvol-release 2>/dev/null || true)
engine_arch=$(docker version --format '{{.Server.Arch}}')
if [[ -n $plugin_arch && $plugin_arch != "$engine_arch" ]]; then
  die "plugin/ holds a linux/$plugin_arch plugin and the engine runs on $engine_arch: build it with PLUGIN_ARCH=$engine_arch npm run plugin"
fi

# `docker plugin inspect` fails when the plugin does not exist; that is the only
# check needed, so its message is not shown.
if docker plugin inspect --format '{{.Name}}' "$plugin_name" >/dev/null 2>&1; then
  log "plugin $plugin_name exists: replacing it"
  if [[ $(docker plugin inspect --format '{{.Enabled}}' "$plugin_name") == true ]]; then
    run docker plugin disable -f "$plugin_name"
  fi
  run docker plugin rm -f "$plugin_name"
fi

run docker plugin create "$plugin_name" plugin/

if [[ ${#settings[@]} -gt 0 ]]; then
  run docker plugin set "$plugin_name" "${settings[@]}"
fi

# Enabling starts the server; Docker gives up if the socket does not answer in time.
log "\$ docker plugin enable --timeout 60 $plugin_name"
if ! docker plugin enable --timeout 60 "$plugin_name"; then
  die "docker plugin enable $plugin_name failed; the plugin's own output is in the Docker daemon's log (journalctl -u docker, or dockerd's stderr)"
fi
docker plugin ls --filter "capability=volumedriver" >&2
log "done: docker volume create -d $plugin_name -o size=10G <name>"
