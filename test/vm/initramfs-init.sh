#!/bin/busybox sh
# Stage 1 of the VM boot: /init of the small initramfs that test/vm/vm.sh builds
# (busybox-static + the few kernel modules needed to reach the host's files).
#
# It builds the VM's root filesystem and hands over to stage 2:
#   /lower   the host's whole "/" over 9p, read-only        (mount_tag hostroot)
#   /rw      a tmpfs holding the overlay's upper and work dirs
#   /newroot overlay(lower=/lower, upper=/rw/upper)  -> every host path, writable, throwaway
# then switch_root to /newroot and exec stage 2 (test/vm/guest-init.sh, read from the host
# through the new root, so editing it needs no initramfs rebuild).
#
# Parameters come from the kernel command line (set by vm.sh):
#   thinvol.init=<path of guest-init.sh>   thinvol.tmpfs=<size of the overlay tmpfs>
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
tmpfs_size=16G
cache=loose
for arg in $(cat /proc/cmdline); do
  case $arg in
    thinvol.init=*) init=${arg#thinvol.init=} ;;
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

[ -f "/newroot$init" ] || fail "stage 2 $init not found in the host root"

# Hand /dev over to the new root (stage 2 mounts the rest itself).
mount --move /dev /newroot/dev || fail "move /dev"
umount /sys
umount /proc
exec switch_root /newroot /bin/bash "$init"
