# shellcheck shell=bash
# shellcheck disable=SC2034 # the variables are this file's output
# Where Debian packages come from when this project builds a root filesystem with
# mmdebstrap (the plugin's rootfs, the tests' PostgreSQL image): source this file and
# call debian_apt, which sets
#   debian_suite     the Debian release
#   debian_sources   mmdebstrap MIRROR arguments
#   debian_aptopts   further mmdebstrap options (apt settings, keyring)
# On a Debian host: the host's own release, mirror and apt settings (proxies, mirror
# credentials). Elsewhere (Ubuntu runners): Debian bookworm from PLUGIN_DEBIAN_MIRROR,
# default http://deb.debian.org/debian, checked with debian-archive-keyring.

debian_host() {
  [[ -r /etc/os-release ]] && (. /etc/os-release && [[ ${ID:-} == debian ]])
}

debian_apt() {
  debian_sources=() debian_aptopts=()
  if [[ -n ${PLUGIN_DEBIAN_MIRROR:-} ]] || ! debian_host; then
    local mirror=${PLUGIN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
    debian_suite=bookworm
    debian_sources=(
      "deb $mirror $debian_suite main"
      "deb $mirror $debian_suite-updates main"
      "deb ${mirror%/debian}/debian-security $debian_suite-security main"
    )
    if [[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]]; then
      debian_aptopts+=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
    fi
    return 0
  fi
  debian_suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    debian_sources=(/etc/apt/sources.list.d/debian.sources)
  else
    debian_sources=(/etc/apt/sources.list)
  fi
  local f
  for f in /etc/apt/apt.conf.d/*; do
    if [[ -f $f ]]; then debian_aptopts+=(--aptopt="$f"); fi
  done
}
