#!/usr/bin/env bash
# A container engine and a Python base image for the container tests and for trying the images locally, with no
# Docker engine and no image registry: podman and runc from Debian's packages, and a base image made from Debian's
# packages by mmdebstrap (python3, venv, pip, passwd for useradd), imported into podman's storage.
#
# Usage: scripts/install-podman.sh            prints the base image's name (localhost/python-base:CODENAME)
#
# Idempotent and quiet: apt-get runs only when a tool is missing; the base image is made only when podman's
# storage lacks it, from the tarball cached under .cache/podman/ when there is one. The Debian archive URIs come
# from this machine's own apt sources, so no mirror is named here.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=$root/.cache/podman
# The same engine options as tests/lib/podman.py and docs/containers.md: crun refuses the hybrid cgroup layout of
# these kernels, runc with plain cgroupfs works.
podman=(podman --runtime runc --cgroup-manager=cgroupfs)

if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v mmdebstrap >/dev/null; then
    if [ "$(id -u)" != 0 ]; then
        echo "install-podman: podman, runc and mmdebstrap are needed; run as root, or: apt-get install podman runc mmdebstrap" >&2
        exit 1
    fi
    echo "install-podman: apt-get install podman runc mmdebstrap" >&2
    export DEBIAN_FRONTEND=noninteractive
    # Wait for another apt-get (another test run, unattended upgrades) instead of failing at once.
    apt-get -o DPkg::Lock::Timeout=300 update -qq >&2
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq podman runc mmdebstrap >/dev/null
fi

. /etc/os-release
codename=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}
image=localhost/python-base:$codename
tarball=$cache/python-base-$codename.tar

# Two test runs at once make the image once.
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
# The engine settings for commands that take no flags for them (`podman kube play` has no --ulimit):
#   CONTAINERS_CONF=.cache/podman/containers.conf podman kube play ...
cat >"$cache/containers.conf.tmp" <<'CONF'
# Written by scripts/install-podman.sh: runc with cgroupfs (crun refuses the hybrid cgroup layout), and limits that
# the sandbox lets a container have (the engine's defaults are higher and refused).
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
CONF
mv "$cache/containers.conf.tmp" "$cache/containers.conf"

# Bump when the image is made differently, so that machines that keep podman's storage get the new one.
revision=2
if [ "$("${podman[@]}" image inspect --format '{{index .Config.Labels "consul-locker.base-revision"}}' "$image" \
    2>/dev/null)" = "$revision" ]; then
    echo "$image"
    exit 0
fi

if [ ! -s "$tarball" ]; then
    # One-line apt entries for this codename (and its -updates/-security suites), main only, read from the host's
    # sources in either format (sources.list lines, deb822 .sources stanzas).
    sources=$(python3 - "$codename" <<'EOF'
import glob, re, sys

codename = sys.argv[1]
entries = []


def keep(types, uris, suites):
    if "deb" not in types:
        return
    for uri in uris:
        for suite in suites:
            if suite == codename or suite.startswith(codename + "-"):
                entries.append(f"deb {uri} {suite} main")


for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
        if len(line) >= 3:
            keep([line[0]], [line[1]], [line[2]])
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        fields, key = {}, None
        for line in stanza.splitlines():
            if line.startswith("#"):
                continue
            if line[:1].isspace() and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        keep(fields.get("types", "").split(), fields.get("uris", "").split(), fields.get("suites", "").split())
print("\n".join(dict.fromkeys(entries)))
EOF
)
    if [ -z "$sources" ]; then
        echo "install-podman: no apt source for $codename in /etc/apt/sources.list*" >&2
        exit 1
    fi
    echo "install-podman: building the base image $image with mmdebstrap (about a minute)" >&2
    # Documentation, manual pages and translations are left out: they only make the image larger.
    printf '%s\n' "$sources" | mmdebstrap --quiet --variant=minbase \
        --include=python3,python3-venv,python3-pip,python-is-python3,passwd \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --format=tar "$codename" "$tarball.tmp" - >&2
    mv "$tarball.tmp" "$tarball"
fi

# What the official python image sets, so that the Dockerfile behaves the same on both bases.
"${podman[@]}" import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --change "LABEL consul-locker.base-revision=$revision" \
    "$tarball" "$image" >/dev/null
echo "$image"
