"""Running consul-locker against a test agent, and looking at what it left in Consul."""

import os
import signal
import subprocess
import sys

from lib.consul_agent import ROOT, wait_until

# Where `python -m shim` finds the package: this checkout, or SHIM_SRC (another checkout, e.g. a known-good
# commit exported while the working tree is mid-change; -P keeps the current directory, which may be this
# checkout, off sys.path so that SHIM_SRC really wins).
SRC = os.environ.get("SHIM_SRC") or ROOT
LOCKER = [sys.executable, "-P", "-m", "shim"] if os.environ.get("SHIM_SRC") else [sys.executable, "-m", "shim"]


def locker_env(agent, **extra):
    env = dict(os.environ)
    for var in (
        "DEBUG",
        "CONSUL_HTTP_TOKEN",
        "CONSUL_HTTP_TOKEN_FILE",
        "CONSUL_HTTP_SSL",
        "CONSUL_CACERT",
        "CONSUL_CAPATH",
        "CONSUL_CLIENT_CERT",
        "CONSUL_CLIENT_KEY",
        "CONSUL_TLS_SERVER_NAME",
        "CONSUL_HTTP_SSL_VERIFY",
        "CONSUL_HTTP_AUTH",
        "NO_PROXY",
        "no_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
    ):
        env.pop(var, None)
    env["CONSUL_HTTP_ADDR"] = agent.addr
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Runner:
    """Start consul-locker processes against one agent."""

    def __init__(self, agent):
        self.agent = agent

    def popen(self, *args, env=None, **kw):
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        return subprocess.Popen(LOCKER + [str(a) for a in args], env=env or locker_env(self.agent), **kw)

    def run(self, *args, env=None, timeout=60, input=None, **kw):
        if input is not None:
            kw["stdin"] = subprocess.PIPE
        p = self.popen(*args, env=env, **kw)
        try:
            out, err = p.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            raise
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def sessions_named(agent, name):
    """Sessions whose name mentions this lock (consul-locker names them after the prefix)."""
    return [s for s in agent.sessions() if name in s.get("Name", "")]


def assert_no_session(agent, name, timeout=5.0):
    wait_until(lambda: not sessions_named(agent, name), timeout, message=f"no session left for {name}")


def lock_key(name):
    return f"consul-locker/{name}/.lock"


def stop(*procs):
    """SIGTERM each consul-locker (Popen) and wait for all of them."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.communicate(timeout=20)


def one_line(stderr):
    """The one line a usage or runtime error must be (no traceback); returned for further checks."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]
