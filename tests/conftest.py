"""Fixtures: a real Consul dev agent on free loopback ports, and a runner for consul-locker against it.

Shared code lives in tests/lib (the agent starter, the fault proxy, the probe child, the runner); test modules
import from there, never from each other.
"""

import itertools
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lib.consul_agent import Agent, consul_binary  # noqa: E402
from lib.locker import Runner, lock_key  # noqa: E402

from shim.protocol import LOCK_FLAG  # noqa: E402

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


@pytest.fixture
def locker(consul):
    return Runner(consul)


@pytest.fixture
def hold_lock(consul):
    """hold_lock(name) -> session: the test's own session (not consul-locker's) takes NAME's lock key, with
    lock-delay 0, so that a consul-locker started next waits; destroying the session frees the key at once. The
    sessions are destroyed at the end of the test."""
    made = []

    def hold(name):
        sid = consul.api("PUT", "/v1/session/create", {"Name": "test holder", "TTL": "60s", "LockDelay": "0s"})["ID"]
        made.append(sid)
        assert consul.api("PUT", f"/v1/kv/{lock_key(name)}?acquire={sid}&flags={LOCK_FLAG}", b"test") is True
        return sid

    yield hold
    for sid in made:
        consul.api("PUT", f"/v1/session/destroy/{sid}")
