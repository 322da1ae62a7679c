#!/usr/bin/env bash
# Create .venv with consul-locker and its test tools, and make sure a `consul` binary is available.
# Idempotent and quiet: everything it installs lives inside the project (.venv, .cache); pip runs again only
# when pyproject.toml changed since the last install (or the venv is new). Errors still show.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=.venv/.consul-locker-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
installed='import importlib.metadata as m, requests, psutil; m.version("consul-locker")'
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c "$installed" 2>/dev/null; then
    .venv/bin/python -m pip install -qq --upgrade pip >/dev/null 2>&1 || true
    # -qq: errors only (not the machine's pip-config warnings nor setuptools' notes on editable installs)
    .venv/bin/python -m pip install -qq -e '.[test]'
    echo "$want" >"$stamp"
fi
if ! command -v consul >/dev/null 2>&1; then
    bash scripts/install-consul.sh >/dev/null
fi
