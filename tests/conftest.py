"""Fixtures: a real Consul dev agent on free loopback ports, and helpers to run consul-locker against it."""

import itertools
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from consul_agent import ROOT, Agent, consul_binary, wait_until  # noqa: E402

LOCKER = [sys.executable, "-m", "shim"]
_names = itertools.count()


@pytest.fixture(scope="session")
def consul(tmp_path_factory):
    """One dev agent for the whole run; tests keep apart by using distinct lock names."""
    agent = Agent("dev", log_dir=str(tmp_path_factory.mktemp("consul"))).start()
    yield agent
    agent.cleanup()


@pytest.fixture(scope="session")
def consul_bin():
    return consul_binary()


@pytest.fixture
def name(request):
    """A lock name unique to this test."""
    base = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")[:60]
    return f"{base}-{next(_names)}"


def locker_env(agent, **extra):
    env = dict(os.environ)
    for var in ("DEBUG", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE", "CONSUL_HTTP_SSL", "CONSUL_CACERT"):
        env.pop(var, None)
    env["CONSUL_HTTP_ADDR"] = agent.addr
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
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


@pytest.fixture
def locker(consul):
    return Runner(consul)


def sessions_named(agent, name):
    """Sessions whose name mentions this lock (consul-locker names them after the prefix)."""
    return [s for s in agent.sessions() if name in s.get("Name", "")]


def assert_no_session(agent, name, timeout=5.0):
    wait_until(lambda: not sessions_named(agent, name), timeout, message=f"no session left for {name}")


def lock_key(name):
    return f"consul-locker/{name}/.lock"


__all__ = ["wait_until", "assert_no_session", "sessions_named", "lock_key", "locker_env", "LOCKER"]
