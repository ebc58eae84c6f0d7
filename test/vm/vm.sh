#!/usr/bin/env bash
# Run one command as root inside a throwaway qemu VM that boots Debian's kernel (which has
# device-mapper/dm-thin, unlike the development machine's kernel) and sees this machine's
# whole filesystem at the same paths.
#
#   npm run vm -- <command> [args...]       e.g.  npm run vm -- npm run test:integration
#   bash test/vm/vm.sh <command> [args...]
#
# The command's stdout+stderr stream live to vm.sh's stdout; vm.sh exits with the command's
# exit status (124 on timeout, 125 if the VM never reported one, 137 after a power cut).
# See test/vm/README.md.
#
# Power cuts: VM_DISK=<raw file> adds a persistent disk (/dev/vda in the VM) that outlives
# the VM, and SIGUSR1 to vm.sh pulls the plug: qemu gets SIGKILL at once, the guest has no
# chance to shut down, and whatever the guest had flushed to the disk is in the file.
#
# How it works:
#   host /  --9p, read-only-->  VM lower dir --overlay (upper = tmpfs)-->  VM /
#   VM_SHARE_DIR --9p, read-write--> the same path in the VM (keep test logs/results there)
#   console ttyS0           -> $VM_CACHE_DIR/logs/*.console.log (kernel + init messages)
#   virtio port thinvol.out -> this script's stdout (the command's output, nothing else)
# Boot: qemu -kernel /boot/vmlinuz-<ver> -initrd <small busybox initramfs built here and
# cached> ; initramfs-init.sh mounts the 9p root + overlay, /proc, /sys, /dev, cgroup2,
# tmpfs /tmp and /run, and switch_roots into guest-init.sh, which loads the dm-thin/loop/fs/
# docker modules, runs the job and prints THINVOL-VM-EXIT=<rc> on the console, which this
# script reads back.
#
# Variables (all optional):
#   VM_TIMEOUT=1800      seconds before the VM is killed (exit 124)
#   VM_MEMORY=4G         guest RAM (qemu -m syntax)
#   VM_CPUS=2            guest vCPUs
#   VM_SHARE_DIR=<repo>/.cache/vm/out   host dir mounted read-write at the same path
#   VM_ENV="A B,C"       extra variable names to pass into the VM (CI, THINVOL_*, POOL_*
#                        always pass)
#   VM_TMPFS_SIZE=16G    size limit of the tmpfs behind the overlay root and of /tmp
#                        (RAM-backed; only used space costs memory)
#   VM_CPU=Nehalem       qemu -cpu model. Not "max": it offers AVX and AVX2, whose software
#                        emulation in Debian 12's QEMU 7.2 crashed node in the VM (SIGSEGV)
#                        now and then; Nehalem is x86-64-v2, all that Node needs.
#   VM_ACCEL=tcg         qemu accelerator; KVM exists on the dev machine but hangs, so TCG is
#                        the default. Set VM_ACCEL=kvm where KVM is known to work.
#   VM_KERNEL=<ver>      kernel version to boot (default: newest /boot/vmlinuz-* that has
#                        /lib/modules/<ver>)
#   VM_CACHE_DIR=<repo>/.cache/vm       initramfs, logs, per-run job files
#   VM_DEBUG=1           full kernel messages in the console log, console copied to stderr
#   VM_DISK=<file>       raw disk image attached as virtio-blk /dev/vda (serial thinvol-disk);
#                        created sparse if missing. Kept after the VM: boot again on it.
#   VM_DISK_SIZE=4G      size of a VM_DISK that does not exist yet (truncate -s syntax)
#   VM_DISK_CACHE=none   qemu cache mode of VM_DISK. With none (O_DIRECT) or writeback a
#                        guest flush is an fdatasync of the file, and a SIGKILL of qemu loses
#                        nothing qemu had written; unsafe (drops flushes) is refused.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

cache=${VM_CACHE_DIR:-$repo/.cache/vm}
timeout_s=${VM_TIMEOUT:-1800}
memory=${VM_MEMORY:-4G}
cpus=${VM_CPUS:-2}
share=${VM_SHARE_DIR:-$cache/out}
tmpfs_size=${VM_TMPFS_SIZE:-16G}
accel=${VM_ACCEL:-tcg}
debug=${VM_DEBUG:-}
disk=${VM_DISK:-}
disk_size=${VM_DISK_SIZE:-4G}
disk_cache=${VM_DISK_CACHE:-none}

die() {
  echo "vm.sh: $*" >&2
  exit 125
}

if (($# == 0)); then
  sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
# wait -n -p (below) needs bash 5.1.
((BASH_VERSINFO[0] > 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] >= 1))) || die "needs bash >= 5.1"
[[ $timeout_s =~ ^[0-9]+$ ]] || die "VM_TIMEOUT must be a number of seconds, got '$timeout_s'"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found; run: bash test/vm/setup.sh"
case $disk_cache in
  none | writeback | writethrough | directsync) ;;
  *) die "VM_DISK_CACHE must be none, writeback, writethrough or directsync (a power-cut test needs flushes honoured), got '$disk_cache'" ;;
esac
if [[ -n $disk ]]; then
  [[ $disk != *,* ]] || die "VM_DISK must not contain a comma (qemu -drive syntax): $disk"
  mkdir -p "$(dirname "$disk")"
  [[ -e $disk ]] || truncate -s "$disk_size" "$disk" || die "cannot create VM_DISK $disk"
  [[ -f $disk && -w $disk ]] || die "VM_DISK $disk is not a writable regular file"
fi

mkdir -p "$cache/logs" "$cache/runs" "$share"
cache=$(cd "$cache" && pwd)
share=$(cd "$share" && pwd)
# These paths travel on the kernel command line, which splits on whitespace.
for p in "$here" "$cache" "$share"; do
  [[ $p != *[[:space:]]* ]] || die "path '$p' contains whitespace; set VM_CACHE_DIR/VM_SHARE_DIR elsewhere"
done

# --- kernel ----------------------------------------------------------------------------------
# Debian's linux-image-amd64 puts vmlinuz and its modules on disk even though the host runs
# another kernel. Pick the newest version that has both.
find_kernel() {
  local k v best=
  shopt -s nullglob
  for k in /boot/vmlinuz-*; do
    v=${k#/boot/vmlinuz-}
    [[ -f /lib/modules/$v/modules.dep ]] || continue
    if [[ -z $best ]] || [[ $(printf '%s\n%s\n' "$best" "$v" | sort -V | tail -n1) == "$v" ]]; then
      best=$v
    fi
  done
  shopt -u nullglob
  echo "$best"
}
kver=${VM_KERNEL:-$(find_kernel)}
[[ -n $kver && -r /boot/vmlinuz-$kver ]] ||
  die "no bootable Debian kernel (/boot/vmlinuz-<ver> + /lib/modules/<ver>); run: bash test/vm/setup.sh"
moddir=/lib/modules/$kver

# --- initramfs -------------------------------------------------------------------------------
# Only what is needed to reach the host's files: busybox, the stage-1 init, and the modules
# for virtio-pci, 9p, overlayfs and the virtio console port. Everything else (dm-thin, loop,
# ext4, ...) is loaded later by modprobe from the overlay root.
initramfs_modules=(virtio_pci virtio_console 9pnet_virtio 9p overlay)

# Print the .ko paths (relative to $moddir) to load, dependencies first, each once.
resolve_modules() {
  local name line path deps d i
  local -A seen=()
  for name in "$@"; do
    if grep -qE "/${name//_/[-_]}\.ko(\.[a-z]+)?$" "$moddir/modules.builtin"; then
      continue # built into this kernel
    fi
    line=$(grep -E "/${name//_/[-_]}\.ko(\.[a-z]+)?:" "$moddir/modules.dep" | head -n1) ||
      die "module $name not found in $moddir/modules.dep"
    path=${line%%:*}
    read -r -a deps <<<"${line#*:}"
    # modules.dep lists the full dependency closure; modprobe loads it back to front.
    for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
      d=${deps[i]}
      [[ -n ${seen[$d]:-} ]] || { seen[$d]=1; echo "$d"; }
    done
    [[ -n ${seen[$path]:-} ]] || { seen[$path]=1; echo "$path"; }
  done
}

# The checkout, made visible in the VM even where it lies under /tmp or /run.
repo_root=$(cd "$here/../.." && pwd)
[[ $repo_root =~ [[:space:]] ]] && die "the checkout's path has white space, which the kernel command line cannot carry: $repo_root"
busybox_bin=$(command -v busybox || true)
[[ -n $busybox_bin ]] || die "busybox not found; run: bash test/vm/setup.sh"
# A dynamically linked busybox would need its libraries in the initramfs: insist on static.
if ldd "$busybox_bin" >/dev/null 2>&1; then
  die "$busybox_bin is not statically linked; install busybox-static (bash test/vm/setup.sh)"
fi

mapfile -t mods < <(resolve_modules "${initramfs_modules[@]}")
# Rebuild when any input changes: the stage-1 script, busybox, the kernel's modules.
key=$(
  {
    echo "$kver"
    sha256sum "$here/initramfs-init.sh" "$busybox_bin"
    for m in "${mods[@]}"; do stat -c '%n %s %Y' "$moddir/$m"; done
  } | sha256sum | cut -c1-16
)
initrd=$cache/initramfs-$kver-$key.cpio.gz

build_initramfs() {
  local tmp m base
  tmp=$(mktemp -d "$cache/initramfs.XXXXXX")
  mkdir -p "$tmp"/{bin,dev,proc,sys,modules}
  cp "$busybox_bin" "$tmp/bin/busybox"
  cp "$here/initramfs-init.sh" "$tmp/init"
  chmod 755 "$tmp/init" "$tmp/bin/busybox"
  : >"$tmp/modules/order"
  for m in "${mods[@]}"; do
    base=${m##*/}
    # busybox insmod wants plain .ko files.
    case $base in
      *.ko.xz) xz -dc "$moddir/$m" >"$tmp/modules/${base%.xz}"; base=${base%.xz} ;;
      *.ko.zst) zstd -qdc "$moddir/$m" >"$tmp/modules/${base%.zst}"; base=${base%.zst} ;;
      *.ko.gz) gzip -dc "$moddir/$m" >"$tmp/modules/${base%.gz}"; base=${base%.gz} ;;
      *) cp "$moddir/$m" "$tmp/modules/$base" ;;
    esac
    echo "$base" >>"$tmp/modules/order"
  done
  # The kernel opens /dev/console of the initramfs as /init's stdio (root can mknod; the
  # stage-1 script also re-opens it from devtmpfs in case this failed).
  mknod -m 600 "$tmp/dev/console" c 5 1 2>/dev/null || true
  (cd "$tmp" && find . -print0 | cpio --null -o -H newc -R 0:0 --quiet) | gzip -1 >"$tmp.cpio.gz"
  mv "$tmp.cpio.gz" "$initrd"
  rm -rf "$tmp"
  # Drop initramfs images built from older inputs.
  find "$cache" -maxdepth 1 -name 'initramfs-*.cpio.gz' ! -name "${initrd##*/}" -delete
}

if [[ ! -f $initrd ]]; then
  # Parallel vm.sh runs: one builds, the others wait.
  exec 9>"$cache/initramfs.lock"
  flock 9
  [[ -f $initrd ]] || build_initramfs
  flock -u 9
  exec 9>&-
fi

# --- the job ---------------------------------------------------------------------------------
# A bash script on the host, visible in the VM through the 9p root: environment, working
# directory, command. Everything is %q-quoted so arguments arrive exactly as given.
run=$(mktemp -d "$cache/runs/run.XXXXXX")
run_id=$(date +%Y%m%d-%H%M%S)-${run##*.}
console_log=$cache/logs/$run_id.console.log
qemu_log=$cache/logs/$run_id.qemu.log
job=$run/job.sh

pass_names=(CI)
while read -r name; do
  if [[ $name == THINVOL_* || $name == POOL_* ]]; then pass_names+=("$name"); fi
done < <(compgen -e)
if [[ -n ${VM_ENV:-} ]]; then
  read -r -a extra <<<"${VM_ENV//,/ }"
  pass_names+=("${extra[@]}")
fi
{
  echo "# written by test/vm/vm.sh"
  for name in "${pass_names[@]}"; do
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "VM_ENV: '$name' is not a variable name"
    if [[ -n ${!name+set} ]]; then
      printf 'export %s=%q\n' "$name" "${!name}"
    fi
  done
  printf 'cd -- %q || { echo "vm.sh: working directory %q is not visible in the VM (host /tmp and /run are not shared, except the checkout)" >&2; exit 125; }\n' "$PWD" "$PWD"
  printf '%q ' "$@"
  echo
} >"$job"

# --- qemu ------------------------------------------------------------------------------------
qemu_pid= cat_pid= timer_pid= tail_pid= powercut=
cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  if [[ -n $qemu_pid ]] && kill -0 "$qemu_pid" 2>/dev/null; then
    kill -TERM "$qemu_pid" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      kill -0 "$qemu_pid" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
  fi
  for pid in $timer_pid $cat_pid $tail_pid; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$run"
  # Keep the newest 20 runs' logs.
  ls -1t "$cache/logs"/*.console.log 2>/dev/null | tail -n +21 | while read -r f; do
    rm -f "$f" "${f%.console.log}.qemu.log"
  done
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "vm.sh: interrupted" >&2; exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
# A power cut on request: no shutdown, no flush, exactly like pulling the plug.
trap 'powercut=1; [[ -z $qemu_pid ]] || kill -KILL "$qemu_pid" 2>/dev/null || true' USR1

# The command's output travels guest port -> qemu -> fifo -> cat -> our stdout. cat writes
# through our own stdout descriptor, so pipes, ttys, files (offsets stay shared with the
# caller) and sockets all behave; qemu's stdin is /dev/null so it never touches a terminal
# and the VM runs the same with or without one.
fifo=$run/out.fifo
mkfifo "$fifo"
cat "$fifo" &
cat_pid=$!

cmdline=(
  console=ttyS0
  panic=-1                   # PID 1 dying reboots at once, which -no-reboot turns into exit
  rdinit=/init
  8250.nr_uarts=1            # no time spent probing absent serial ports
  i8042.noaux i8042.nomux i8042.nopnp
  mitigations=off            # speed: TCG is slow enough already
  random.trust_cpu=on        # CRNG ready at once (dockerd, node want random numbers)
  "thinvol.init=$here/guest-init.sh"
  "thinvol.job=$job"
  "thinvol.share=$share"
  "thinvol.expose=$repo_root"
  "thinvol.tmpfs=$tmpfs_size"
  "thinvol.9pcache=loose"    # the host does not change files under a running VM
)
if [[ -n $debug ]]; then cmdline+=(loglevel=7); else cmdline+=(quiet); fi

bios=()
# qboot boots a -kernel much faster than SeaBIOS.
[[ -r /usr/share/qemu/qboot.rom ]] && bios=(-bios /usr/share/qemu/qboot.rom)

qemu=(
  qemu-system-x86_64
  -accel "$accel"
  -machine pc
  -cpu "${VM_CPU:-Nehalem}"
  -smp "$cpus"
  -m "$memory"
  -nographic -nodefaults -no-user-config   # no display, no default devices, no monitor
  -no-reboot
  "${bios[@]}"
  -kernel "/boot/vmlinuz-$kver"
  -initrd "$initrd"
  -append "${cmdline[*]}"
  -serial "file:$console_log"
  -device virtio-serial-pci,id=vser
  -chardev "file,id=out,path=$fifo"
  -device virtserialport,bus=vser.0,chardev=out,name=thinvol.out
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap
  -virtfs "local,path=$share,mount_tag=hostshare,security_model=none,multidevs=remap"
  -device virtio-rng-pci
  -nic none
)
if [[ -n $disk ]]; then
  qemu+=(
    -drive "file=$disk,format=raw,if=none,id=pdisk,cache=$disk_cache,aio=threads,discard=unmap"
    -device virtio-blk-pci,drive=pdisk,serial=thinvol-disk
  )
fi

: >"$console_log"
start=$(date +%s)
"${qemu[@]}" </dev/null >"$qemu_log" 2>&1 &
qemu_pid=$!
[[ -z $powercut ]] || kill -KILL "$qemu_pid" 2>/dev/null || true
# The timer is a plain sleep so that killing it leaves nothing behind.
sleep "$timeout_s" &
timer_pid=$!
if [[ -n $debug ]]; then
  tail -n +1 -F "$console_log" 2>/dev/null >&2 &
  tail_pid=$!
fi

finished=
# A trapped signal (SIGUSR1) interrupts wait without a job having finished: wait again.
while [[ -z ${finished:-} ]]; do
  wait -n -p finished "$qemu_pid" "$timer_pid" && continue
  (($? != 127)) || break
done
if [[ ${finished:-} == "$timer_pid" ]]; then
  timer_pid=
  echo "vm.sh: TIMEOUT: the VM ran longer than VM_TIMEOUT=${timeout_s}s and was killed" \
    "(console log: $console_log)" >&2
  exit 124
fi
wait "$qemu_pid" && qemu_rc=0 || qemu_rc=$?
qemu_pid=
# Let cat drain the last output: it ends when the fifo has no writer left. If qemu died
# before opening the fifo, cat is still blocked in open(); opening the fifo read-write
# (which never blocks) and closing it again releases it either way.
exec 8<>"$fifo"
exec 8>&-
wait "$cat_pid" 2>/dev/null || true
cat_pid=

if [[ -n $powercut ]]; then
  echo "vm.sh: power cut: qemu killed with SIGKILL on request after $(($(date +%s) - start))s (console log: $console_log)" >&2
  exit 137
fi

rc=$(tr -d '\r' <"$console_log" | grep -ao 'THINVOL-VM-EXIT=[0-9]*' | tail -n1 | cut -d= -f2 || true)
if [[ -z $rc ]]; then
  {
    echo "vm.sh: the VM stopped without reporting the command's exit status (qemu exit $qemu_rc, $(($(date +%s) - start))s)."
    echo "vm.sh: last console lines ($console_log):"
    tr -d '\r' <"$console_log" | tail -n 30 | sed 's/^/  | /'
    if [[ -s $qemu_log ]]; then
      echo "vm.sh: qemu said ($qemu_log):"
      tail -n 10 "$qemu_log" | sed 's/^/  | /'
    fi
  } >&2 || true
  exit 125
fi
ln -sfn "logs/${console_log##*/}" "$cache/console.log"
exit "$rc"
