#!/usr/bin/env bash
# Inside the VM (test/bench/vm.sh boots it): fio on one virtual disk, split in two halves,
# against each way a volume can sit on it. Prints "VMBENCH <stack> <job> <figure>" lines.
#   plain        a directory on ext4 on the first half (what Docker's local driver gives)
#   dm-thin      a thinvol volume, dm-thin pool on files in that ext4 (the plugin as it is)
#   loop         a thinvol volume, loop pool on a file in that ext4
#   dm-thin-raw  dm-thin built by hand with its data on the second half directly (no loop
#                device, no file), metadata on a file
#   dm-thin-device  a thinvol volume, dm-thin pool with POOL_DEVICE on the second half
set -euo pipefail

# No udev in the VM: dmsetup makes the /dev/mapper nodes itself.
export DM_DISABLE_UDEV=1
dm_create() { dmsetup create "$1" --noudevsync --table "$2" && dmsetup mknodes "$1"; }
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
readonly disk=/dev/vda home=/bench run=/run/thinvol-bench
readonly seconds=${THINVOL_BENCH_SECONDS:-10} mib=${THINVOL_BENCH_MIB:-128}
readonly block_sectors=128 # the plugin's dm-thin block size (64 KiB)

for ((i = 0; i < 100; i++)); do [[ -b $disk ]] && break; sleep 0.05; done
modprobe dm_thin_pool
sectors=$(blockdev --getsz "$disk")
half=$((sectors / 2))
dm_create bench-a "0 $half linear $disk 0"
dm_create bench-b "0 $half linear $disk $half"
mkfs.ext4 -q -F /dev/mapper/bench-a
mkdir -p "$home" "$run"
mount /dev/mapper/bench-a "$home"

figure() { printf 'VMBENCH %s %s %s\n' "$1" "$2" "$3"; }
echo "VMBENCH-KERNEL $(uname -r)"

fio_all() {
  local dir=$1 stack=$2 out
  local -a common=(--directory="$dir" --filename=fio.data --size="${mib}M" --output-format=json)
  out=$(fio --name=seqwrite "${common[@]}" --rw=write --bs=1M --end_fsync=1)
  figure "$stack" seqwrite "$(jq '.jobs[0].write.bw / 1024 | floor' <<<"$out")"
  out=$(fio --name=randwrite "${common[@]}" --rw=randwrite --bs=4k --fdatasync=1 --time_based --runtime="$seconds")
  figure "$stack" randwrite "$(jq '.jobs[0].write.iops | floor' <<<"$out")"
  out=$(fio --name=randread "${common[@]}" --rw=randread --bs=4k --ioengine=libaio --iodepth=32 --direct=1 --time_based --runtime="$seconds")
  figure "$stack" randread "$(jq '.jobs[0].read.iops | floor' <<<"$out")"
  rm -f "$dir/fio.data"
}

call() {
  curl -sf --unix-socket "$run/thinvol.sock" -X POST -d "$2" "http://plugin/VolumeDriver.$1"
}

# thinvol_stack DRIVER [DEVICE]: a volume from the plugin's server, with POOL_DEVICE=DEVICE if given.
thinvol_stack() {
  local driver=$1 device=${2:-} label=$1${2:+-device}
  SOCKET_PATH=$run/thinvol.sock STATE_DIR=$home/state-$label MOUNT_DIR=$run/volumes POOL_DRIVER=$driver POOL_SIZE=3G POOL_DEVICE=$device \
    MALLOC_ARENA_MAX=2 node --max-semi-space-size=1 "$repo/dist/thinvol.mjs" >"$run/server-$label.log" 2>&1 &
  local pid=$!
  for ((i = 0; i < 600; i++)); do call List '{}' >/dev/null 2>&1 && break; sleep 0.1; done
  call Create '{"Name":"bench","Opts":{"size":"2G"}}' >/dev/null
  local mp
  mp=$(call Mount '{"Name":"bench","ID":"bench"}' | jq -r .Mountpoint)
  [[ $mp == /* ]] || { cat "$run/server-$label.log"; exit 1; }
  fio_all "$mp" "$label"
  call Unmount '{"Name":"bench","ID":"bench"}' >/dev/null
  call Remove '{"Name":"bench"}' >/dev/null
  kill -TERM "$pid"
  wait "$pid" || true
}

mkdir -p "$home/plain"
fio_all "$home/plain" plain
thinvol_stack dm-thin
thinvol_stack loop

# dm-thin straight on a block device: the pool the plugin would build on a disk of its own.
truncate -s 64M "$home/raw-meta.img"
meta=$(losetup --find --show "$home/raw-meta.img")
dd if=/dev/zero of="$meta" bs=4096 count=1 status=none
dm_create bench-pool "0 $half thin-pool $meta /dev/mapper/bench-b $block_sectors 0 3 skip_block_zeroing error_if_no_space no_discard_passdown"
dmsetup message bench-pool 0 "create_thin 0"
dm_create bench-thin "0 4194304 thin /dev/mapper/bench-pool 0"
mkfs.ext4 -q -F -E lazy_itable_init=1,nodiscard /dev/mapper/bench-thin
mkdir -p "$run/raw"
mount /dev/mapper/bench-thin "$run/raw"
fio_all "$run/raw" dm-thin-raw
umount "$run/raw"
dmsetup remove --noudevsync bench-thin
dmsetup remove --noudevsync bench-pool
losetup -d "$meta"
# The same half as the plugin's POOL_DEVICE: wiped first, as the plugin asks of a device.
dd if=/dev/zero of=/dev/mapper/bench-b bs=1M count=16 status=none
thinvol_stack dm-thin /dev/mapper/bench-b
umount "$home"
dmsetup remove --noudevsync bench-a bench-b
echo "VMBENCH-END"
