#!/usr/bin/env bash
# Pushes assembled plugin directories (build/plugin.sh) to a registry, tagged the way
# managed plugins are: a plugin cannot be a manifest list, so each architecture has tags
# of its own.
#
#   build/plugin-push.sh REPOSITORY PLUGIN_DIR...
#   build/plugin-push.sh docker.io/acme/thinvol dist/plugin-amd64 dist/plugin-arm64
#
# For version V of a directory built for ARCH it pushes
#   REPOSITORY:V-ARCH     every architecture
#   REPOSITORY:ARCH       every architecture, unless V is a pre-release (1.3.0-rc.1)
#   REPOSITORY:V          amd64
#   REPOSITORY:latest     amd64, unless V is a pre-release
# V and ARCH come from each directory's rootfs/etc/thinvol-release. Each tag pushed is
# printed on stdout, one a line; progress goes to stderr.
#
# PLUGIN_PUSH_DRY_RUN=1 prints the tags without calling docker.
set -euo pipefail

log() { printf '[plugin-push] %s\n' "$*" >&2; }
die() { printf '[plugin-push] error: %s\n' "$*" >&2; exit 1; }

(($# >= 2)) || die "usage: $0 REPOSITORY PLUGIN_DIR..."
readonly repository=$1
shift
# A tag would sit after a colon in the last path element (a colon before it is a port).
[[ $repository != *@* && ${repository##*/} != *:* ]] ||
  die "REPOSITORY=$repository must have no tag or digest (the tags come from the plugin's version and architecture)"

# The tags of one build, by the convention above.
release_tags() {
  local version=$1 arch=$2
  local prerelease=0
  [[ $version == *-* ]] && prerelease=1
  echo "$version-$arch"
  ((prerelease)) || echo "$arch"
  if [[ $arch == amd64 ]]; then
    echo "$version"
    ((prerelease)) || echo latest
  fi
}

# KEY from DIR's rootfs/etc/thinvol-release.
release_field() {
  local dir=$1 key=$2 file=$1/rootfs/etc/thinvol-release
  [[ -f $file ]] || die "$dir is not an assembled plugin ($file is missing; build it with build/plugin.sh)"
  sed -n "s/^$key=//p" "$file"
}

push_tag() {
  local dir=$1 ref=$2 out
  # A leftover of an earlier push would make create fail.
  docker plugin rm -f "$ref" >/dev/null 2>&1 || true
  log "docker plugin create $ref $dir"
  out=$(docker plugin create "$ref" "$dir" 2>&1) || die "docker plugin create $ref $dir failed: $out"
  log "docker plugin push $ref"
  if ! out=$(docker plugin push "$ref" 2>&1); then
    docker plugin rm -f "$ref" >/dev/null 2>&1 || true
    die "docker plugin push $ref failed: $out"
  fi
  docker plugin rm -f "$ref" >/dev/null
}

# Pushes every tag of one plugin directory and prints them, in order.
push_dir() {
  local dir=$1 version arch tag
  [[ -f $dir/config.json ]] || die "$dir has no config.json"
  version=$(release_field "$dir" VERSION)
  arch=$(release_field "$dir" ARCH)
  [[ -n $version && -n $arch ]] || die "$dir/rootfs/etc/thinvol-release names no VERSION or ARCH"
  for tag in $(release_tags "$version" "$arch"); do
    if [[ ${PLUGIN_PUSH_DRY_RUN:-0} != 1 ]]; then push_tag "$dir" "$repository:$tag"; fi
    echo "$repository:$tag"
  done
}

# One at a time: the engine's plugin store does not take concurrent creates and pushes
# (tried: pushes then fail with "unexpected EOF" and creates with a broken pipe).
for dir in "$@"; do push_dir "$dir"; done
