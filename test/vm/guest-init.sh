#!/bin/bash
# Stage 2 of the VM boot: PID 1 inside the VM, run from the host's root through the overlay.
# initramfs-init.sh has already mounted the root, /proc, /sys, /dev(/pts,/shm), /run, /tmp,
# cgroup2, the read-write share, and brought up lo. This script loads the kernel modules the
# tests need, runs the job that vm.sh wrote, reports its exit status and powers off.
#
# Channels (set up by vm.sh):
#   /dev/console (ttyS0)        -> the console log on the host: kernel messages, this
#                                  script's diagnostics, and the line THINVOL-VM-EXIT=<rc>
#   virtio port "thinvol.out"   -> vm.sh's stdout: the job's stdout and stderr, byte for byte
#
# Kernel command line parameter (set by vm.sh):
#   thinvol.job=<path>    bash script: exports, cd, the user's command
#
# Under TCG every exec of a dynamically linked program costs 0.1-0.7 s, so this script uses
# bash builtins where it can.
set -uo pipefail # no -e: PID 1 must always reach the exit-status line and the poweroff

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8
umask 022

# Node under qemu's multi-threaded TCG crashes now and then (SIGSEGV, SIGILL, or a wasm
# "memory access out of bounds" in tsx's lexer) while it loads and compiles a lot of code: V8
# writes machine code on its background threads while other threads run it. Measured here,
# loading the S3 client through tsx: 6 of 26 runs crashed, none of 26 with V8's
# --single-threaded (compilation and GC on the thread that runs the code). So every `node`
# found on PATH in the VM gets that flag, and node's test runner passes it to its children.
if real_node=$(command -v node); then
  mkdir -p /run/thinvol-bin
  printf '#!/bin/sh\nexec %s --single-threaded "$@"\n' "$real_node" >/run/thinvol-bin/node
  chmod 755 /run/thinvol-bin/node
  export PATH=/run/thinvol-bin:$PATH
fi

console=/dev/console
# Messages carry the uptime, to see where boot time goes.
log() {
  local up=?
  [[ -r /proc/uptime ]] && read -r up _ </proc/uptime
  echo "thinvol-vm [$up]: $*" >"$console"
}

finish() {
  local rc=$1
  sync
  echo "THINVOL-VM-EXIT=$rc" >"$console"
  # sysrq 'o' powers off at once (ACPI); no init system is running to do it.
  echo o >/proc/sysrq-trigger
  sleep 10
  exit "$rc" # not reached; if it is, PID 1 exits, the kernel panics, qemu exits (-no-reboot)
}

log "stage 2 started"
job=
for arg in $(</proc/cmdline); do
  case $arg in
    thinvol.job=*) job=${arg#thinvol.job=} ;;
  esac
done

# --- kernel modules --------------------------------------------------------------------------
# The overlay root shows /lib/modules/<ver> of Debian's linux-image package, modules.dep
# included, so plain modprobe works. Storage first: dm-thin, loop, the filesystems the pool
# drivers use and virtio_blk (vm.sh's VM_DISK). Then what dockerd wants for bridge
# networking and NAT (tests may still run dockerd with --iptables=false --bridge=none). The
# two groups load in parallel (two vCPUs); one modprobe -a per group so a missing optional
# module does not stop the rest.
kver=$(</proc/sys/kernel/osrelease)
if [[ ! -f /lib/modules/$kver/modules.dep ]]; then
  log "no /lib/modules/$kver/modules.dep; running depmod"
  depmod "$kver"
fi
modprobe -a dm_mod dm_thin_pool dm_snapshot dm_bufio dm_persistent_data loop ext4 xfs overlay virtio_blk \
  >"$console" 2>&1 &
storage=$!
modprobe -a bridge br_netfilter veth nf_nat nf_conntrack ip_tables iptable_nat iptable_filter \
  xt_conntrack xt_MASQUERADE xt_addrtype nf_tables nft_chain_nat nft_compat >"$console" 2>&1 &
network=$!
wait "$storage" || log "some storage modules failed to load"
wait "$network" || log "some network modules failed to load"
log "modules loaded"

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
# New session so the job has no controlling terminal and leads its own process group.
# stdin is empty: the job runs unattended, like in CI.
setsid -w bash "$job" </dev/null >"$out" 2>&1
rc=$?
finish "$rc"
