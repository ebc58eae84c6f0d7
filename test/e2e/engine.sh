# shellcheck shell=bash
# A private Docker engine for the end-to-end tests and the benchmark: its own
# data root, exec root, pidfile and socket, so it never touches (or is touched by)
# a Docker engine the machine may already run. Source this file, then call
# engine_start / engine_stop / engine_cleanup.
#
# Environment (all optional):
#   E2E_DATA_ROOT   engine data root        (default /var/lib/thinvol-e2e)
#   E2E_EXEC_ROOT   engine exec root, pidfile, socket and log (default /run/thinvol-e2e)
#   E2E_IMAGE       tag of the offline busybox image (default thinvol-e2e/busybox:latest)

E2E_DATA_ROOT=${E2E_DATA_ROOT:-/var/lib/thinvol-e2e}
E2E_EXEC_ROOT=${E2E_EXEC_ROOT:-/run/thinvol-e2e}
E2E_IMAGE=${E2E_IMAGE:-thinvol-e2e/busybox:latest}
E2E_SOCKET="$E2E_EXEC_ROOT/docker.sock"
E2E_PIDFILE="$E2E_EXEC_ROOT/dockerd.pid"
E2E_LOG="$E2E_EXEC_ROOT/dockerd.log"
export DOCKER_HOST="unix://$E2E_SOCKET"
export E2E_DATA_ROOT E2E_EXEC_ROOT E2E_IMAGE E2E_SOCKET E2E_LOG

engine_log() { printf '[engine] %s\n' "$*" >&2; }
engine_die() { printf '[engine] error: %s\n' "$*" >&2; return 1; }

# Installs what the tests need from Debian/Ubuntu packages when it is missing.
# dpkg's lock is waited for, because another apt run may be in progress.
engine_install_packages() {
  local -a missing=()
  command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  busybox_static_path >/dev/null || missing+=(busybox-static)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  command -v apt-get >/dev/null 2>&1 || engine_die "missing ${missing[*]} and no apt-get to install them" || return 1
  engine_log "installing ${missing[*]}"
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}"
}

# The path of a statically linked busybox, or failure.
busybox_static_path() {
  local candidate
  for candidate in /bin/busybox /usr/bin/busybox; do
    if [[ -x $candidate ]] && ! ldd "$candidate" >/dev/null 2>&1; then
      printf '%s\n' "$candidate"
      return 0
    fi
  done
  return 1
}

engine_running() {
  [[ -f $E2E_PIDFILE ]] && kill -0 "$(cat "$E2E_PIDFILE")" 2>/dev/null
}

# Starts dockerd and waits until it answers. Containers use --network none, so the
# engine needs neither a bridge nor iptables rules on the host.
engine_start() {
  if engine_running; then
    engine_die "an engine already runs with pidfile $E2E_PIDFILE (pid $(cat "$E2E_PIDFILE")); stop it first (test/e2e/run.sh cleans up on exit)"
    return 1
  fi
  mkdir -p "$E2E_DATA_ROOT" "$E2E_EXEC_ROOT"
  # An empty config file keeps the host's /etc/docker/daemon.json out of the test.
  printf '{}\n' >"$E2E_EXEC_ROOT/daemon.json"
  local -a args=(
    --config-file "$E2E_EXEC_ROOT/daemon.json"
    --data-root "$E2E_DATA_ROOT"
    --exec-root "$E2E_EXEC_ROOT/exec"
    --pidfile "$E2E_PIDFILE"
    -H "unix://$E2E_SOCKET"
    --iptables=false
    --ip-forward=false
    --ip-masq=false
    --bridge=none
    --userland-proxy=false
    # Where a system containerd runs (GitHub's runners), dockerd uses it instead of
    # starting its own; namespaces of our own keep the two engines' containers apart.
    --containerd-namespace "$(basename "$E2E_EXEC_ROOT")"
    --containerd-plugins-namespace "$(basename "$E2E_EXEC_ROOT")-plugins"
  )
  engine_log "starting dockerd (log: $E2E_LOG)"
  # Only this start's part of the log counts when looking for a failure.
  local log_offset
  log_offset=$(stat -c %s "$E2E_LOG" 2>/dev/null || echo 0)
  # setsid: the engine gets its own session, so a Ctrl-C in the test run does not
  # kill it before the cleanup trap can disable the plugin properly.
  setsid dockerd "${args[@]}" >>"$E2E_LOG" 2>&1 </dev/null &
  local deadline=$((SECONDS + 60))
  until docker version --format '{{.Server.Version}}' >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then
      tail -n 30 "$E2E_LOG" >&2 || true
      engine_die "dockerd did not answer on $E2E_SOCKET within 60 s"
      return 1
    fi
    if tail -c +"$((log_offset + 1))" "$E2E_LOG" 2>/dev/null | grep -q 'failed to start daemon'; then
      tail -n 30 "$E2E_LOG" >&2 || true
      engine_die "dockerd could not start (see $E2E_LOG)"
      return 1
    fi
    sleep 0.5
  done
  engine_log "dockerd $(docker version --format '{{.Server.Version}}') up at $DOCKER_HOST"
}

# Stops dockerd: SIGTERM, then SIGKILL after 30 s. Data and volumes stay.
engine_stop() {
  engine_running || return 0
  local pid
  pid=$(cat "$E2E_PIDFILE")
  engine_log "stopping dockerd (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 30))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS > deadline)); then
      engine_log "dockerd did not stop in 30 s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    sleep 0.2
  done
  # dockerd leaves its managed containerd to exit on its own.
  local cpid
  cpid=$(cat "$E2E_EXEC_ROOT/exec/containerd/containerd.pid" 2>/dev/null || true)
  if [[ -n $cpid ]] && kill -0 "$cpid" 2>/dev/null; then
    deadline=$((SECONDS + 15))
    while kill -0 "$cpid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    kill -KILL "$cpid" 2>/dev/null || true
  fi
}

# Imports a tiny image from the host's static busybox: no registry needed.
engine_import_image() {
  if docker image inspect "$E2E_IMAGE" >/dev/null 2>&1; then return 0; fi
  local busybox dir
  busybox=$(busybox_static_path) || { engine_die "no statically linked busybox (apt-get install busybox-static)"; return 1; }
  dir=$(mktemp -d)
  mkdir -p "$dir"/{bin,etc,tmp,proc,sys,dev}
  cp "$busybox" "$dir/bin/busybox"
  local applet
  while IFS= read -r applet; do
    [[ -n $applet && $applet != busybox ]] && ln -sf busybox "$dir/bin/$applet"
  done < <("$busybox" --list)
  printf 'root:x:0:0:root:/root:/bin/sh\n' >"$dir/etc/passwd"
  printf 'root:x:0:\n' >"$dir/etc/group"
  chmod 1777 "$dir/tmp"
  tar -C "$dir" -c . | docker import --change 'ENV PATH=/bin' --change 'CMD ["/bin/sh"]' - "$E2E_IMAGE" >/dev/null
  rm -rf "$dir"
  engine_log "imported $E2E_IMAGE from $busybox"
}

# Imports a PostgreSQL 15 image built from Debian's packages with mmdebstrap (no image
# registry needed), as IMAGE. The root filesystem is built once and kept as a tarball in
# /var/cache/thinvol (about 20 s to build; THINVOL_IMAGE_CACHE to put it elsewhere).
# Containers run `postgres` as the postgres user; PATH has PostgreSQL's bin directory.
engine_import_postgres() {
  local image=$1
  docker image inspect "$image" >/dev/null 2>&1 && return 0
  local cache=${THINVOL_IMAGE_CACHE:-/var/cache/thinvol}/postgres-15.tar
  if [[ ! -s $cache ]]; then
    if ! command -v mmdebstrap >/dev/null 2>&1; then
      DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends mmdebstrap </dev/null >/dev/null
    fi
    local debian_suite debian_sources debian_aptopts
    # shellcheck source=build/debian-apt.sh
    source "$(dirname "${BASH_SOURCE[0]}")/../../build/debian-apt.sh"
    debian_apt
    mkdir -p "$(dirname "$cache")"
    engine_log "building a PostgreSQL 15 image from Debian $debian_suite with mmdebstrap (once; kept in $cache)"
    mmdebstrap --quiet --format=tar --variant=apt --include=postgresql-15 "${debian_aptopts[@]}" \
      "$debian_suite" "$cache.partial" "${debian_sources[@]}" </dev/null >/dev/null ||
      { engine_die "mmdebstrap could not build the PostgreSQL image"; return 1; }
    mv "$cache.partial" "$cache"
  fi
  docker import --change 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/sbin:/usr/bin:/sbin:/bin' "$cache" "$image" >/dev/null
  engine_log "imported $image from $cache"
}

# Removes every container and volume, then the plugin, while the engine still runs,
# so that the plugin releases its own devices.
engine_remove_plugin() {
  local plugin_name=$1
  engine_running || return 0
  local -a leftovers
  mapfile -t leftovers < <(docker ps -aq 2>/dev/null || true)
  if ((${#leftovers[@]} > 0)); then docker rm -f "${leftovers[@]}" >/dev/null 2>&1 || true; fi
  mapfile -t leftovers < <(docker volume ls -q 2>/dev/null || true)
  if ((${#leftovers[@]} > 0)); then docker volume rm -f "${leftovers[@]}" >/dev/null 2>&1 || true; fi
  docker plugin disable -f "$plugin_name" >/dev/null 2>&1 || true
  docker plugin rm -f "$plugin_name" >/dev/null 2>&1 || true
}

# Everything the engine and the plugin may leave behind: mounts under the engine's
# roots, device-mapper devices and loop devices backed by files in the data root.
# Only devices traced back to this engine's data root are touched, so other work on
# the machine (integration tests, a VM) is left alone.
engine_cleanup() {
  engine_stop || true
  local target
  # Deepest first; lazy, because a dying process may still hold one. Whole path components
  # only: /var/lib/thinvol-e2e-backups is not under /var/lib/thinvol-e2e.
  while IFS= read -r target; do
    umount -l "$target" 2>/dev/null || true
  done < <(findmnt -rn -o TARGET | awk -v a="$E2E_DATA_ROOT" -v b="$E2E_EXEC_ROOT" '$0 == a || $0 == b || index($0, a "/") == 1 || index($0, b "/") == 1' | sort -r)

  engine_release_devices
}

# Device-mapper and loop devices traced back to files in this engine's data root (a
# plugin's pool): after the plugin has stopped they are only leftovers.
engine_release_devices() {
  # Loop devices whose backing file is in the data root, then loop devices whose
  # backing file sits on one of those (the loop driver's volume images).
  local -A ours=()
  local name back_dev back_ino majmin root_dev
  [[ -d $E2E_DATA_ROOT ]] || return 0
  root_dev=$(stat -c '%Hd:%Ld' "$E2E_DATA_ROOT")
  while read -r name back_dev back_ino majmin; do
    # Same filesystem as the data root, and an inode that is a file inside it.
    if [[ $back_dev == "$root_dev" && -n $back_ino ]] &&
      [[ -n $(find "$E2E_DATA_ROOT" -xdev -inum "$back_ino" -print -quit 2>/dev/null) ]]; then
      ours[$name]=$majmin
    fi
  done < <(losetup -l -n -O NAME,BACK-MAJ:MIN,BACK-INO,MAJ:MIN 2>/dev/null)
  local -a nested=()
  local -A our_majmins=()
  for name in "${!ours[@]}"; do our_majmins[${ours[$name]}]=1; done
  while read -r name back_dev back_ino majmin; do
    if [[ -n ${our_majmins[$back_dev]:-} ]]; then nested+=("$name"); fi
  done < <(losetup -l -n -O NAME,BACK-MAJ:MIN,BACK-INO,MAJ:MIN 2>/dev/null)

  # Device-mapper devices (dm-thin pool and thin volumes) that depend, directly or
  # through each other, on our loop devices; removed holders first.
  if command -v dmsetup >/dev/null 2>&1 && [[ -e /dev/mapper/control ]]; then
    local -A kernel_ours=() dm_ours=()
    for name in "${!ours[@]}"; do kernel_ours[$(basename "$name")]=1; done
    local pass dm dep grew
    for pass in 1 2 3 4 5; do
      grew=0
      while read -r dm _; do
        [[ -n $dm && -z ${dm_ours[$dm]:-} ]] || continue
        for dep in $(dmsetup deps -o devname "$dm" 2>/dev/null | grep -o '([^)]*)' | tr -d '()'); do
          if [[ -n ${kernel_ours[$dep]:-} ]]; then
            dm_ours[$dm]=1
            kernel_ours[$(dmsetup info -c --noheadings -o blkdevname "$dm" 2>/dev/null || echo "$dm")]=1
            grew=1
          fi
        done
      done < <(dmsetup ls 2>/dev/null | grep -v '^No devices found')
      ((grew)) || break
    done
    for pass in 1 2 3 4 5; do
      for dm in "${!dm_ours[@]}"; do
        if dmsetup remove "$dm" >/dev/null 2>&1; then
          unset "dm_ours[$dm]"
          engine_log "removed device-mapper device $dm"
        fi
      done
      ((${#dm_ours[@]} == 0)) && break
    done
  fi

  for name in "${nested[@]}" "${!ours[@]}"; do
    losetup -d "$name" 2>/dev/null || true
  done
  if ((${#ours[@]} + ${#nested[@]} > 0)); then
    engine_log "detached loop devices: ${nested[*]} ${!ours[*]}"
  fi
}

# Run as a command (`bash test/e2e/engine.sh restart`), for the tests that restart
# the engine from TypeScript.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  set -euo pipefail
  case ${1:-} in
    start) engine_start ;;
    stop) engine_stop ;;
    restart) engine_stop && engine_start ;;
    cleanup) engine_cleanup ;;
    *) echo "usage: $0 start|stop|restart|cleanup" >&2; exit 2 ;;
  esac
fi

# A fresh engine with the test image: whatever a killed earlier run left (its engine,
# mounts, devices, roots) goes first. Callers set their EXIT trap before calling this.
engine_fresh_start() {
  engine_cleanup
  rm -rf "$E2E_DATA_ROOT" "$E2E_EXEC_ROOT"
  engine_install_packages
  engine_start
  engine_import_image
}
