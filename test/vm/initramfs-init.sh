#!/bin/busybox sh
# Stage 1 of the VM boot: /init of the small initramfs that test/vm/vm.sh builds
# (busybox-static + the few kernel modules needed to reach the host's files).
#
# It builds the VM's root filesystem and hands over to stage 2:
#   /lower   the host's whole "/" over 9p, read-only        (mount_tag hostroot)
#   /rw      a tmpfs holding the overlay's upper and work dirs
#   /newroot overlay(lower=/lower, upper=/rw/upper)  -> every host path, writable, throwaway
# then mounts the API filesystems (proc, sys, dev, cgroup2, tmpfs /tmp and /run, ...) inside
# /newroot, switch_roots to it and execs stage 2 (test/vm/guest-init.sh, read from the host
# through the new root, so editing it needs no initramfs rebuild).
#
# The mounting is done here rather than in stage 2 because busybox is static and already in
# memory: under TCG every exec of a dynamically linked binary from 9p costs 0.1-0.7 s.
#
# Parameters come from the kernel command line (set by vm.sh):
#   thinvol.init=<path of guest-init.sh>   thinvol.tmpfs=<size of the overlay tmpfs>
#   thinvol.share=<host dir shared read-write as mount_tag hostshare, mounted at that path>
#   thinvol.9pcache=<9p cache mode for the root>
# Anything going wrong here is printed to the console (the console log on the host) and the
# VM is powered off; vm.sh then reports that no exit status arrived.

/bin/busybox --install -s /bin
export PATH=/bin

fail() {
  echo "THINVOL-VM-STAGE1-ERROR: $*"
  echo o >/proc/sysrq-trigger
  sleep 5
  exit 1 # PID 1 exiting panics; with panic=-1 and -no-reboot qemu then exits
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
echo 1 >/proc/sys/kernel/sysrq

init=
share=
expose=
tmpfs_size=16G
cache=loose
for arg in $(cat /proc/cmdline); do
  case $arg in
    thinvol.init=*) init=${arg#thinvol.init=} ;;
    thinvol.share=*) share=${arg#thinvol.share=} ;;
    thinvol.expose=*) expose=${arg#thinvol.expose=} ;;
    thinvol.tmpfs=*) tmpfs_size=${arg#thinvol.tmpfs=} ;;
    thinvol.9pcache=*) cache=${arg#thinvol.9pcache=} ;;
  esac
done
[ -n "$init" ] || fail "no thinvol.init= on the kernel command line"

# Modules in dependency order, as listed by vm.sh when it built this initramfs.
while read -r ko; do
  [ -n "$ko" ] || continue
  insmod "/modules/$ko" || fail "insmod $ko"
done </modules/order

# --- the root: 9p lower + tmpfs upper ----------------------------------------------------------
mkdir -p /lower /rw /newroot
# msize: the largest 9p message the virtio transport takes (the kernel clamps it); bigger
# messages mean fewer round trips, which matters a lot under TCG.
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=$cache hostroot /lower ||
  fail "mount 9p hostroot"
mount -t tmpfs -o size=$tmpfs_size,mode=0755 tmpfs /rw || fail "mount tmpfs"
mkdir -p /rw/upper /rw/work
# index/redirect_dir/metacopy off: the lower is a network-ish fs without stable file
# handles, and nothing here needs those features.
mount -t overlay overlay \
  -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work,index=off,redirect_dir=off,metacopy=off,xino=off \
  /newroot || fail "mount overlay"

# --- API filesystems inside the new root -------------------------------------------------------
r=/newroot
mount --move /dev $r/dev || fail "move /dev"
mount -t proc proc $r/proc || fail "mount proc"
mount -t sysfs sysfs $r/sys || fail "mount sysfs"
umount /sys
umount /proc
mkdir -p $r/dev/pts $r/dev/shm $r/dev/mqueue
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $r/dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs $r/dev/shm
mount -t mqueue mqueue $r/dev/mqueue
ln -sfn /proc/self/fd $r/dev/fd
ln -sfn /proc/self/fd/0 $r/dev/stdin
ln -sfn /proc/self/fd/1 $r/dev/stdout
ln -sfn /proc/self/fd/2 $r/dev/stderr
mount -t tmpfs -o mode=0755,nosuid,nodev,size=1G tmpfs $r/run
# /tmp is RAM-backed and large: sparse pool files and a dockerd --data-root go here (overlay2
# cannot use the overlay root as its backing fs). Only the space really used costs memory.
mount -t tmpfs -o mode=1777,size=$tmpfs_size tmpfs $r/tmp
# A checkout under /tmp or /run (a CI clone, say) is hidden by the fresh tmpfs there: bind it
# back from the host's root at the same path, read-only like the rest of the host.
case "$expose" in
  /tmp/* | /run/*) { mkdir -p "$r$expose" && mount --bind "/lower$expose" "$r$expose"; } || fail "bind $expose" ;;
esac
mount -t cgroup2 -o nsdelegate cgroup2 $r/sys/fs/cgroup || fail "mount cgroup2"
mount -t securityfs securityfs $r/sys/kernel/security 2>/dev/null
mount -t debugfs debugfs $r/sys/kernel/debug 2>/dev/null
# A fresh dockerd/containerd state that never sees the host's (read-only underneath) state.
mkdir -p $r/var/lib/docker $r/var/lib/containerd
mount -t tmpfs -o mode=0711 tmpfs $r/var/lib/docker
mount -t tmpfs -o mode=0711 tmpfs $r/var/lib/containerd
[ "$(readlink $r/var/run)" = /run ] || { rm -rf $r/var/run; ln -s /run $r/var/run; }

# The host directory shared read-write, at the same path. cache=none: the host reads the
# results while or right after the VM writes them.
if [ -n "$share" ]; then
  mkdir -p "$r$share"
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none hostshare "$r$share" ||
    echo "thinvol-vm: could not mount the read-write share at $share"
fi

hostname thinvol-vm
echo thinvol-vm >$r/etc/hostname
ip link set lo up

[ -f "$r$init" ] || fail "stage 2 $init not found in the host root"
exec switch_root $r /bin/bash "$init"
