#!/usr/bin/env bash
# Where an fsync goes: 4 KiB random writes with an fdatasync after each, on every stack of
# layers a loop-pool volume can sit on, built here by hand so each layer is measured on its
# own. For each stack it prints IOPS and, per fdatasync, the flushes that each block device
# on the way received (from /sys/block/*/stat), down to the host disk. Figures only.
#
#   sudo npm run bench -- --layers
#
# Environment:
#   LAYERS_DIR      scratch directory on the host disk to measure (default /var/tmp/thinvol-layers)
#   LAYERS_SECONDS  seconds of each fio run (default 10)
#   LAYERS_MIB      size of the file fio writes into (default 256)
#   LAYERS_STACKS   the stacks to run, by name (default all; see `stacks` below)
#   LAYERS_JOB      fsync (default) or seqwrite
set -euo pipefail

readonly dir=${LAYERS_DIR:-/var/tmp/thinvol-layers}
readonly seconds=${LAYERS_SECONDS:-10}
readonly mib=${LAYERS_MIB:-256}
readonly image_size=2G
# fsync: 4 KiB random writes, each followed by fdatasync, into a file already written;
# seqwrite: 1 MiB sequential writes of fresh blocks and one fsync at the end.
readonly job=${LAYERS_JOB:-fsync}

log() { printf '[layers] %s\n' "$*" >&2; }
die() { printf '[layers] error: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "needs root (loop devices and mounts)"
if ! command -v fio >/dev/null; then
  log "installing fio"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null </dev/null || die "cannot install fio"
fi

# What to undo, in the order it was set up ("umount PATH" or "losetup -d DEV"); undone last first.
undo=()
cleanup() {
  local i
  for ((i = ${#undo[@]} - 1; i >= 0; i--)); do
    # shellcheck disable=SC2086 # each entry is a command and its one argument
    ${undo[i]} || log "cleanup: '${undo[i]}' failed"
  done
  undo=()
  rm -rf "$dir"
}
trap cleanup EXIT

# attach FILE [losetup options...]: sets $attached to the new loop device
attach() {
  local file=$1
  shift
  attached=$(losetup --find --show "$@" "$file")
  undo+=("losetup -d $attached")
}

# mount_fs DEV FSTYPE TARGET [mount options]
mount_fs() {
  mkdir -p "$3"
  mount -t "$2" ${4:+-o "$4"} "$1" "$3"
  undo+=("umount $3")
}

mkfs_volume() {
  case $2 in
    ext4) mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1,nodiscard "$1" ;;
    xfs) mkfs.xfs -q -f -K -s size=4096 "$1" ;;
  esac
}

host_disk() { basename "$(readlink -f "/sys/class/block/$(basename "$(df --output=source "$dir" | tail -1)")")"; }

# Flushes a block device has completed (field 16 of /sys/block/DEV/stat; 0 on old kernels).
flushes() { awk '{ print ($16 == "" ? 0 : $16) }' "/sys/class/block/$1/stat"; }

# The pool: a sparse host file, a loop device, XFS with reflink, as src/pool/loop.ts makes it.
# pool OPTS: OPTS among pool-buffered, pool-lazytime
make_pool() {
  local dio=on mopts=noatime
  [[ " $* " == *" pool-buffered "* ]] && dio=off
  [[ " $* " == *" pool-lazytime "* ]] && mopts=noatime,lazytime
  truncate -s 8G "$dir/pool.img"
  [[ " $* " == *" pool-fallocated "* ]] && fallocate -l 8G "$dir/pool.img"
  attach "$dir/pool.img" --direct-io="$dio"
  pool_dev=$attached
  mkfs.xfs -q -f -K -m reflink=1 "$pool_dev"
  mount_fs "$pool_dev" xfs "$dir/pool" "$mopts"
}

# One stack: NAME DESCRIPTION LAYOUT [OPTS...]
#   LAYOUT host      the host directory itself
#          loop1     volume filesystem on a loop device over a host file
#          loop2     volume filesystem on a loop device over an image in the pool
run_stack() {
  local name=$1 what=$2 layout=$3
  shift 3
  local fs=ext4 vol_dio=on target devs=() img
  [[ " $* " == *" xfs "* ]] && fs=xfs
  [[ " $* " == *" volume-buffered "* ]] && vol_dio=off
  mkdir -p "$dir"
  pool_dev=""
  case $layout in
    host) target=$dir/host; mkdir -p "$target" ;;
    loop1 | loop2)
      if [[ $layout == loop2 ]]; then
        make_pool "$@"
        img=$dir/pool/volume.img
      else
        img=$dir/volume.img
      fi
      truncate -s "$image_size" "$img"
      [[ " $* " == *" volume-fallocated "* ]] && fallocate -l "$image_size" "$img"
      local vdev
      attach "$img" --direct-io="$vol_dio" --sector-size 4096
      vdev=$attached
      mkfs_volume "$vdev" "$fs"
      target=$dir/volume
      mount_fs "$vdev" "$fs" "$target"
      devs+=("$(basename "$vdev")")
      ;;
  esac
  [[ -n $pool_dev ]] && devs+=("$(basename "$pool_dev")")
  devs+=("$disk")

  if [[ $job == seqwrite ]]; then
    # Fresh blocks, as a volume's first writes are: what allocation costs at each layer.
    local out mibs
    out=$(fio --name=seqwrite --directory="$target" --filename=data --size="${mib}M" --bs=1M --rw=write --end_fsync=1 --output-format=json)
    mibs=$(jq '.jobs[0].write.bw / 1024 | floor' <<<"$out")
    printf '%-16s %7s MiB/s   (%s)\n' "$name" "$mibs" "$what"
    cleanup
    return
  fi
  local -a fio_args=(--name=fsync --directory="$target" --filename=data --size="${mib}M" --bs=4k
    --rw=randwrite --ioengine=psync --fdatasync=1 --random_generator=lfsr)
  # Lay the file out (written once, as a database's files are) before anything is counted.
  fio "${fio_args[@]}" --rw=write --bs=1M --end_fsync=1 --output-format=terse >/dev/null
  sync
  local d before=() after=()
  for d in "${devs[@]}"; do before+=("$(flushes "$d")"); done
  local out
  out=$(fio "${fio_args[@]}" --time_based --runtime="$seconds" --output-format=json)
  for d in "${devs[@]}"; do after+=("$(flushes "$d")"); done
  local iops syncs
  iops=$(jq '.jobs[0].write.iops | floor' <<<"$out")
  syncs=$(jq '.jobs[0].sync.lat_ns.N // 0' <<<"$out")
  local per="" i
  for i in "${!devs[@]}"; do
    per+=$(awk -v d="${devs[i]}" -v n=$((after[i] - before[i])) -v s="$syncs" 'BEGIN { printf " %s %.2f", d, (s > 0 ? n / s : 0) }')
  done
  printf '%-16s %7s IOPS   flushes per fdatasync:%s   (%s)\n' "$name" "$iops" "$per" "$what"
  cleanup
}

mkdir -p "$dir"
disk=$(host_disk)
rm -rf "$dir"

all_stacks=(host loop1 loop1-xfs today today-xfs pool-buffered volume-buffered pool-lazytime pool-fallocated volume-fallocated)
read -r -a stacks <<<"${LAYERS_STACKS:-${all_stacks[*]}}"
[[ $job == fsync || $job == seqwrite ]] || die "LAYERS_JOB must be fsync or seqwrite"
[[ $job == fsync ]] && printf 'fio 4 KiB random write + fdatasync, %s MiB file, %s s each; host disk %s (%s), kernel %s, %s cores\n\n' \
  "$mib" "$seconds" "$disk" "$(findmnt -no FSTYPE -T "$(dirname "$dir")")" "$(uname -r)" "$(nproc)"
[[ $job == seqwrite ]] && printf 'fio 1 MiB sequential write of %s MiB of fresh blocks + fsync; host disk %s, kernel %s, %s cores\n\n' \
  "$mib" "$disk" "$(uname -r)" "$(nproc)"
for s in "${stacks[@]}"; do
  case $s in
    host) run_stack host "a directory on the host filesystem" host ;;
    loop1) run_stack loop1 "ext4 / direct-I/O loop / host file" loop1 ;;
    loop1-xfs) run_stack loop1-xfs "xfs / direct-I/O loop / host file" loop1 xfs ;;
    today) run_stack today "ext4 / DIO loop / image in pool XFS / DIO loop / host file" loop2 ;;
    today-xfs) run_stack today-xfs "the same with xfs in the volume" loop2 xfs ;;
    pool-buffered) run_stack pool-buffered "today, the pool's loop device without direct I/O" loop2 pool-buffered ;;
    volume-buffered) run_stack volume-buffered "today, the volume's loop device without direct I/O" loop2 volume-buffered ;;
    pool-lazytime) run_stack pool-lazytime "today, the pool's XFS mounted lazytime" loop2 pool-lazytime ;;
    pool-fallocated) run_stack pool-fallocated "today, the pool file fallocated on the host" loop2 pool-fallocated ;;
    volume-fallocated) run_stack volume-fallocated "today, the volume's image fallocated in the pool" loop2 volume-fallocated ;;
    *) die "unknown stack '$s' (known: ${all_stacks[*]})" ;;
  esac
done
