"""The MongoDB bootstrap's decisions, on recorded replies of MongoDB 7.0 (tests/fixtures/mongodb).

No MongoDB here: the decision is a pure function of `hello`, `replSetGetStatus` and `replSetGetConfig` documents
(and of the set's record in Consul KV), and the check a pure function of `hello` (and `replSetGetStatus`). Each
fixture is decoded twice: by a small Extended JSON decoder of our own (Int64 as an int subclass) and, when
pymongo is installed, by bson.json_util with the driver's own types.
"""

import datetime
import json
import os
import subprocess
import sys

import pytest
from lib.consul_agent import ROOT, free_port
from lib.mongo_fake import BOOTSTRAP, HERE, load_bootstrap, new_state

EXAMPLE = os.path.join(ROOT, "examples", "mongodb")
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "mongodb")
bs = load_bootstrap()
SET_ID = "65f1c0d2a3b4c5d6e7f80900"  # settings.replicaSetId of replSetGetConfig.json
OTHER_ID = "65f1c0d2a3b4c5d6e7f809ff"  # of replSetGetConfig-other-id.json: another set named rs0


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


# --- what a hello says ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fixture, view",
    [
        ("hello-primary", "primary"),
        ("hello-secondary", "secondary"),
        ("hello-secondary-no-primary", "secondary"),
        ("hello-startup2", "member"),
        ("hello-recovering", "member"),
        ("hello-hidden", "secondary"),
        ("hello-removed", "removed"),
        ("hello-uninitialized", "uninitialized"),
        ("hello-standalone", "standalone"),
        ("replSetGetStatus-unauthorized", "error"),
    ],
)
def test_member_view_reads_each_state_mongodb_sends(doc, fixture, view):
    assert bs.member_view(doc(fixture)) == view


def test_a_hidden_member_is_a_member_although_hosts_does_not_list_it(doc):
    hello = dict(doc("hello-hidden"), secondary=False)  # e.g. a hidden member in initial sync
    assert bs.member_view(hello) == "member"


def test_replica_set_id_is_read_from_the_config(doc):
    assert bs.replica_set_id(doc("replSetGetConfig")) == SET_ID
    assert bs.replica_set_id(doc("replSetGetConfig-other-id")) == OTHER_ID
    assert bs.replica_set_id(doc("replSetGetConfig-unauthorized")) is None


# --- decide ----------------------------------------------------------------------------------------------------


def decide(doc, me, local, peers=None, set_ids=None, **kw):
    """bs.decide with fixtures by name; every peer (and a local member) in a set has SET_ID unless told."""
    local_hello = doc(local)
    peers = {h: (d if isinstance(d, Exception) else doc(d)) for h, d in (peers or {}).items()}
    ids = {h: SET_ID for h, d in peers.items() if isinstance(d, dict) and d.get("setName")}
    if local_hello.get("setName"):
        ids[me] = SET_ID
    ids.update(set_ids or {})
    status = kw.pop("local_status", None)
    return bs.decide(me, "rs0", local_hello, peers, doc(status) if status else None, ids, **kw)


def test_initiates_when_consul_lists_no_peer(doc):
    d = decide(doc, "mongo1:27017", "hello-uninitialized", local_status="replSetGetStatus-not-initialized")
    assert d.action == "initiate"


def test_initiates_when_every_peer_answers_without_a_replica_set(doc):
    peers = {"mongo2:27017": "hello-uninitialized", "mongo3:27017": "hello-uninitialized"}
    assert decide(doc, "mongo1:27017", "hello-uninitialized", peers).action == "initiate"


def test_joins_through_a_peer_that_is_primary(doc):
    d = decide(doc, "mongo3:27017", "hello-uninitialized", {"mongo1:27017": "hello-primary"})
    assert (d.action, d.primary, d.set_id) == ("join", "mongo1:27017", SET_ID)


def test_joins_through_the_primary_a_secondary_names(doc):
    d = decide(doc, "mongo3:27017", "hello-uninitialized", {"mongo2:27017": "hello-secondary"})
    assert (d.action, d.primary) == ("join", "mongo1:27017")


def test_never_initiates_while_a_peer_does_not_answer(doc):
    peers = {"mongo2:27017": "hello-uninitialized", "mongo3:27017": bs.MemberUnreachable("refused")}
    d = decide(doc, "mongo1:27017", "hello-uninitialized", peers)
    assert d.action == "retry" and "mongo3:27017" in d.reason


@pytest.mark.parametrize("peer", ["hello-startup2", "hello-recovering", "hello-secondary-no-primary", "hello-removed"])
def test_never_initiates_while_any_peer_is_in_a_set_whatever_its_state(doc, peer):
    """Issue 16 item 1, at the decision: a member not passing its check (STARTUP2, RECOVERING, an election, even
    REMOVED) still proves the set exists."""
    d = decide(doc, "mongo4:27017", "hello-uninitialized", {"mongo9:27017": peer})
    assert d.action != "initiate", d


def test_joins_although_another_peer_does_not_answer(doc):
    peers = {"mongo1:27017": "hello-primary", "mongo2:27017": bs.MemberUnreachable("timed out")}
    d = decide(doc, "mongo3:27017", "hello-uninitialized", peers)
    assert (d.action, d.primary) == ("join", "mongo1:27017")


def test_a_member_only_waits_after_a_restart(doc):
    d = decide(doc, "mongo2:27017", "hello-secondary", {"mongo1:27017": "hello-primary"})
    assert (d.action, d.set_id) == ("wait", SET_ID)


def test_a_member_in_initial_sync_only_waits(doc):
    assert decide(doc, "mongo3:27017", "hello-startup2").action == "wait"


def test_does_not_add_itself_twice_when_the_set_already_lists_it(doc):
    # mongo2 is in the primary's config but its own mongod has not received it yet (e.g. it was just restarted)
    d = decide(doc, "mongo2:27017", "hello-uninitialized", {"mongo1:27017": "hello-primary"})
    assert d.action == "wait"


def test_retries_while_the_set_has_no_primary(doc):
    d = decide(doc, "mongo3:27017", "hello-uninitialized", {"mongo2:27017": "hello-secondary-no-primary"})
    assert d.action == "retry"


def test_refuses_to_mix_replica_sets(doc):
    d = decide(doc, "mongo1:27017", "hello-uninitialized", {"mongo9:27017": "hello-other-set"})
    assert d.action == "refuse" and "rs-legacy" in d.reason


def test_refuses_a_local_mongod_without_replication(doc):
    assert decide(doc, "mongo1:27017", "hello-standalone").action == "refuse"


# issue 16 item 2: two sets of one name


def test_refuses_two_sets_with_the_same_name(doc):
    peers = {"mongo1:27017": "hello-primary", "mongo2:27017": "hello-primary"}
    d = decide(doc, "mongo3:27017", "hello-uninitialized", peers, {"mongo2:27017": OTHER_ID})
    assert d.action == "refuse" and SET_ID in d.reason and OTHER_ID in d.reason and "two replica sets" in d.reason


def test_refuses_a_member_of_another_set_of_the_same_name_than_its_peers(doc):
    d = decide(doc, "mongo2:27017", "hello-secondary", {"mongo1:27017": "hello-primary"}, {"mongo2:27017": OTHER_ID})
    assert d.action == "refuse"


def test_never_decides_without_reading_each_sets_id(doc):
    unreadable = bs.CommandFailed("replSetGetConfig: Unauthorized", 13)
    d = decide(doc, "mongo3:27017", "hello-uninitialized", {"mongo1:27017": "hello-primary"},
               {"mongo1:27017": unreadable})  # fmt: skip
    assert d.action == "retry" and "replicaSetId" in d.reason


# the record in Consul KV


def test_never_initiates_while_the_set_is_recorded(doc):
    record = {"set": "rs0", "replicaSetId": SET_ID, "members": ["mongo1:27017"]}
    peers = {"mongo1:27017": "hello-uninitialized", "mongo2:27017": "hello-uninitialized"}
    d = decide(doc, "mongo3:27017", "hello-uninitialized", peers, record=record)
    assert d.action == "refuse" and "records replica set 'rs0'" in d.reason
    peers["mongo1:27017"] = bs.MemberUnreachable("refused")
    assert decide(doc, "mongo3:27017", "hello-uninitialized", peers, record=record).action == "retry"


def test_refuses_a_set_that_is_not_the_recorded_one(doc):
    record = {"set": "rs0", "replicaSetId": OTHER_ID, "members": ["mongo2:27017"]}
    d = decide(doc, "mongo3:27017", "hello-uninitialized", {"mongo1:27017": "hello-primary"}, record=record)
    assert d.action == "refuse" and "a second set was initiated" in d.reason


def test_joins_the_recorded_set(doc):
    record = {"set": "rs0", "replicaSetId": SET_ID, "members": ["mongo1:27017"]}
    d = decide(doc, "mongo3:27017", "hello-uninitialized", {"mongo1:27017": "hello-primary"}, record=record)
    assert d.action == "join"


# issue 16 item 3: a REMOVED member


def test_a_removed_member_refuses_instead_of_waiting_for_itself(doc):
    d = decide(doc, "mongo3:27017", "hello-removed", {"mongo1:27017": "hello-primary"})
    assert d.action == "refuse" and "removed" in d.reason


def test_a_removed_member_whose_hello_shows_no_set_is_told_by_its_status(doc):
    d = decide(doc, "mongo3:27017", "hello-uninitialized", local_status="replSetGetStatus-removed")
    assert d.action == "refuse" and "removed" in d.reason


def test_a_local_status_that_cannot_be_read_is_no_reason_to_initiate(doc):
    d = decide(doc, "mongo1:27017", "hello-uninitialized", local_status="replSetGetStatus-unauthorized")
    assert d.action == "retry" and "Unauthorized" in d.reason


def test_ready_means_primary_or_secondary(doc):
    assert bs.is_ready(doc("hello-primary")) and bs.is_ready(doc("hello-secondary"))
    assert not bs.is_ready(doc("hello-startup2")) and not bs.is_ready(doc("hello-uninitialized"))
    assert not bs.is_ready(doc("hello-standalone")) and not bs.is_ready(doc("hello-removed"))
    assert not bs.is_ready(doc("hello-recovering"))


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
        ("replSetGetStatus-recovering", 1, "RECOVERING"),
        ("replSetGetStatus-not-initialized", 1, "not initiated"),
        ("replSetGetStatus-unauthorized", 1, "Unauthorized"),
        ("replSetGetStatus-removed", 2, "REMOVED"),
        ("replSetGetStatus-standalone", 2, "--replSet"),
    ],
)
def test_check_follows_consul_conventions(doc, fixture, code, word):
    got, message = bs.check_status(doc(fixture))
    assert got == code and word in message


@pytest.mark.parametrize(
    "hello, status, code, word",
    [
        ("hello-primary", None, 0, "PRIMARY"),
        ("hello-secondary", None, 0, "SECONDARY"),
        ("hello-startup2", None, 1, "STARTUP2"),
        ("hello-recovering", None, 1, "RECOVERING"),
        ("hello-removed", None, 2, "REMOVED"),
        ("hello-standalone", None, 2, "--replSet"),
        ("hello-uninitialized", "replSetGetStatus-not-initialized", 1, "not initiated"),
        ("hello-uninitialized", "replSetGetStatus-removed", 2, "REMOVED"),
        ("hello-uninitialized", "replSetGetStatus-unauthorized", 1, "Unauthorized"),
    ],
)
def test_check_reads_hello_which_needs_no_authentication(doc, hello, status, code, word):
    got, message = bs.check_member(doc(hello), doc(status) if status else None)
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


# --- bounds, timeouts, credentials -------------------------------------------------------------------------------


def test_every_wait_is_bounded_by_default():
    """Issue 16 item 3: the old default was to wait forever for this member to be PRIMARY or SECONDARY."""
    args = bs.build_parser().parse_args([])
    assert 0 < args.timeout <= 3600 and 0 < args.mongod_timeout <= 3600
    assert args.command_timeout >= 30 > args.connect_timeout  # a majority write is no quick command
    with pytest.raises(SystemExit):
        bs.build_parser().parse_args(["--timeout", "0"])


def test_majority_commands_get_the_long_socket_timeout():
    pytest.importorskip("pymongo")
    backend = bs.PyMongoBackend(timeout=3, command_timeout=60)
    host = f"127.0.0.1:{free_port()}"
    quick, slow = backend.client(host), backend.client(host, slow=True)
    try:
        assert quick.options.pool_options.socket_timeout == 3
        assert slow.options.pool_options.socket_timeout == 60
    finally:
        quick.close()
        slow.close()


def test_credentials_come_from_a_file_and_go_together(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    args = bs.build_parser().parse_args(["--username", "admin", "--password-file", str(secret)])
    bs.load_credentials(args)
    assert args.password == "s3cret"
    for argv in (["--username", "admin"], ["--password-file", str(secret)]):
        with pytest.raises(bs.Failure) as e:
            bs.load_credentials(bs.build_parser().parse_args(argv))
        assert e.value.code == bs.USAGE


def test_the_example_config_has_a_key_file():
    cfg = bs.MongodConfig.load(os.path.join(EXAMPLE, "mongod.conf"))
    assert cfg.key_file


# --- the real backend, and check mode -------------------------------------------------------------------------


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
    )
    assert r.returncode == 2 and r.stdout.startswith("CRITICAL")


@pytest.mark.parametrize(
    "member, creds, code, word",
    [
        ({}, False, 1, "not initiated"),
        ({"set": "S", "ready_at": 0}, False, 0, "PRIMARY"),
        ({"set": "S", "stuck": True}, False, 1, "neither primary nor secondary"),
        ({"set": "S", "removed": True}, False, 2, "REMOVED"),
        ({"set": "S", "removed": "no-config"}, True, 2, "REMOVED"),
        ({"set": "S", "removed": "no-config"}, False, 1, "Unauthorized"),
    ],
)
def test_check_mode_on_the_fake_fleet_with_auth_on(tmp_path, member, creds, code, word):
    """`bootstrap.py check` end to end (the fake stands in for mongod): hello needs no credentials, and the one
    replSetGetStatus it may need goes through the localhost exception while no user exists; a removed member
    whose hello hides its set (some versions) is only told apart with credentials."""
    state = str(tmp_path / "state.json")
    new_state(state, ["mongo1:27017"], auth=True)
    with open(state) as f:
        doc = json.load(f)
    doc["members"]["mongo1:27017"].update(member)
    doc["sets"]["S"] = {"name": "rs0", "version": 1, "hosts": [] if member.get("removed") else ["mongo1:27017"],
                        "primary": "mongo1:27017", "users": {"admin": "x"} if member.get("set") else {}}  # fmt: skip
    with open(state, "w") as f:
        json.dump(doc, f)
    conf = tmp_path / "mongod.conf"
    conf.write_text("net:\n  port: 27017\nreplication:\n  replSetName: rs0\n")
    secret = tmp_path / "password"
    secret.write_text("x\n")
    r = subprocess.run(
        [sys.executable, HERE, state, "check", "--config", str(conf), "--advertise", "mongo1:27017"]
        + (["--username", "admin", "--password-file", str(secret)] if creds else []),
        stdout=subprocess.PIPE,
        text=True,
        timeout=60,
    )
    assert r.returncode == code and word in r.stdout, r.stdout
