#!/usr/bin/env bash
# dm-thin's figures, in the qemu VM (this machine's kernel has no device-mapper): fio on a
# plain directory, on a thinvol volume of each pool driver and on dm-thin straight on a
# block device, all on one virtual disk (virtio, cache=none). Under software emulation only
# the ratios mean anything. Figures only.
#
#   sudo npm run bench -- --vm
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo_root"
log() { printf '[bench-vm] %s\n' "$*" >&2; }

[[ $(id -u) -eq 0 ]] || { log "needs root (the VM)"; exit 1; }
bash test/vm/setup.sh >/dev/null
npm run -s build >/dev/null
work=$(mktemp -d /var/tmp/thinvol-bench-vm.XXXXXX)
trap 'rm -rf "$work"' EXIT
log "booting the VM (software emulation: a few minutes)"
out=$(VM_DISK=$work/disk.img VM_DISK_SIZE=8G VM_MEMORY=${VM_MEMORY:-4G} bash test/vm/vm.sh bash test/bench/vm-guest.sh 2>&1) || {
  printf '%s\n' "$out" | tail -40
  log "the VM run failed"
  exit 1
}
grep -q '^VMBENCH-END' <<<"$out" || { printf '%s\n' "$out" | tail -40; log "the guest did not finish"; exit 1; }

declare -A fig=()
while read -r _ stack job value; do fig[$stack.$job]=$value; done < <(grep '^VMBENCH ' <<<"$out")

printf '\nIn the VM (kernel %s, TCG, virtio disk cache=none): each stack against a plain directory on the same disk\n\n' \
  "$(sed -n 's/^VMBENCH-KERNEL //p' <<<"$out" | head -1)"
printf '| %-40s | %12s | %12s | %12s | %12s | %14s |\n' figure plain dm-thin loop dm-thin-raw dm-thin-device
printf '|%s|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..42})" "$(printf -- '-%.0s' {1..14})" "$(printf -- '-%.0s' {1..14})" "$(printf -- '-%.0s' {1..14})" "$(printf -- '-%.0s' {1..14})" "$(printf -- '-%.0s' {1..16})"
for job in seqwrite randwrite randread; do
  case $job in
    seqwrite) title="sequential write 1 MiB + fsync (MiB/s)" ;;
    randwrite) title="random write 4 KiB + fdatasync (IOPS)" ;;
    randread) title="random read 4 KiB, QD32, direct (IOPS)" ;;
  esac
  row="| $(printf '%-40s' "$title") | $(printf '%12s' "${fig[plain.$job]:-}")"
  for stack in dm-thin loop dm-thin-raw dm-thin-device; do
    row+=" | $(awk -v v="${fig[$stack.$job]:-}" -v p="${fig[plain.$job]:-}" 'BEGIN { if (v == "" || p == "" || p == 0) printf "%12s", "-"; else printf "%6s (%.2f)", v, v / p }')"
  done
  printf '%s |\n' "$row"
done
