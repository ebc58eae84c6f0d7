# shellcheck shell=bash
# A real image registry for the end-to-end tests: Debian's docker-registry (the CNCF
# distribution registry) on a free loopback port, storing under the engine's data root.
# Docker treats 127.0.0.0/8 as an insecure registry by default, so plain HTTP needs no
# engine setting. Source test/e2e/engine.sh first, then this file, then call
# registry_start (sets and exports E2E_REGISTRY=127.0.0.1:PORT) and registry_stop.

E2E_REGISTRY_PIDFILE="$E2E_EXEC_ROOT/registry.pid"
E2E_REGISTRY_LOG="$E2E_EXEC_ROOT/registry.log"

registry_start() {
  if ! command -v docker-registry >/dev/null 2>&1; then
    engine_log "installing docker-registry"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends docker-registry </dev/null
  fi
  registry_stop
  mkdir -p "$E2E_EXEC_ROOT" "$E2E_DATA_ROOT/registry"
  local config="$E2E_EXEC_ROOT/registry.yml"
  # Port 0: the kernel picks a free port, which the registry prints; nothing else on the
  # machine (another test run, a registry of its own) can collide with it.
  cat >"$config" <<CONFIG
version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $E2E_DATA_ROOT/registry
  delete:
    enabled: true
http:
  addr: 127.0.0.1:0
CONFIG
  : >"$E2E_REGISTRY_LOG"
  setsid docker-registry serve "$config" >>"$E2E_REGISTRY_LOG" 2>&1 </dev/null &
  echo $! >"$E2E_REGISTRY_PIDFILE"
  local deadline=$((SECONDS + 30)) port=
  until [[ -n $port ]]; do
    port=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$E2E_REGISTRY_LOG" | head -n 1)
    if ((SECONDS > deadline)) || ! kill -0 "$(cat "$E2E_REGISTRY_PIDFILE")" 2>/dev/null; then
      tail -n 20 "$E2E_REGISTRY_LOG" >&2 || true
      engine_die "docker-registry did not start (log: $E2E_REGISTRY_LOG)"
      return 1
    fi
    [[ -n $port ]] || sleep 0.2
  done
  # It prints the address once it listens.
  E2E_REGISTRY="127.0.0.1:$port"
  export E2E_REGISTRY
  engine_log "registry up at $E2E_REGISTRY (docker-registry $(docker-registry --version 2>/dev/null | awk '{print $NF}'))"
}

registry_stop() {
  [[ -f $E2E_REGISTRY_PIDFILE ]] || return 0
  local pid
  pid=$(cat "$E2E_REGISTRY_PIDFILE")
  # Only our registry: a pidfile left by a killed run may name a process that reused the id.
  if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == docker-registry ]]; then
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 10))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$E2E_REGISTRY_PIDFILE"
}
