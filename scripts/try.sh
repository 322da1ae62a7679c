#!/usr/bin/env bash
# Set up consul-locker and see it work: starts a throw-away Consul dev agent on free loopback ports, runs two
# copies of a command under one lock at the same time (they take turns), then stops the agent.
# Usage: scripts/try.sh [COMMAND ARG...]      (default: examples/10-second-wait a b, which exits 2)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh
[ $# -gt 0 ] || set -- examples/10-second-wait a b
exec .venv/bin/python - "$@" <<'PY'
import os, subprocess, sys
sys.path.insert(0, "tests")
from lib.consul_agent import Agent

agent = Agent("try").start()
try:
    env = dict(os.environ, CONSUL_HTTP_ADDR=agent.addr)
    print(f"== two copies of consul-locker on one lock (CONSUL_HTTP_ADDR={agent.addr}); they take turns", flush=True)
    procs = [subprocess.Popen([".venv/bin/consul-locker", "demo"] + sys.argv[1:], env=env) for _ in range(2)]
    codes = [p.wait() for p in procs]
    print(f"== exit codes: {codes} (the command's own)")
finally:
    agent.cleanup()
PY
