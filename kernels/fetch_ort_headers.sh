#!/usr/bin/env bash
# Fetch the onnxruntime C API headers (Debian trixie's libonnxruntime-dev, 1.21) into build/ort-headers.
#
# Uses a private apt sources dir so the system's apt configuration is left untouched. The archive URIs
# are copied at run time from this machine's own /etc/apt/sources.list.d/debian.sources.
# Usage: bash kernels/fetch_ort_headers.sh [DEST]   (DEST defaults to build/ort-headers; idempotent)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$here/build/ort-headers}"
header="$dest/include/onnxruntime_c_api.h"
if [[ -f "$header" ]]; then
    echo "onnxruntime headers already present: $dest/include"
    exit 0
fi

# The machine's Debian archive: the first URIs line of the deb822 sources file (the main archive, not
# the security one), else the first "deb" line of a one-line-style sources.list.
sources=/etc/apt/sources.list.d/debian.sources
uri="" keyring=""
if [[ -r "$sources" ]]; then
    uri="$(awk '/^URIs:/ {print $2; exit}' "$sources")"
    keyring="$(awk '/^Signed-By:/ {print $2; exit}' "$sources")"
elif [[ -r /etc/apt/sources.list ]]; then
    uri="$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) { print $i; exit } }' /etc/apt/sources.list)"
fi
[[ -n "$uri" ]] || { echo "error: no Debian archive found in /etc/apt (needed to fetch libonnxruntime-dev)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/parts" "$work/lists/partial" "$work/cache/archives/partial"
{
    echo "Types: deb"
    echo "URIs: $uri"
    echo "Suites: trixie"
    echo "Components: main"
    [[ -n "$keyring" ]] && echo "Signed-By: $keyring"
} > "$work/parts/trixie.sources"

apt_opts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$work/parts"
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
apt-get "${apt_opts[@]}" update -qq
(cd "$work" && apt-get "${apt_opts[@]}" download libonnxruntime-dev)
deb="$(ls "$work"/libonnxruntime-dev_*.deb)"
dpkg -x "$deb" "$work/x"

src="$(dirname "$(find "$work/x" -name onnxruntime_c_api.h | head -n1)")"
[[ -f "$src/onnxruntime_c_api.h" ]] || { echo "error: onnxruntime_c_api.h not in $deb" >&2; exit 1; }
mkdir -p "$dest/include"
cp "$src"/*.h "$dest/include/"
echo "onnxruntime headers ($(basename "$deb")) -> $dest/include"
