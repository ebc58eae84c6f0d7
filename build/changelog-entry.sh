#!/usr/bin/env bash
# Prints the entry of CHANGELOG.md for VERSION (the lines under its "## [VERSION]" heading,
# up to the next "## " heading), without the heading. Fails when there is none or it is
# empty: a release must say what it changes. The release workflow uses it for the notes.
#
#   build/changelog-entry.sh 0.1.0
set -euo pipefail
[[ $# -eq 1 && -n $1 ]] || { echo "usage: $0 VERSION" >&2; exit 2; }
changelog="$(dirname "${BASH_SOURCE[0]}")/../CHANGELOG.md"
[[ -f $changelog ]] || { echo "changelog-entry: $changelog is missing" >&2; exit 1; }
entry=$(awk -v v="$1" '
  /^## / { if (found) exit; heading = $0; sub(/^## +/, "", heading); sub(/ .*/, "", heading); gsub(/[][]/, "", heading); found = (heading == v); next }
  found { print }
' "$changelog" | sed -e '/./,$!d')
# Trailing blank lines go too.
entry=$(printf '%s\n' "$entry" | sed -e ':a' -e '/^\n*$/{$d;N;ba' -e '}')
[[ -n ${entry//[[:space:]]/} ]] || { echo "changelog-entry: CHANGELOG.md has no entry for $1 (a '## [$1]' heading with text under it)" >&2; exit 1; }
printf '%s\n' "$entry"
