#!/usr/bin/env bash
# Create .venv with consul-locker and its test tools, and make sure a `consul` binary is available.
# Idempotent; everything it installs lives inside the project (.venv, .cache).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# compat mode: a plain .pth path entry; the default editable finder costs ~11 ms at every start-up
.venv/bin/python -m pip install -q -e '.[test]' --config-settings editable_mode=compat
if ! command -v consul >/dev/null 2>&1; then
    bash scripts/install-consul.sh >/dev/null
fi
