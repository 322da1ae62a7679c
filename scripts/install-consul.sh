#!/usr/bin/env bash
# Install the `consul` binary (agent + `consul lock`) without touching the system's apt configuration.
#
# Why this way: Consul is not packaged for Debian bookworm, but bullseye ships `consul` 1.8.7. We point apt at
# a private sources list for bullseye main, download only the .deb and unpack it with dpkg-deb -x into a
# directory of our own, so the host's package database and sources stay as they were.
# The archive is the one this machine's apt already uses (its main Debian archive, not the security one, from
# deb822 `URIs:` in sources.list.d/*.sources or one-line `deb` entries): only the suite changes, to bullseye.
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

# Print "URI<TAB>KEYRING" (KEYRING may be empty) of the first main Debian archive in the machine's apt sources:
# a plain suite (no -security, -updates, -backports) on a URI that is not a security archive.
# APT_ETC (default /etc/apt) is there for trying the parsing on other sources.
debian_archive() {
    local f etc=${APT_ETC:-/etc/apt}
    for f in "$etc"/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        awk 'BEGIN { RS = ""; FS = "\n" }
        {
            delete v; key = ""
            for (i = 1; i <= NF; i++) {
                line = $i
                if (line ~ /^#/) continue
                if (line ~ /^[ \t]/ && key != "") { v[key] = v[key] " " line; continue }
                key = tolower(substr(line, 1, index(line, ":") - 1)); v[key] = substr(line, index(line, ":") + 1)
            }
            if (v["types"] !~ /(^|[ \t])deb([ \t]|$)/ || tolower(v["enabled"]) ~ /no/) next
            keyring = v["signed-by"]; gsub(/^[ \t]+|[ \t]+$/, "", keyring)
            if (keyring !~ /^\//) keyring = ""
            nu = split(v["uris"], uris, /[ \t]+/); ns = split(v["suites"], suites, /[ \t]+/)
            for (u = 1; u <= nu; u++) for (s = 1; s <= ns; s++)
                if (uris[u] != "" && uris[u] !~ /security/ && suites[s] ~ /^[a-z]+$/) {
                    print uris[u] "\t" keyring; exit
                }
        }' "$f"
    done
    for f in "$etc"/sources.list "$etc"/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        awk '$1 == "deb" {
            i = 2; keyring = ""
            if ($2 ~ /^\[/) {
                for (; i <= NF; i++) {
                    opt = $i; gsub(/[][]/, "", opt)
                    if (opt ~ /^signed-by=\//) keyring = substr(opt, 11)
                    if ($i ~ /\]$/) { i++; break }
                }
            }
            if ($i !~ /security/ && $(i + 1) ~ /^[a-z]+$/) { print $i "\t" keyring; exit }
        }' "$f"
    done
}

archive=$(debian_archive)
archive=${archive%%$'\n'*}
uri=${archive%%$'\t'*}
keyring=${archive#*$'\t'}
if [ -z "$uri" ]; then
    echo "install-consul: no Debian archive found in this machine's apt sources (/etc/apt/sources.list*)" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$dest"
echo "deb ${keyring:+[signed-by=$keyring] }$uri bullseye main" >"$work/sources.list"

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
