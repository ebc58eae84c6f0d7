#!/usr/bin/env bash
# Benchmark: thinvol against Docker's local driver on a private engine (the same kind
# the end-to-end tests use). Prints figures only; nothing is asserted, because timings
# depend on the machine.
#
#   sudo -E npm run bench
#
# Environment:
#   BENCH_POOL_DRIVER  pool driver for thinvol (default loop)
#   BENCH_POOL_SIZE    POOL_SIZE (default 8G)
#   BENCH_REPEAT       repetitions of the short operations; the median is printed (default 5)
#   BENCH_MIB          size of the throughput and clone data in MiB (default 256)
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo_root"
# Own roots, so a benchmark and an end-to-end run never share an engine.
export E2E_DATA_ROOT=${BENCH_DATA_ROOT:-/var/lib/thinvol-bench}
export E2E_EXEC_ROOT=${BENCH_EXEC_ROOT:-/run/thinvol-bench}
# shellcheck source=test/e2e/engine.sh
source test/e2e/engine.sh

readonly plugin=${BENCH_PLUGIN:-thinvol-bench}
readonly pool_driver=${BENCH_POOL_DRIVER:-loop}
readonly pool_size=${BENCH_POOL_SIZE:-8G}
readonly repeat=${BENCH_REPEAT:-5}
readonly mib=${BENCH_MIB:-256}

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] error: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "the benchmark starts dockerd and needs root (sudo -E npm run bench)"

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  log "cleaning up"
  engine_remove_plugin "$plugin"
  engine_cleanup
  rm -rf "$E2E_DATA_ROOT" "$E2E_EXEC_ROOT"
  exit "$rc"
}

now_ns() { date +%s%N; }

# Milliseconds a command takes; its output is discarded, a failure stops the bench.
time_ms() {
  local start end
  start=$(now_ns)
  "$@" >/dev/null 2>"$E2E_EXEC_ROOT/bench-stderr" || die "'$*' failed: $(cat "$E2E_EXEC_ROOT/bench-stderr")"
  end=$(now_ns)
  echo $(((end - start) / 1000000))
}

median() {
  printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}

# Drops the page cache so a read measures the device, not memory; not every
# environment allows it, and the figure then says so.
drop_caches() {
  sync
  if echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then echo dropped; else echo "not dropped"; fi
}

mib_per_s() { awk -v mib="$1" -v ms="$2" 'BEGIN { if (ms <= 0) print "n/a"; else printf "%.0f", mib * 1000 / ms }'; }

run_container() {
  docker run --rm --network none -v "$1:/d" "$E2E_IMAGE" true
}

# Measures one driver; prints one line per figure.
bench_driver() {
  local driver=$1 label=$2
  local -a create_ms=() run_ms=() exec_ms=() opts=()
  [[ $driver == local ]] || opts=(-o size=2G)
  local i name
  for ((i = 0; i < repeat; i++)); do
    name="bench-$label-$i"
    create_ms+=("$(time_ms docker volume create -d "$driver" "${opts[@]}" "$name")")
    run_ms+=("$(time_ms run_container "$name")")
  done
  printf '%-8s %-42s %8s ms\n' "$label" "docker volume create (median of $repeat)" "$(median "${create_ms[@]}")"
  printf '%-8s %-42s %8s ms\n' "$label" "docker run --rm -v vol:/d true (median)" "$(median "${run_ms[@]}")"

  # Throughput, timed from the host around `docker exec` in a running container, less
  # the cost of an empty exec.
  local vol="bench-$label-0" holder="bench-$label-holder"
  docker run -d --name "$holder" --network none -v "$vol:/d" "$E2E_IMAGE" sleep 3600 >/dev/null
  for ((i = 0; i < repeat; i++)); do exec_ms+=("$(time_ms docker exec "$holder" true)"); done
  local base write read caches
  base=$(median "${exec_ms[@]}")
  write=$(time_ms docker exec "$holder" dd if=/dev/zero of=/d/data bs=1M count="$mib" conv=fsync)
  caches=$(drop_caches)
  read=$(time_ms docker exec "$holder" dd if=/d/data of=/dev/null bs=1M)
  printf '%-8s %-42s %8s MiB/s (%s ms)\n' "$label" "sequential write + fsync, $mib MiB" "$(mib_per_s "$mib" $((write - base)))" $((write - base))
  printf '%-8s %-42s %8s MiB/s (%s ms, page cache %s)\n' "$label" "sequential read, $mib MiB" "$(mib_per_s "$mib" $((read - base)))" $((read - base)) "$caches"
  docker rm -f "$holder" >/dev/null

  if [[ $driver == local ]]; then
    printf '%-8s %-42s %8s\n' "$label" "clone" "n/a (the local driver has no clone)"
  else
    local empty_clone full_clone
    empty_clone=$(time_ms docker volume create -d "$driver" -o from="bench-$label-1" "bench-$label-clone-empty")
    full_clone=$(time_ms docker volume create -d "$driver" -o from="$vol" "bench-$label-clone-full")
    printf '%-8s %-42s %8s ms\n' "$label" "clone of an empty volume" "$empty_clone"
    printf '%-8s %-42s %8s ms\n' "$label" "clone of a volume holding $mib MiB" "$full_clone"
  fi
}

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
engine_fresh_start
log "installing the plugin as $plugin (POOL_DRIVER=$pool_driver POOL_SIZE=$pool_size)"
PLUGIN_NAME=$plugin bash build/plugin-install.sh \
  "state.source=$E2E_DATA_ROOT/plugins" "POOL_DRIVER=$pool_driver" "POOL_SIZE=$pool_size" >/dev/null

printf '\nthinvol (pool driver %s) vs the local driver; %s, %s cores, kernel %s\n\n' \
  "$pool_driver" "$(docker version --format 'Docker {{.Server.Version}}')" "$(nproc)" "$(uname -r)"
bench_driver "$plugin" thinvol
echo
bench_driver local local
echo
