#!/usr/bin/env bash
# Benchmark: thinvol against Docker's local driver on a private engine (the same kind
# the end-to-end tests use). Prints figures only; nothing is asserted, because timings
# depend on the machine.
#
#   sudo -E npm run bench
#   sudo -E npm run bench -- --scale N    N volumes through the server's socket (test/bench/scale.ts)
#   sudo -E npm run bench -- --layers     where an fsync goes, layer by layer (test/bench/layers.sh)
#   sudo -E npm run bench -- --vm         dm-thin's ratios, in the VM (test/bench/vm.sh)
#   sudo -E npm run bench -- --backup     backups of 1 GiB of data, full, 1% incremental, restore (test/bench/backup.ts)
#
# Environment:
#   BENCH_POOL_DRIVER  pool driver for thinvol (default loop)
#   BENCH_POOL_SIZE    POOL_SIZE (default 8G)
#   BENCH_REPEAT       repetitions of the short operations; the median is printed (default 5)
#   BENCH_MIB          size of fio's file and of the full clone's data in MiB (default 256)
#   BENCH_FIO_SECONDS  length of each random-I/O fio run (default 15)
#   BENCH_PG_SCALE / BENCH_PG_SECONDS   pgbench scale (default 20) and length (default 30)
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo_root"
case ${1:-} in
  --scale)
    [[ $# -eq 2 ]] || { echo "usage: npm run bench -- --scale N" >&2; exit 2; }
    npm run --silent build >/dev/null
    exec node --import tsx test/bench/scale.ts "$2"
    ;;
  --layers) exec bash test/bench/layers.sh ;;
  --vm) exec bash test/bench/vm.sh ;;
  --backup)
    npm run --silent build >/dev/null
    exec node --import tsx test/bench/backup.ts
    ;;
  "") ;;
  *) echo "usage: npm run bench [-- --scale N | --layers | --vm | --backup]" >&2; exit 2 ;;
esac
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
readonly fio_seconds=${BENCH_FIO_SECONDS:-15}
readonly pg_scale=${BENCH_PG_SCALE:-20}
readonly pg_seconds=${BENCH_PG_SECONDS:-30}
readonly pg_image=thinvol-bench/postgres:15

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

# fio on the host, in DIR: prints one figure (MiB/s or IOPS) for JOB.
fio_figure() {
  local dir=$1 job=$2 out
  local -a common=(--name="$job" --directory="$dir" --filename=fio.data --size="${mib}M" --output-format=json)
  # Nothing else's dirty pages (an image just imported, the previous job) may be written back meanwhile.
  sync
  case $job in
    seqwrite) out=$(fio "${common[@]}" --rw=write --bs=1M --end_fsync=1) ;;
    seqread)
      drop_caches >/dev/null
      out=$(fio "${common[@]}" --rw=read --bs=1M)
      ;;
    randread) out=$(fio "${common[@]}" --rw=randread --bs=4k --ioengine=libaio --iodepth=32 --direct=1 --time_based --runtime="$fio_seconds") ;;
    randwrite) out=$(fio "${common[@]}" --rw=randwrite --bs=4k --fdatasync=1 --time_based --runtime="$fio_seconds") ;;
  esac
  case $job in
    seq*) jq -r '(.jobs[0].write.bw + .jobs[0].read.bw) / 1024 | floor' <<<"$out" ;;
    *) jq -r '(.jobs[0].write.iops + .jobs[0].read.iops) | floor' <<<"$out" ;;
  esac
}

# PostgreSQL 15 in a container on volume VOL: prints pgbench's TPS (TPC-B, scale
# $pg_scale, 4 clients, $pg_seconds s).
pgbench_tps() {
  local vol=$1 name=pg-$1 start tps
  start='mkdir -p /d/pg && chown postgres /d/pg && exec su postgres -s /bin/sh -c "/usr/lib/postgresql/15/bin/initdb -A trust -D /d/pg >/dev/null && exec /usr/lib/postgresql/15/bin/postgres -D /d/pg -k /tmp -c listen_addresses="'
  docker run -d --name "$name" --network none --shm-size 256m -v "$vol:/d" "$pg_image" sh -c "$start" >/dev/null
  local i
  for ((i = 0; i < 300; i++)); do
    docker exec "$name" su postgres -s /bin/sh -c "pg_isready -q -h /tmp" 2>/dev/null && break
    sleep 0.2
  done
  docker exec "$name" su postgres -s /bin/sh -c "/usr/lib/postgresql/15/bin/pgbench -h /tmp -q -i -s $pg_scale postgres" >/dev/null 2>&1 ||
    die "pgbench -i failed on $vol: $(docker logs "$name" 2>&1 | tail -5)"
  tps=$(docker exec "$name" su postgres -s /bin/sh -c "/usr/lib/postgresql/15/bin/pgbench -h /tmp -c 4 -j 2 -T $pg_seconds postgres" 2>/dev/null |
    sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1)
  docker rm -f "$name" >/dev/null
  printf '%.0f' "${tps:-0}"
}


plugin_rss_mib() {
  local pid
  pid=$(pgrep -f '^/usr/bin/node .*/thinvol.mjs$' | head -1)
  [[ -n $pid ]] || { echo "n/a"; return; }
  awk '/^VmRSS:/ { printf "%.0f", $2 / 1024 }' "/proc/$pid/status"
}

declare -A fig=()

# Measures one driver into fig[LABEL.figure].
bench_driver() {
  local driver=$1 label=$2
  local -a create_ms=() run_ms=() opts=()
  [[ $driver == local ]] || opts=(-o size=4G)
  local i name
  for ((i = 0; i < repeat; i++)); do
    name="bench-$label-$i"
    create_ms+=("$(time_ms docker volume create -d "$driver" "${opts[@]}" "$name")")
  done
  run_container "bench-$label-0" >/dev/null # the first start also loads the image
  for ((i = 0; i < repeat; i++)); do run_ms+=("$(time_ms run_container "bench-$label-$i")"); done
  fig[$label.create]=$(median "${create_ms[@]}")
  fig[$label.start]=$(median "${run_ms[@]}")

  # fio runs on the host in the volume's mountpoint while a container holds it mounted.
  local vol="bench-$label-0" holder="bench-$label-holder" mnt
  docker run -d --name "$holder" --network none -v "$vol:/d" "$E2E_IMAGE" sleep 3600 >/dev/null
  mnt=$(docker volume inspect -f '{{.Mountpoint}}' "$vol")
  if [[ $driver != local ]]; then
    # The plugin's path, under its propagated mount; the host sees that in the plugin's directory.
    local propagated
    propagated=$(jq -r .propagatedMount plugin/config.json)
    mnt="$E2E_DATA_ROOT/plugins/$(docker plugin inspect -f '{{.Id}}' "$driver")/propagated-mount${mnt#"$propagated"}"
  fi
  [[ -d $mnt ]] || die "the mountpoint of $vol ($mnt) is not a directory on the host"
  local job
  for job in seqwrite seqread randread randwrite; do
    log "$label: fio $job"
    fig[$label.$job]=$(fio_figure "$mnt" "$job")
  done
  docker rm -f "$holder" >/dev/null

  if [[ $driver != local ]]; then
    fig[$label.clone-empty]=$(time_ms docker volume create -d "$driver" -o from="bench-$label-1" "bench-$label-clone-empty")
    fig[$label.clone-full]=$(time_ms docker volume create -d "$driver" -o from="$vol" "bench-$label-clone-full")
  fi

  log "$label: pgbench (scale $pg_scale, 4 clients, $pg_seconds s)"
  local pgvol="bench-$label-pg"
  docker volume create -d "$driver" "${opts[@]}" "$pgvol" >/dev/null
  fig[$label.pgbench]=$(pgbench_tps "$pgvol")
}

# row TITLE KEY UNIT HIGHER: thinvol, local and thinvol ÷ local
row() {
  local title=$1 key=$2 unit=$3 t=${fig[thinvol.$2]:-} l=${fig[local.$2]:-}
  local ratio
  ratio=$(awk -v t="$t" -v l="$l" 'BEGIN { if (t == "" || l == "" || l == 0) print "-"; else printf "%.2f", t / l }')
  printf '| %-44s | %10s | %10s | %6s |\n' "$title" "${l:--}${l:+ $unit}" "${t:--}${t:+ $unit}" "$ratio"
}

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
for tool in fio jq; do
  command -v "$tool" >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tool" </dev/null >/dev/null
done
engine_fresh_start
engine_import_postgres "$pg_image"
log "installing the plugin as $plugin (POOL_DRIVER=$pool_driver POOL_SIZE=$pool_size)"
PLUGIN_NAME=$plugin bash build/plugin-install.sh \
  "state.source=$E2E_DATA_ROOT/plugins" "POOL_DRIVER=$pool_driver" "POOL_SIZE=$pool_size" >/dev/null

bench_driver "$plugin" thinvol
fig[thinvol.rss]=$(plugin_rss_mib)
bench_driver local local

printf '\nthinvol (pool driver %s) against the local driver, one engine, one run: %s, kernel %s, %s cores, %s\n\n' \
  "$pool_driver" "$(docker version --format 'Docker {{.Server.Version}}')" "$(uname -r)" "$(nproc)" "$(findmnt -no FSTYPE -T "$E2E_DATA_ROOT") host filesystem"
printf '| %-44s | %10s | %10s | %6s |\n' figure local thinvol ratio
printf '|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..46})" "$(printf -- '-%.0s' {1..12})" "$(printf -- '-%.0s' {1..12})" "$(printf -- '-%.0s' {1..8})"
row "docker run --rm -v vol:/d true (median of $repeat)" start ms
row "docker volume create (median of $repeat)" create ms
row "sequential write 1 MiB + fsync ($mib MiB)" seqwrite MiB/s
row "sequential read 1 MiB, cold cache" seqread MiB/s
row "random read 4 KiB, QD32, direct" randread IOPS
row "random write 4 KiB + fdatasync each" randwrite IOPS
row "pgbench TPC-B, scale $pg_scale, 4 clients, ${pg_seconds} s" pgbench TPS
row "clone of an empty volume" clone-empty ms
row "clone of a volume holding $mib MiB" clone-full ms
row "plugin RSS after the run" rss MiB
