"""The MongoDB bootstrap for real: bootstraps under consul-locker, a real Consul agent, a fake fleet of mongods.

MongoDB itself is tests/lib/mongo_fake.py: one JSON state shared by all processes under fcntl, recording every
replSetInitiate, reconfig and createUser. Consul is real: the members are registered in its catalog, and a
stand-in for Consul's script check keeps each one's health in step with its replica-set state (passing only while
PRIMARY or SECONDARY, as `bootstrap.py check`) -- or forced to warning or critical, as a check that times out, an
agent that restarts, an election, RECOVERING, or Unauthorized once auth is on make it in a real fleet.

Each scenario of issue 16 (items 1-3) is here; the module docstring of each test says what the old bootstrap did.
"""

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from lib.consul_agent import ROOT, free_port, wait_until
from lib.locker import LOCKER, assert_no_session, locker_env
from lib.mongo_fake import BOOTSTRAP, HERE, FakeBackend, health, load_bootstrap, new_state, read_state

bs = load_bootstrap()
REFUSED, RETRY, USAGE = 1, 3, 2  # bootstrap.py's exit codes (the same in every version)


class Fleet:
    """Fake mongods named mongo1:27017..., registered as external nodes of a Consul service of their own."""

    def __init__(self, consul, name, tmp_path, members, up=None, auth=False, ready_after=0.2):
        self.consul, self.name, self.tmp = consul, name, tmp_path
        self.service = f"mongodb-{name}"
        self.lock = f"mongodb-bootstrap-{name}"
        self.record_key = f"consul-locker/{self.lock}/replica-set/rs0"
        self.members = [f"mongo{i}:27017" for i in range(1, members + 1)]
        self.state = str(tmp_path / "mongodb-state.json")
        new_state(self.state, self.members, up=up, ready_after=ready_after, auth=auth)
        self.config = str(tmp_path / "mongod.conf")
        with open(self.config, "w") as f:
            f.write("net:\n  port: 27017\n  bindIp: 127.0.0.1\nreplication:\n  replSetName: rs0\n")
        self.password_file = tmp_path / "admin-password"
        self.password_file.write_text("s3cret\n")
        self.fake = FakeBackend(self.state, bs)  # the test's own view: a remote client, no credentials
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

    def edit(self, change):
        with self.fake.state(write=True) as state:
            change(state)

    def force_health(self, member, status):
        self.edit(lambda s: s["health"].__setitem__(member, status))

    def check_once(self):
        state = read_state(self.state)
        for member in self.members:
            status = health(state, member)
            if self.registered.get(member) != status:
                self.register(member, status)

    def run_checks(self, interval=0.1):
        """Stand in for Consul running the member's check every `interval` seconds."""
        self.check_once()

        def loop():
            while not self._stop.wait(interval):
                self.check_once()

        self._checker = threading.Thread(target=loop, daemon=True)
        self._checker.start()

    def calls(self, op=None):
        return [c for c in read_state(self.state)["calls"] if op is None or c["op"] == op]

    def sets(self):
        return {m: s.get("set") for m, s in read_state(self.state)["members"].items()}

    def initiate(self, member, **fields):
        """A set made outside the test's bootstraps (by hand, or by a run that left no record)."""
        FakeBackend(self.state, bs, {"127.0.0.1:27017": member}).initiate(
            "127.0.0.1:27017", {"_id": "rs0", "members": [{"_id": 0, "host": member}]}
        )
        set_id = self.sets()[member]
        self.edit(lambda s: s["members"][member].update(dict(ready_at=0, **fields)))  # elected at once
        return set_id

    def record(self):
        entry = self.consul.kv(self.record_key)
        if not entry:
            return None
        import base64

        return json.loads(base64.b64decode(entry["Value"]))

    def bootstrap(self, member, *extra, locked=True, env=None, timeout="30", auth=False):
        cmd = [sys.executable, HERE, self.state, "--config", self.config, "--advertise", member,
               "--service", self.service, "--timeout", timeout, *extra]  # fmt: skip
        if auth:
            cmd += ["--username", "admin", "--password-file", str(self.password_file)]
        if locked:
            cmd = LOCKER + [self.lock] + cmd
        # cwd: not the checkout, whose shim/ `python -m` would put ahead of SHIM_SRC
        return subprocess.Popen(cmd, env=env or locker_env(self.consul), cwd=self.tmp, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip

    def close(self):
        self._stop.set()
        if self._checker:
            self._checker.join(5)
        for member in self.registered:
            self.consul.api("PUT", "/v1/catalog/deregister", {"Node": self.node(member)})


@pytest.fixture
def fleet(consul, name, tmp_path):
    fleets = []

    def make(members=3, **kw):
        fleets.append(Fleet(consul, name, tmp_path, members, **kw))
        return fleets[-1]

    yield make
    for f in fleets:
        f.close()


def finish(procs, timeout=60):
    out = []
    for p in procs:
        try:
            _, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            _, stderr = p.communicate()
        out.append((p.returncode, stderr))
    return out


def one(proc, timeout=60):
    ((rc, stderr),) = finish([proc], timeout)
    return rc, stderr


def assert_one_set(f, initiates=1):
    assert len(f.calls("initiate")) == initiates, f.calls()
    sets = {s for s in f.sets().values() if s}
    assert len(sets) == 1, f.sets()
    return sets.pop()


# --- the race --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_three_bootstraps_at_once_initiate_once_add_twice_and_record_the_set(fleet, consul, name):
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
    indexes = [int(c["lock_index"]) for c in f.calls()]
    assert indexes == sorted(set(indexes)), f.calls()
    record = f.record()
    assert record["replicaSetId"] == first["set"] and record["set"] == "rs0"
    assert sorted(record["members"]) == f.members and record["initiatedBy"] == first["host"]
    assert record["lockIndex"] == first["lock_index"]
    assert_no_session(consul, f.lock)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("status", ["critical", "warning"])
def test_window_of_one_a_member_that_fails_its_check_still_prevents_a_second_set(fleet, consul, status):
    """Issue 16 item 1: mongo1 is PRIMARY of rs0 but not passing (a check timing out, Unauthorized, an agent
    restart). The old bootstrap asked only passing instances: the next holder saw no set and initiated a second rs0."""
    f = fleet(3)
    set_id = f.initiate("mongo1:27017")
    f.force_health("mongo1:27017", status)
    f.run_checks()
    wait_until(lambda: f.registered.get("mongo1:27017") == status, 10, message="mongo1 registered as not passing")
    results = finish([f.bootstrap(m) for m in f.members])
    assert [rc for rc, _ in results] == [0, 0, 0], results
    assert assert_one_set(f) == set_id
    assert sorted(c["host"] for c in f.calls("add")) == ["mongo2:27017", "mongo3:27017"]
    assert f.record()["replicaSetId"] == set_id  # a set without a record gets one


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_an_initiator_that_exits_before_its_first_passing_check_leaves_no_window(fleet):
    """Issue 16 item 1: the bootstrap itself opened the window -- it exited (its bound, a lost lock) between
    replSetInitiate and the member's first passing check; the next holder initiated again."""
    f = fleet(3, ready_after=3600)  # the election never completes while the test runs
    f.run_checks()
    rc, stderr = one(f.bootstrap("mongo1:27017", timeout="1"))
    assert rc == RETRY and "gave up after 1s waiting for mongo1:27017" in stderr, stderr
    assert len(f.calls("initiate")) == 1 and f.record()["replicaSetId"] == f.sets()["mongo1:27017"]
    rc, stderr = one(f.bootstrap("mongo2:27017", timeout="1"))
    assert rc == RETRY and "no primary" in stderr, stderr
    assert len(f.calls("initiate")) == 1, f.calls()
    # the member never answering at all is no excuse either: the record remains
    f.edit(lambda s: s["members"]["mongo1:27017"].update(up=False))
    rc, stderr = one(f.bootstrap("mongo3:27017", timeout="1"))
    assert rc == RETRY and "mongo1:27017 did not answer" in stderr, stderr
    assert len(f.calls("initiate")) == 1, f.calls()


@pytest.mark.timeout(60)
def test_an_initiate_whose_answer_was_lost_is_checked_and_recorded(fleet):
    """replSetInitiate succeeded on the server, its answer timed out: the old bootstrap exited 3 with "initiate
    failed" and wrote nothing; the member is asked what happened before anything else."""
    f = fleet(1)
    f.edit(lambda s: s["lose_answer"].append("initiate"))
    f.run_checks()
    rc, stderr = one(f.bootstrap("mongo1:27017"))
    assert rc == 0 and "replSetInitiate took effect" in stderr, stderr
    assert f.record()["replicaSetId"] == assert_one_set(f)


@pytest.mark.timeout(60)
def test_a_reconfig_whose_answer_was_lost_is_checked(fleet):
    f = fleet(2)
    f.initiate("mongo1:27017")
    f.edit(lambda s: s["lose_answer"].append("reconfig"))
    f.run_checks()
    rc, stderr = one(f.bootstrap("mongo2:27017"))
    assert rc == 0 and "asking whether mongo2:27017 is in its configuration" in stderr, stderr
    assert len(f.calls("add")) == 1


@pytest.mark.timeout(60)
def test_a_record_without_any_member_in_the_set_is_never_a_reason_to_initiate(fleet):
    """Every instance answers and none is in a set, but Consul KV records the set (say, dbPaths were wiped):
    the old bootstrap initiated a new set; now a human decides."""
    f = fleet(2)
    f.consul.api("PUT", f"/v1/kv/{f.record_key}", {"set": "rs0", "replicaSetId": "65f1c0d2a3b4c5d6e7f80900",
                                                     "members": ["mongo1:27017", "mongo2:27017"]})  # fmt: skip
    f.run_checks()
    rc, stderr = one(f.bootstrap("mongo1:27017"))
    assert rc == REFUSED and "Consul KV records replica set 'rs0'" in stderr and "delete its record" in stderr, stderr
    assert f.calls() == []


# --- two sets of one name ----------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_two_sets_with_the_same_name_are_refused(fleet):
    """Issue 16 item 2: the old decision compared only setName and joined whichever set sorted first."""
    f = fleet(3)
    a, b = f.initiate("mongo1:27017"), f.initiate("mongo2:27017")
    f.run_checks()
    rc, stderr = one(f.bootstrap("mongo3:27017"))
    assert rc == REFUSED and "two replica sets are named 'rs0'" in stderr, stderr
    assert a in stderr and b in stderr
    assert f.calls("add") == []


@pytest.mark.timeout(60)
def test_a_set_other_than_the_recorded_one_is_refused(fleet):
    f = fleet(2)
    f.initiate("mongo1:27017")
    f.consul.api("PUT", f"/v1/kv/{f.record_key}", {"set": "rs0", "replicaSetId": "65f1c0d2a3b4c5d6e7f80900",
                                                     "members": ["mongo1:27017"]})  # fmt: skip
    f.run_checks()
    rc, stderr = one(f.bootstrap("mongo2:27017"))
    assert rc == REFUSED and "a second set was initiated" in stderr, stderr
    assert f.calls("add") == []


# --- bootstraps that never finished --------------------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("shape", ["hello-names-the-set", "no-config"])
def test_a_removed_member_refuses_at_once_instead_of_waiting_for_itself(fleet, shape):
    """Issue 16 item 3: a REMOVED member answers hello with its set's name; the old bootstrap took that for
    "already a member" and waited for itself (forever by default; here until --timeout)."""
    f = fleet(3)
    set_id = f.initiate("mongo1:27017")

    def remove(s):
        s["members"]["mongo3:27017"].update(set=set_id, removed=True if shape != "no-config" else "no-config")
        s["sets"][set_id]["hosts"].append("mongo2:27017")
        s["members"]["mongo2:27017"].update(set=set_id)

    f.edit(remove)
    f.run_checks()
    started = time.monotonic()
    rc, stderr = one(f.bootstrap("mongo3:27017", timeout="40"))
    assert rc == REFUSED and "removed" in stderr, stderr
    assert time.monotonic() - started < 20
    assert f.calls("add") == []


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_joiner_that_never_reaches_secondary_gives_the_lock_back_within_its_bound(fleet):
    """Issue 16 item 3: a joiner stuck in STARTUP2 (initial sync, keyFile mismatch) held every other machine
    behind it; now it exits 3 at --timeout with a line that says why, and the next one joins."""
    f = fleet(3)
    f.initiate("mongo1:27017")
    f.edit(lambda s: s["members"]["mongo2:27017"].update(stuck=True))
    f.run_checks()
    rc, stderr = one(f.bootstrap("mongo2:27017", timeout="2"))
    assert rc == RETRY and "gave up after 2s waiting for mongo2:27017 to be PRIMARY or SECONDARY" in stderr, stderr
    assert "initial sync" in stderr and "stays in 'rs0'" in stderr
    rc, stderr = one(f.bootstrap("mongo3:27017"))
    assert rc == 0, stderr
    # and a later run of the stuck one only waits: it is in the configuration already
    rc, stderr = one(f.bootstrap("mongo2:27017", timeout="1"))
    assert rc == RETRY and "wait: already a member" in stderr, stderr
    assert len(f.calls("add")) == 2 and len(f.calls("initiate")) == 1


# --- auth ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_with_auth_the_initiator_creates_the_user_before_releasing_the_lock(fleet):
    f = fleet(3, auth=True)
    f.run_checks()
    results = finish([f.bootstrap(m, auth=True) for m in f.members])
    assert [rc for rc, _ in results] == [0, 0, 0], results
    ops = [c["op"] for c in f.calls()]
    assert ops == ["initiate", "createUser", "add", "add"], f.calls()
    created = f.calls("createUser")[0]
    assert created["lock_index"] == f.calls("initiate")[0]["lock_index"]  # the same hold of the lock


@pytest.mark.timeout(60)
def test_with_auth_a_joiner_without_credentials_cannot_join_and_says_so(fleet):
    f = fleet(2, auth=True)
    f.run_checks()
    assert one(f.bootstrap("mongo1:27017", auth=True))[0] == 0
    rc, stderr = one(f.bootstrap("mongo2:27017"))
    assert rc == RETRY and "Unauthorized" in stderr, stderr
    assert f.calls("add") == []


# --- what it never does on a guess ---------------------------------------------------------------------------


def test_never_initiates_when_consul_cannot_be_asked(fleet):
    f = fleet(3)
    closed = f"http://127.0.0.1:{free_port()}"
    rc, stderr = one(f.bootstrap(f.members[0], "--consul-addr", closed))
    assert rc == RETRY and "cannot ask Consul" in stderr, stderr
    assert f.calls() == []


@pytest.mark.parametrize("status", ["passing", "critical"])
def test_never_initiates_while_a_registered_instance_does_not_answer(fleet, status):
    f = fleet(2, up={"mongo1:27017"})
    f.register("mongo1:27017", "warning")  # not initiated yet
    f.register("mongo2:27017", status)  # its mongod is gone (or not up yet): whatever its health, it counts
    rc, stderr = one(f.bootstrap("mongo1:27017"))
    assert rc == RETRY and "mongo2:27017" in stderr, stderr
    assert f.calls() == []


def test_never_initiates_when_consul_does_not_list_this_member(fleet):
    # e.g. another service name, or a token whose ACL hides the service: Consul's "nobody" means nothing then
    f = fleet(3)
    rc, stderr = one(f.bootstrap("mongo1:27017"))
    assert rc == RETRY and "does not list mongo1:27017" in stderr, stderr
    assert f.calls() == []


def test_joins_a_replica_set_that_already_exists(fleet):
    f = fleet(3)
    f.initiate("mongo1:27017")
    f.run_checks()
    rc, stderr = one(f.bootstrap("mongo3:27017"))
    assert rc == 0, stderr
    assert [(c["op"], c["host"]) for c in f.calls()] == [("initiate", "mongo1:27017"), ("add", "mongo3:27017")]


def test_refuses_to_run_outside_consul_locker(fleet, consul):
    f = fleet(1)
    env = {k: v for k, v in locker_env(consul).items() if not k.startswith("CONSUL_LOCK")}
    rc, stderr = one(f.bootstrap("mongo1:27017", locked=False, env=env))
    assert rc == USAGE and "consul-locker" in stderr
    assert f.calls() == []


def test_bootstrap_runs_from_the_project_root_as_documented(fleet, consul, name):
    """The command line of examples/mongodb/README.md's test recipe: python -m shim mongodb-bootstrap python ..."""
    f = fleet(1)
    f.run_checks()
    r = subprocess.run(
        [sys.executable, "-m", "shim", f.lock, sys.executable, os.path.relpath(HERE, ROOT), f.state,
         "--config", f.config, "--advertise", "mongo1:27017", "--service", f.service],
        cwd=ROOT,
        env=locker_env(consul),
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert [c["op"] for c in f.calls()] == ["initiate"]
    assert os.path.samefile(BOOTSTRAP, os.path.join(ROOT, "examples", "mongodb", "bootstrap.py")) or os.environ.get(
        "MONGODB_BOOTSTRAP_UNDER_TEST"
    )
