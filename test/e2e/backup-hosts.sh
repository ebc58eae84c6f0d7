# shellcheck shell=bash
# What test/e2e/backup.test.ts needs beside the tier's engine (host A): a second private
# engine standing for another host (host B: its own data root, exec root, socket and pool),
# a backups directory both hosts' plugins mount (as an NFS share would be), and an S3
# server (s3rver) on the loopback, which the plugins reach through their host network.
# Source test/e2e/engine.sh and run.sh's install_from_registry first, then call
# backup_hosts_start (after the plugin is in the registry) and backup_hosts_stop.
#
# Exported for the scenarios:
#   E2E_HOST_B_DOCKER_HOST  host B's engine
#   E2E_S3_ENDPOINT         http://127.0.0.1:PORT (S3_ENDPOINT on both hosts)
# BACKUP_SETTINGS: the S3 settings both hosts' installs get. Both also get
# backups.source=$E2E_BACKUPS_SOURCE (run.sh), the directory they share.

# Host B's roots must not begin with host A's: runc (1.1) finds the mount a plugin's rootfs
# lies on by comparing path strings, so with A's data root /var/lib/thinvol-e2e mounted, a
# rootfs under /var/lib/thinvol-e2e-b fails with "pivot_root .: invalid argument".
E2E_HOST_B_DATA_ROOT="$(dirname "$E2E_DATA_ROOT")/host-b.$(basename "$E2E_DATA_ROOT")"
E2E_HOST_B_EXEC_ROOT="$(dirname "$E2E_EXEC_ROOT")/host-b.$(basename "$E2E_EXEC_ROOT")"
export E2E_HOST_B_DOCKER_HOST="unix://$E2E_HOST_B_EXEC_ROOT/docker.sock"
E2E_S3_PIDFILE="$E2E_EXEC_ROOT/s3rver.pid"
declare -a BACKUP_SETTINGS=()

# Runs one of engine.sh's functions with its variables pointing at host B.
on_host_b() {
  # shellcheck disable=SC2016 # expanded by the inner bash
  E2E_DATA_ROOT="$E2E_HOST_B_DATA_ROOT" E2E_EXEC_ROOT="$E2E_HOST_B_EXEC_ROOT" \
    bash -c 'set -euo pipefail; source "$E2E_ENGINE_SCRIPT"; "$@"' on_host_b "$@"
}

# s3rver (test/support/s3rver-main.mjs) on a free loopback port, its objects under the
# engine's data root. It stops when its stdin ends: a FIFO it holds open itself never does.
s3_start() {
  s3_stop
  local dir="$E2E_DATA_ROOT/s3rver" fifo="$E2E_EXEC_ROOT/s3rver.stdin" out="$E2E_EXEC_ROOT/s3rver.out"
  mkdir -p "$dir"
  rm -f "$fifo"
  mkfifo "$fifo"
  : >"$out"
  setsid node --openssl-legacy-provider test/support/s3rver-main.mjs "$dir" 0<>"$fifo" >"$out" 2>>"$E2E_EXEC_ROOT/s3rver.log" &
  echo $! >"$E2E_S3_PIDFILE"
  local deadline=$((SECONDS + 20)) port=
  until [[ -n $port ]]; do
    port=$(sed -n 's/^{"port":\([0-9][0-9]*\)}$/\1/p' "$out")
    if ((SECONDS > deadline)) || ! kill -0 "$(cat "$E2E_S3_PIDFILE")" 2>/dev/null; then
      tail -n 20 "$E2E_EXEC_ROOT/s3rver.log" >&2 || true
      engine_die "s3rver did not start (log: $E2E_EXEC_ROOT/s3rver.log)"
      return 1
    fi
    [[ -n $port ]] || sleep 0.2
  done
  export E2E_S3_ENDPOINT="http://127.0.0.1:$port"
  engine_log "s3rver up at $E2E_S3_ENDPOINT"
}

s3_stop() {
  [[ -f $E2E_S3_PIDFILE ]] || return 0
  local pid
  pid=$(cat "$E2E_S3_PIDFILE")
  # Only our server: a pidfile left by a killed run may name a process that reused the id.
  if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 's3rver-main\.mjs'; then
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 10))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$E2E_S3_PIDFILE" "$E2E_EXEC_ROOT/s3rver.stdin"
}

# Host B up with the busybox and PostgreSQL images and the plugin installed from the
# registry like host A's, with a pool of its own.
host_b_start() {
  on_host_b engine_fresh_start
  on_host_b engine_import_postgres "$E2E_PG_IMAGE"
  mkdir -p "$E2E_HOST_B_DATA_ROOT/plugins"
  DOCKER_HOST=$E2E_HOST_B_DOCKER_HOST E2E_LOG="$E2E_HOST_B_EXEC_ROOT/dockerd.log" install_from_registry "state.source=$E2E_HOST_B_DATA_ROOT/plugins" "POOL_DRIVER=${E2E_POOL_DRIVER:-loop}" \
    "POOL_SIZE=$E2E_POOL_SIZE" "LOG_LEVEL=debug" "backups.source=$E2E_BACKUPS_SOURCE" "${BACKUP_SETTINGS[@]}"
}

# Host B's volumes, plugin (and so its pool's loop devices), engine and roots.
host_b_stop() {
  [[ -d $E2E_HOST_B_DATA_ROOT || -d $E2E_HOST_B_EXEC_ROOT ]] || return 0
  on_host_b engine_remove_plugin "$E2E_PLUGIN"
  on_host_b engine_cleanup
  if [[ ${E2E_KEEP:-0} == 1 ]]; then
    engine_log "kept $E2E_HOST_B_DATA_ROOT (E2E_KEEP=1)"
  else
    rm -rf "$E2E_HOST_B_DATA_ROOT" "$E2E_HOST_B_EXEC_ROOT"
  fi
}

backup_hosts_start() {
  local start=$SECONDS
  s3_start
  # s3rver takes any secret but only this access key id.
  BACKUP_SETTINGS=("S3_ENDPOINT=$E2E_S3_ENDPOINT" "S3_REGION=us-east-1"
    "S3_ACCESS_KEY_ID=S3RVER" "S3_SECRET_ACCESS_KEY=S3RVER")
  host_b_start
  engine_log "host B ($E2E_HOST_B_DOCKER_HOST), s3rver and $E2E_BACKUPS_SOURCE ready in $((SECONDS - start)) s"
}

backup_hosts_stop() {
  host_b_stop
  s3_stop
}
