#!/usr/bin/env bash
# Install the `consul` binary (agent + `consul lock`) without touching the system's apt configuration.
#
# Why this way: Consul is not packaged for Debian bookworm, but bullseye ships `consul` 1.8.7. We point apt at
# a private sources list for bullseye main, download only the .deb and unpack it with dpkg-deb -x into a
# directory of our own, so the host's package database and sources stay as they were.
#
# Usage: scripts/install-consul.sh [DEST]      (DEST defaults to .cache/consul under the project root)
# Prints the absolute path of the consul binary on stdout. Idempotent: a second run reuses the binary.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${1:-$root/.cache/consul}
bin=$dest/usr/bin/consul

if [ -x "$bin" ] && "$bin" version >/dev/null 2>&1; then
    echo "$bin"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$dest"
echo "deb http://deb.debian.org/debian bullseye main" >"$work/sources.list"

apt_opts=(
    -o "Dir::Etc::SourceList=$work/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::Cache=$work/cache"
    -o "Debug::NoLocking=1"
    -o "APT::Get::List-Cleanup=0"
    -o "APT::Sandbox::User=root"
)
echo "install-consul: fetching the bullseye package index" >&2
apt-get "${apt_opts[@]}" -qq update >&2
(cd "$work" && apt-get "${apt_opts[@]}" -qq download consul >&2)
deb=$(ls "$work"/consul_*.deb)
dpkg-deb -x "$deb" "$dest"
"$bin" version >&2
echo "$bin"
