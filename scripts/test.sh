#!/usr/bin/env bash
# The project's test command (README "Development"; .ci/run runs exactly this).
# Installs what it needs, lints (ruff, hadolint), then runs the whole pytest suite against real Consul agents.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/hadolint Dockerfile examples/mongodb/Dockerfile
# pytest's own exit code is kept: 5 ("no tests ran") fails this script like any other failure.
exec .venv/bin/python -m pytest "$@"
