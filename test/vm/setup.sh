#!/usr/bin/env bash
# Install what test/vm/vm.sh needs on the host, if it is missing.
#
#   bash test/vm/setup.sh
#
# Idempotent and non-interactive: packages already installed are not touched, and
# apt-get runs only when something is missing. Debian 12 (bookworm) package names.
#
#   qemu-system-x86          qemu-system-x86_64 (TCG) and qboot.rom
#   linux-image-amd64        a Debian kernel WITH device-mapper/dm-thin modules; its
#                            /boot/vmlinuz-* and /lib/modules/<ver> are what the VM boots,
#                            whatever kernel the host itself runs
#   busybox-static           the VM's initramfs (mount 9p + overlay, switch_root)
#   kmod                     modprobe/depmod inside the VM
#   thin-provisioning-tools  thin_check & co. (used by the dm-thin driver and its tests)
#   dmsetup, util-linux, e2fsprogs, xfsprogs, iproute2
#                            the block-device tools the plugin drives
#   docker.io                dockerd/containerd/runc, started inside the VM by e2e tests
#   apparmor                 apparmor_parser: Debian's kernel has AppArmor on, and dockerd in
#                            the VM loads its container profile with it (as on Debian and
#                            Ubuntu hosts) or refuses to start containers
set -euo pipefail

packages=(
  qemu-system-x86
  linux-image-amd64
  busybox-static
  kmod
  thin-provisioning-tools
  dmsetup
  util-linux
  e2fsprogs
  xfsprogs
  iproute2
  docker.io
  apparmor
)

if [[ $(id -u) -ne 0 ]]; then
  echo "setup.sh: must run as root (it installs packages with apt-get)" >&2
  exit 1
fi

missing=()
for p in "${packages[@]}"; do
  # "install ok installed" is dpkg's state for a fully configured package.
  if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true) != "install ok installed" ]]; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  echo "setup.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Another apt-get may be running (e.g. a provisioning step): wait for its lock rather
  # than failing at once.
  apt_opts=(-y -q -o DPkg::Lock::Timeout=900 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
  # Refresh the package lists only if an install from the current lists fails.
  if ! apt-get install "${apt_opts[@]}" --no-install-recommends "${missing[@]}"; then
    apt-get update -q -o DPkg::Lock::Timeout=900
    apt-get install "${apt_opts[@]}" --no-install-recommends "${missing[@]}"
  fi
else
  echo "setup.sh: all VM packages already installed"
fi

# Sanity: a Debian kernel with its modules must exist for vm.sh to boot.
shopt -s nullglob
found=
for k in /boot/vmlinuz-*; do
  v=${k#/boot/vmlinuz-}
  [[ -f /lib/modules/$v/modules.dep ]] && found=$v
done
if [[ -z $found ]]; then
  echo "setup.sh: no /boot/vmlinuz-<ver> with /lib/modules/<ver>/modules.dep found" >&2
  exit 1
fi
echo "setup.sh: VM kernel available: $found"
