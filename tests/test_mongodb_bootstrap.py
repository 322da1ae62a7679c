"""The MongoDB bootstrap's decisions, on recorded replies of MongoDB 7.0 (tests/fixtures/mongodb).

No MongoDB here: the decision is a pure function of `hello` documents, and the check a pure function of a
`replSetGetStatus` reply. Each fixture is decoded twice: by a small Extended JSON decoder of our own (Int64 as an
int subclass) and, when pymongo is installed, by bson.json_util with the driver's own types.
"""

import datetime
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from lib.consul_agent import ROOT, free_port

EXAMPLE = os.path.join(ROOT, "examples", "mongodb")
BOOTSTRAP = os.path.join(EXAMPLE, "bootstrap.py")
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "mongodb")


def _load_bootstrap():
    spec = importlib.util.spec_from_file_location("mongodb_bootstrap", BOOTSTRAP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bs = _load_bootstrap()


class NumberLong(int):
    """What a driver hands back for BSON Int64: an int, but not exactly int."""


def _ejson_hook(d):
    if len(d) == 1:
        (key, value), = d.items()  # fmt: skip
        if key == "$numberLong":
            return NumberLong(value)
        if key == "$numberInt":
            return int(value)
        if key == "$numberDouble":
            return float(value)
        if key == "$oid":
            return value
        if key == "$timestamp":
            return (value["t"], value["i"])
        if key == "$date":
            return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        if key == "$binary":
            return value["base64"]
    return d


def _plain(text):
    return json.loads(text, object_hook=_ejson_hook)


def _bson(text):
    json_util = pytest.importorskip("bson.json_util")
    return json_util.loads(text)


@pytest.fixture(params=["ejson", "bson"])
def doc(request):
    decode = _plain if request.param == "ejson" else _bson

    def load(name):
        with open(os.path.join(FIXTURES, name + ".json")) as f:
            return decode(f.read())

    load("hello-primary")  # skips the bson variant early when pymongo is missing
    return load


def test_fixtures_keep_mongodb_types(doc):
    term = doc("replSetGetStatus-primary")["term"]
    assert isinstance(term, int) and type(term) is not int  # Int64 / NumberLong: an int subclass


# --- decide ----------------------------------------------------------------------------------------------------


def test_initiates_when_consul_lists_no_peer(doc):
    d = bs.decide("mongo1:27017", "rs0", doc("hello-uninitialized"), {})
    assert d.action == "initiate"


def test_initiates_when_every_peer_answers_without_a_replica_set(doc):
    peers = {"mongo2:27017": doc("hello-uninitialized"), "mongo3:27017": doc("hello-uninitialized")}
    assert bs.decide("mongo1:27017", "rs0", doc("hello-uninitialized"), peers).action == "initiate"


def test_joins_through_a_peer_that_is_primary(doc):
    d = bs.decide("mongo3:27017", "rs0", doc("hello-uninitialized"), {"mongo1:27017": doc("hello-primary")})
    assert (d.action, d.primary) == ("join", "mongo1:27017")


def test_joins_through_the_primary_a_secondary_names(doc):
    d = bs.decide("mongo3:27017", "rs0", doc("hello-uninitialized"), {"mongo2:27017": doc("hello-secondary")})
    assert (d.action, d.primary) == ("join", "mongo1:27017")


def test_never_initiates_while_a_peer_does_not_answer(doc):
    peers = {"mongo2:27017": doc("hello-uninitialized"), "mongo3:27017": bs.MemberUnreachable("refused")}
    d = bs.decide("mongo1:27017", "rs0", doc("hello-uninitialized"), peers)
    assert d.action == "retry" and "mongo3:27017" in d.reason


def test_joins_although_another_peer_does_not_answer(doc):
    peers = {"mongo1:27017": doc("hello-primary"), "mongo2:27017": bs.MemberUnreachable("timed out")}
    d = bs.decide("mongo3:27017", "rs0", doc("hello-uninitialized"), peers)
    assert (d.action, d.primary) == ("join", "mongo1:27017")


def test_a_member_only_waits_after_a_restart(doc):
    d = bs.decide("mongo2:27017", "rs0", doc("hello-secondary"), {"mongo1:27017": doc("hello-primary")})
    assert d.action == "wait"


def test_a_member_in_initial_sync_only_waits(doc):
    assert bs.decide("mongo3:27017", "rs0", doc("hello-startup2"), {}).action == "wait"


def test_does_not_add_itself_twice_when_the_set_already_lists_it(doc):
    # mongo2 is in the primary's config but its own mongod has not received it yet (e.g. it was just restarted)
    d = bs.decide("mongo2:27017", "rs0", doc("hello-uninitialized"), {"mongo1:27017": doc("hello-primary")})
    assert d.action == "wait"


def test_retries_while_the_set_has_no_primary(doc):
    d = bs.decide(
        "mongo3:27017", "rs0", doc("hello-uninitialized"), {"mongo2:27017": doc("hello-secondary-no-primary")}
    )
    assert d.action == "retry"


def test_refuses_to_mix_replica_sets(doc):
    d = bs.decide("mongo1:27017", "rs0", doc("hello-uninitialized"), {"mongo9:27017": doc("hello-other-set")})
    assert d.action == "refuse" and "rs-legacy" in d.reason


def test_refuses_a_local_mongod_without_replication(doc):
    assert bs.decide("mongo1:27017", "rs0", doc("hello-standalone"), {}).action == "refuse"


def test_ready_means_primary_or_secondary(doc):
    assert bs.is_ready(doc("hello-primary")) and bs.is_ready(doc("hello-secondary"))
    assert not bs.is_ready(doc("hello-startup2")) and not bs.is_ready(doc("hello-uninitialized"))
    assert not bs.is_ready(doc("hello-standalone"))


# --- reconfig ---------------------------------------------------------------------------------------------------


def test_adding_a_member_takes_the_next_id_and_version(doc):
    config = doc("replSetGetConfig")["config"]
    new = bs.config_with_member(config, "mongo3:27017")
    assert [(m["_id"], m["host"]) for m in new["members"]] == [
        (0, "mongo1:27017"),
        (1, "mongo2:27017"),
        (2, "mongo3:27017"),
    ]
    assert new["version"] == 3 and "term" not in new
    assert new["settings"] == config["settings"] and new["members"][:2] == config["members"]
    assert len(config["members"]) == 2  # the reply is not modified


def test_adding_a_present_member_is_a_no_op(doc):
    assert bs.config_with_member(doc("replSetGetConfig")["config"], "MONGO2:27017") is None


# --- check ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fixture, code, word",
    [
        ("replSetGetStatus-primary", 0, "PRIMARY"),
        ("replSetGetStatus-secondary", 0, "SECONDARY"),
        ("replSetGetStatus-startup2", 1, "STARTUP2"),
        ("replSetGetStatus-not-initialized", 1, "not initiated"),
        ("replSetGetStatus-removed", 2, "REMOVED"),
        ("replSetGetStatus-standalone", 2, "--replSet"),
    ],
)
def test_check_follows_consul_conventions(doc, fixture, code, word):
    got, message = bs.check_status(doc(fixture))
    assert got == code and word in message


def test_check_counts_healthy_members(doc):
    assert "2/3 members healthy" in bs.check_status(doc("replSetGetStatus-primary"))[1]


# --- mongod's config --------------------------------------------------------------------------------------------


def test_reads_the_example_mongod_conf():
    cfg = bs.MongodConfig.load(os.path.join(EXAMPLE, "mongod.conf"))
    assert (cfg.set_name, cfg.local_address()) == ("rs0", "127.0.0.1:27017")


@pytest.mark.parametrize(
    "net, address",
    [
        ({}, "127.0.0.1:27017"),
        ({"port": 27018, "bindIp": "10.0.0.5,localhost"}, "localhost:27018"),
        ({"bindIp": "10.0.0.5, /tmp/mongod.sock"}, "10.0.0.5:27017"),
        ({"bindIp": ["0.0.0.0"]}, "127.0.0.1:27017"),
        ({"bindIp": "::1"}, "[::1]:27017"),
        ({"bindIpAll": True, "port": "27019"}, "127.0.0.1:27019"),
    ],
)
def test_local_address_from_net_settings(net, address):
    cfg = bs.MongodConfig.from_dict({"net": net, "replication": {"replSetName": "rs0"}})
    assert cfg.local_address() == address


def test_config_without_replset_name_is_a_usage_error(tmp_path):
    path = tmp_path / "mongod.conf"
    path.write_text("net:\n  port: 27017\nstorage:\n  dbPath: /data/db\n")
    with pytest.raises(bs.Failure) as e:
        bs.MongodConfig.load(str(path))
    assert e.value.code == bs.USAGE


def test_same_member_compares_names_and_ports():
    assert bs.same_member("Mongo1:27017", "mongo1:27017")
    assert not bs.same_member("mongo1:27017", "mongo1:27018")
    assert not bs.same_member("mongo1:27017", "mongo2:27017")
    assert bs.same_member("localhost:27017", "127.0.0.1:27017")


# --- the real backend -------------------------------------------------------------------------------------------


def test_pymongo_is_imported_only_by_the_real_backend():
    code = f"import sys; sys.path.insert(0, {EXAMPLE!r}); import bootstrap; assert 'pymongo' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_real_backend_reports_a_silent_member_as_unreachable():
    pytest.importorskip("pymongo")
    backend = bs.PyMongoBackend(timeout=0.5)
    with pytest.raises(bs.MemberUnreachable):
        backend.hello(f"127.0.0.1:{free_port()}")


def test_check_mode_is_critical_when_mongod_does_not_answer(tmp_path):
    pytest.importorskip("pymongo")
    conf = tmp_path / "mongod.conf"
    conf.write_text(f"net:\n  port: {free_port()}\n  bindIp: 127.0.0.1\nreplication:\n  replSetName: rs0\n")
    r = subprocess.run(
        [sys.executable, BOOTSTRAP, "check", "--config", str(conf), "--connect-timeout", "0.5"],
        stdout=subprocess.PIPE,
        text=True,
        timeout=60,
        env=dict(os.environ, MONGODB_BOOTSTRAP_FAKE_STATE=""),
    )
    assert r.returncode == 2 and r.stdout.startswith("CRITICAL")
