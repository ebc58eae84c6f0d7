#!/bin/bash
# Stage 2 of the VM boot: PID 1 inside the VM, run from the host's root through the overlay
# (see initramfs-init.sh). It prepares a system good enough for dm-thin, loop devices,
# filesystems and dockerd, runs the job that vm.sh wrote, reports its exit status and
# powers the VM off.
#
# Channels (set up by vm.sh):
#   /dev/console (ttyS0)        -> the console log on the host: boot messages, this script's
#                                  diagnostics, and the line THINVOL-VM-EXIT=<rc>
#   virtio port "thinvol.out"   -> vm.sh's stdout: the job's stdout and stderr, byte for byte
#
# Kernel command line parameters (set by vm.sh):
#   thinvol.job=<path>    bash script: exports, cd, exec of the user's command
#   thinvol.share=<path>  host directory shared read-write (mount_tag hostshare), mounted at
#                         the same path
set -uo pipefail # no -e: PID 1 must always reach the exit-status line and the poweroff

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8
umask 022

console=/dev/console
log() { echo "thinvol-vm: $*" >"$console"; }

finish() {
  local rc=$1
  sync
  echo "THINVOL-VM-EXIT=$rc" >"$console"
  # sysrq 'o' powers off at once (ACPI); no init system is running to do it.
  echo o >/proc/sysrq-trigger
  sleep 10
  exit "$rc" # not reached; if it is, PID 1 exits, the kernel panics, qemu exits (-no-reboot)
}

# --- the usual API filesystems -------------------------------------------------------------
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo 1 >/proc/sys/kernel/sysrq

job= share=
for arg in $(</proc/cmdline); do
  case $arg in
    thinvol.job=*) job=${arg#thinvol.job=} ;;
    thinvol.share=*) share=${arg#thinvol.share=} ;;
  esac
done
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /dev/mqueue
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mount -t mqueue mqueue /dev/mqueue 2>/dev/null
ln -sfn /proc/self/fd /dev/fd
ln -sfn /proc/self/fd/0 /dev/stdin
ln -sfn /proc/self/fd/1 /dev/stdout
ln -sfn /proc/self/fd/2 /dev/stderr
mount -t tmpfs -o mode=0755,nosuid,nodev,size=1G tmpfs /run
# /tmp is RAM-backed and large: sparse pool files and a dockerd --data-root go here.
# Only the space really used counts against the VM's memory.
mount -t tmpfs -o mode=1777,size=16G tmpfs /tmp
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
# The host's /var/lib/docker etc. are visible read-only-underneath; give dockerd a fresh,
# writable (tmpfs) /var/lib/docker and /var/run state so it never sees host leftovers.
mkdir -p /var/lib/docker /var/lib/containerd
mount -t tmpfs -o mode=0711 tmpfs /var/lib/docker
mount -t tmpfs -o mode=0755 tmpfs /var/lib/containerd
ln -sfn /run /var/run 2>/dev/null

hostname thinvol-vm
echo thinvol-vm >/etc/hostname
ip link set lo up

# --- kernel modules --------------------------------------------------------------------------
# The overlay root shows /lib/modules/<ver> of Debian's linux-image package, modules.dep
# included, so plain modprobe works. One modprobe -a per group: a missing optional module
# must not stop the rest. dm_mod/loop/etc. are what the pool drivers need; the others are
# what dockerd wants for bridge networking (tests may use --iptables=false --bridge=none).
kver=$(uname -r)
if [[ ! -f /lib/modules/$kver/modules.dep ]]; then
  log "no /lib/modules/$kver/modules.dep; running depmod"
  depmod "$kver"
fi
modprobe -a dm_mod dm_thin_pool dm_snapshot dm_bufio dm_persistent_data loop ext4 xfs overlay ||
  log "some storage modules failed to load"
modprobe -a bridge br_netfilter veth nf_nat nf_conntrack ip_tables iptable_nat iptable_filter \
  xt_conntrack xt_MASQUERADE xt_addrtype nf_tables nft_chain_nat nft_compat 2>/dev/null ||
  log "some network modules failed to load"

# --- the read-write share --------------------------------------------------------------------
if [[ -n $share ]]; then
  mkdir -p "$share" 2>/dev/null
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none hostshare "$share" ||
    log "could not mount the read-write share at $share"
fi

# --- the job ---------------------------------------------------------------------------------
out=
for p in /sys/class/virtio-ports/*; do
  [[ -r $p/name && $(<"$p/name") == thinvol.out ]] && out=/dev/${p##*/}
done
if [[ -z $out || ! -c $out ]]; then
  log "virtio port thinvol.out not found; the job's output goes to the console"
  out=$console
fi
if [[ -z $job || ! -f $job ]]; then
  log "job script '$job' not found"
  finish 125
fi

log "running job"
# New session so the job has no controlling terminal and is the leader of its own group.
# stdin is empty: the job runs unattended, like in CI.
setsid -w bash "$job" </dev/null >"$out" 2>&1
rc=$?
finish "$rc"
