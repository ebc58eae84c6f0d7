#!/usr/bin/env bash
# Installs the system tools thinvol's tests drive on this host (Debian/Ubuntu), only when missing.
set -euo pipefail
need=()
command -v mkfs.xfs >/dev/null || need+=(xfsprogs)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v thin_check >/dev/null || need+=(thin-provisioning-tools)
command -v losetup >/dev/null || need+=(util-linux)
command -v fsfreeze >/dev/null || need+=(util-linux)
command -v dmsetup >/dev/null || need+=(dmsetup)
# The plugin's rootfs for amd64 and arm64 (build/plugin.sh): Debian packages of each
# architecture fetched with mmdebstrap, arm64's tools checked under qemu user emulation
# and its Node binary stripped. mmdebstrap also builds the e2e tier's PostgreSQL image.
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v aarch64-linux-gnu-strip >/dev/null || need+=(binutils-aarch64-linux-gnu)
# The e2e tier: a real registry to push the plugin to and install it from, and Compose
# for the README's example.
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v docker-compose >/dev/null || need+=(docker-compose)
if [ ${#need[@]} -gt 0 ]; then
  echo "host-setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -q
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need[@]}" </dev/null
fi
# Loop devices are created on demand through /dev/loop-control; make sure it is there.
[ -e /dev/loop-control ] || modprobe loop 2>/dev/null || true
