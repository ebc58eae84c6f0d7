#!/usr/bin/env bash
# Runs INSIDE the VM (via test/vm/selftest.sh): proves the VM can do what the test tiers
# need: a dm-thin pool on loop devices with a thin volume, a filesystem and a snapshot, and
# a working dockerd. Writes "OK" to $1 (a file in the read-write share) when all passed.
set -euo pipefail
result=${1:?result file}
step() { echo "--- $*"; }

step "dm-thin"
modprobe dm_thin_pool
dmsetup targets | grep -q '^thin-pool'
work=$(mktemp -d /tmp/selftest.XXXXXX)
truncate -s 1G "$work/data"
truncate -s 16M "$work/meta"
# tmpfs refuses O_DIRECT: a loop device with --direct-io=on over a tmpfs file fails (EINVAL).
if losetup --direct-io=on -f --show "$work/data" >/dev/null 2>&1; then
  echo "note: direct-io loop on tmpfs accepted"
  losetup -j "$work/data" -O NAME -n | xargs -r -n1 losetup -d
else
  echo "note: direct-io loop on tmpfs refused (expected)"
fi
data=$(losetup -f --show "$work/data")
meta=$(losetup -f --show "$work/meta")
sectors=$((1024 * 1024 * 2)) # 1 GiB
dmsetup create st-pool --table "0 $sectors thin-pool $meta $data 128 16384 1 skip_block_zeroing"
dmsetup mknodes # no udev in the VM: create /dev/mapper nodes by hand
dmsetup message st-pool 0 "create_thin 1"
dmsetup create st-thin1 --table "0 $((sectors / 2)) thin /dev/mapper/st-pool 1"
dmsetup mknodes
mkfs.ext4 -q -E lazy_itable_init=1,nodiscard /dev/mapper/st-thin1
mkdir -p "$work/a" "$work/b"
mount /dev/mapper/st-thin1 "$work/a"
echo original >"$work/a/file"
sync
dmsetup suspend st-thin1
dmsetup message st-pool 0 "create_snap 2 1"
dmsetup resume st-thin1
dmsetup create st-snap2 --table "0 $((sectors / 2)) thin /dev/mapper/st-pool 2"
dmsetup mknodes
mount /dev/mapper/st-snap2 "$work/b"
echo changed >"$work/a/file"
[[ $(<"$work/a/file") == changed && $(<"$work/b/file") == original ]]
dmsetup status st-pool
umount "$work/a" "$work/b"
dmsetup remove st-snap2
dmsetup remove st-thin1
dmsetup message st-pool 0 "delete 2"
dmsetup message st-pool 0 "delete 1"
dmsetup remove st-pool
thin_check -q "$meta"
losetup -d "$data" "$meta"
echo "dm-thin: pool, thin volume, ext4, snapshot, delete, thin_check all OK"

step "dockerd"
dockerd --data-root /tmp/selftest-docker --exec-root /run/selftest-docker \
  --host unix:///run/selftest-docker.sock --iptables=false --bridge=none \
  >"$work/dockerd.log" 2>&1 &
export DOCKER_HOST=unix:///run/selftest-docker.sock
for _ in $(seq 120); do docker version >/dev/null 2>&1 && break; sleep 0.5; done
docker info --format 'docker {{.ServerVersion}}, storage {{.Driver}}, cgroup v{{.CgroupVersion}}'
mkdir -p "$work/img/bin"
cp "$(command -v busybox)" "$work/img/bin/busybox"
tar -C "$work/img" -c . | docker import - selftest/busybox >/dev/null
out=$(docker run --rm --network none selftest/busybox /bin/busybox echo hello-from-container)
[[ $out == hello-from-container ]]
echo "dockerd: container ran OK"
kill %1 || true

echo OK >"$result"
