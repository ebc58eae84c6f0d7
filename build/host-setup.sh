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
if [ ${#need[@]} -gt 0 ]; then
  echo "host-setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need[@]}"
fi
# Loop devices are created on demand through /dev/loop-control; make sure it is there.
[ -e /dev/loop-control ] || modprobe loop 2>/dev/null || true
