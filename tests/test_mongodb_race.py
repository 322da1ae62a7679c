"""The MongoDB bootstrap race, for real: several bootstraps under consul-locker at once, a real Consul.

MongoDB itself is the bootstrap's file-backed fake (--fake-state): one JSON state shared by all processes under
fcntl, recording every replSetInitiate and add. The peer lookup is real: the members are registered in Consul's
catalog, and a stand-in for Consul's script check (`bootstrap.py check`) keeps each one's health in step with its
replica-set state, as in examples/mongodb: passing only once the member is PRIMARY or SECONDARY.
"""

import json
import os
import subprocess
import sys
import threading

import pytest
from lib.consul_agent import ROOT, free_port, wait_until
from lib.locker import LOCKER, assert_no_session, locker_env
from test_mongodb_bootstrap import BOOTSTRAP, bs

CHECK_STATUS = {0: "passing", 1: "warning"}  # anything else: critical


class Fleet:
    """Fake mongods named mongo1:27017..., registered as external nodes of a Consul service of their own."""

    def __init__(self, consul, name, tmp_path, members, up=None):
        self.consul, self.name = consul, name
        self.service = f"mongodb-{name}"
        self.members = [f"mongo{i}:27017" for i in range(1, members + 1)]
        self.state = str(tmp_path / "mongodb-state.json")
        with open(self.state, "w") as f:
            json.dump(
                {
                    "members": {m: {"up": up is None or m in up} for m in self.members},
                    "sets": {},
                    "calls": [],
                    "ready_after": 0.2,
                },
                f,
            )
        self.config = str(tmp_path / "mongod.conf")
        with open(self.config, "w") as f:
            f.write("net:\n  port: 27017\n  bindIp: 127.0.0.1\nreplication:\n  replSetName: rs0\n")
        self.fake = bs.FakeBackend(self.state)
        self._stop = threading.Event()
        self._checker = None
        self.registered = {}

    def node(self, member):
        return f"{self.name}-{member.split(':')[0]}"

    def register(self, member, status):
        host, port = member.split(":")
        self.consul.api(
            "PUT",
            "/v1/catalog/register",
            {
                "Node": self.node(member),
                "Address": "127.0.0.1",
                "Service": {"ID": "mongodb", "Service": self.service, "Address": host, "Port": int(port)},
                "Check": {"CheckID": "mongodb-member", "Name": "replica set member", "ServiceID": "mongodb",
                          "Status": status},
            },
        )  # fmt: skip
        self.registered[member] = status

    def check_once(self):
        for member in self.members:
            try:
                code, _ = bs.check_status(self.fake.repl_status(member))
            except bs.MemberUnreachable:
                code = 2
            status = CHECK_STATUS.get(code, "critical")
            if self.registered.get(member) != status:
                self.register(member, status)

    def run_checks(self, interval=0.1):
        """Stand in for Consul running `bootstrap.py check` on every member every `interval` seconds."""
        self.check_once()

        def loop():
            while not self._stop.wait(interval):
                self.check_once()

        self._checker = threading.Thread(target=loop, daemon=True)
        self._checker.start()

    def calls(self, op=None):
        with open(self.state) as f:
            calls = json.load(f)["calls"]
        return [c for c in calls if op is None or c["op"] == op]

    def sets(self):
        with open(self.state) as f:
            state = json.load(f)
        return {m: s.get("set") for m, s in state["members"].items()}

    def bootstrap(self, member, *extra, locked=True, env=None):
        cmd = [sys.executable, BOOTSTRAP, "--config", self.config, "--advertise", member, "--service", self.service,
               "--fake-state", self.state, "--timeout", "30", *extra]  # fmt: skip
        if locked:
            cmd = LOCKER + [f"mongodb-bootstrap-{self.name}"] + cmd
        return subprocess.Popen(
            cmd, env=env or locker_env(self.consul), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def close(self):
        self._stop.set()
        if self._checker:
            self._checker.join(5)
        for member in self.registered:
            self.consul.api("PUT", "/v1/catalog/deregister", {"Node": self.node(member)})


@pytest.fixture
def fleet(consul, name, tmp_path):
    fleets = []

    def make(members=3, up=None):
        fleets.append(Fleet(consul, name, tmp_path, members, up))
        return fleets[-1]

    yield make
    for f in fleets:
        f.close()


def finish(procs, timeout=45):
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stderr))
    return out


@pytest.mark.timeout(90)
def test_three_bootstraps_at_once_initiate_once_and_add_twice(fleet, consul, name):
    f = fleet(3)
    f.run_checks()
    results = finish([f.bootstrap(m) for m in f.members])
    assert [rc for rc, _ in results] == [0, 0, 0], results
    initiates, adds = f.calls("initiate"), f.calls("add")
    assert len(initiates) == 1 and len(adds) == 2, f.calls()
    first = initiates[0]
    assert all(a["primary"] == first["host"] and a["set"] == first["set"] for a in adds)
    assert {a["host"] for a in adds} | {first["host"]} == set(f.members)
    assert set(f.sets().values()) == {first["set"]}
    # each act happened under its own hold of the lock, in the order of the holds
    calls = f.calls()
    indexes = [int(c["lock_index"]) for c in calls]
    assert indexes == sorted(set(indexes)), calls
    assert_no_session(consul, name)


def test_never_initiates_when_consul_cannot_be_asked(fleet, consul):
    f = fleet(3)
    closed = f"http://127.0.0.1:{free_port()}"
    p = f.bootstrap(f.members[0], "--consul-addr", closed)
    (rc, stderr), = finish([p])  # fmt: skip
    assert rc == bs.RETRY and "cannot ask Consul" in stderr, stderr
    assert f.calls() == []


def test_never_initiates_when_a_passing_peer_does_not_answer(fleet):
    f = fleet(2, up={"mongo1:27017"})
    f.register("mongo1:27017", "warning")  # not initiated yet
    f.register("mongo2:27017", "passing")  # Consul still says passing; its mongod is gone
    (rc, stderr), = finish([f.bootstrap("mongo1:27017")])  # fmt: skip
    assert rc == bs.RETRY and "mongo2:27017" in stderr, stderr
    assert f.calls() == []


def test_never_initiates_when_consul_does_not_list_this_member(fleet):
    # e.g. another service name, or a token whose ACL hides the service: Consul's "nobody" means nothing then
    f = fleet(3)
    (rc, stderr), = finish([f.bootstrap("mongo1:27017")])  # fmt: skip
    assert rc == bs.RETRY and "does not list mongo1:27017" in stderr, stderr
    assert f.calls() == []


def test_joins_a_replica_set_that_already_exists(fleet):
    f = fleet(3)
    f.fake.initiate("mongo1:27017", {"_id": "rs0", "members": [{"_id": 0, "host": "mongo1:27017"}]})
    f.run_checks()
    # only a member that is PRIMARY or SECONDARY passes its check, and only passing members are peers
    wait_until(lambda: f.registered.get("mongo1:27017") == "passing", 10, message="mongo1 passing in Consul")
    (rc, stderr), = finish([f.bootstrap("mongo3:27017")])  # fmt: skip
    assert rc == 0, stderr
    assert [(c["op"], c["host"]) for c in f.calls()] == [("initiate", "mongo1:27017"), ("add", "mongo3:27017")]


def test_refuses_to_run_outside_consul_locker(fleet, consul):
    f = fleet(1)
    env = {k: v for k, v in locker_env(consul).items() if not k.startswith("CONSUL_LOCK")}
    (rc, stderr), = finish([f.bootstrap("mongo1:27017", locked=False, env=env)])  # fmt: skip
    assert rc == bs.USAGE and "consul-locker" in stderr
    assert f.calls() == []


def test_bootstrap_runs_from_the_project_root_as_documented(fleet, consul, name):
    """The command line of examples/mongodb/README.md's test recipe: python -m shim mongodb-bootstrap python ..."""
    f = fleet(1)
    f.run_checks()
    r = subprocess.run(
        [sys.executable, "-m", "shim", f"mongodb-bootstrap-{name}", sys.executable,
         os.path.relpath(BOOTSTRAP, ROOT), "--config", f.config, "--advertise", "mongo1:27017",
         "--service", f.service, "--timeout", "30"],
        cwd=ROOT,
        env=locker_env(consul, MONGODB_BOOTSTRAP_FAKE_STATE=f.state),
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert [c["op"] for c in f.calls()] == ["initiate"]
