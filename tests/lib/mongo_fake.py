"""A fake fleet of mongods for the MongoDB bootstrap example (examples/mongodb/bootstrap.py), shared by processes.

The whole fleet is one JSON file, locked with fcntl: every bootstrap process (and the test) reads and writes it.
It answers `hello`, `replSetGetStatus`, `replSetGetConfig` in MongoDB's shapes, records every replSetInitiate,
reconfig and createUser with the lock holder's fencing index, and can play what real fleets do: a member that is
down, one that never leaves STARTUP2, one REMOVED by a reconfig, two sets of the same name, authentication with
the localhost exception, an answer lost after the command took effect, a health check forced to warning or
critical.

State: {"members": {host: {"up", "set", "ready_at", "stuck", "removed"}}, "sets": {id: {"name", "version",
"hosts", "primary", "users"}}, "calls": [...], "ready_after": s, "auth": bool, "lose_answer": [op...],
"health": {host: status}}.

Run the bootstrap against it (the seam is bootstrap.main's backend_factory):

    python tests/lib/mongo_fake.py STATE_FILE [bootstrap.py's arguments...]

MONGODB_BOOTSTRAP_UNDER_TEST names another bootstrap.py to run (e.g. an older version, to show a test failing).
"""

import fcntl
import importlib.util
import json
import os
import sys
import time
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOOTSTRAP = os.environ.get("MONGODB_BOOTSTRAP_UNDER_TEST") or os.path.join(ROOT, "examples", "mongodb", "bootstrap.py")
HERE = os.path.abspath(__file__)
_modules = {}


def load_bootstrap(path=BOOTSTRAP):
    """bootstrap.py as a module (it is a script, not a package)."""
    if path not in _modules:
        spec = importlib.util.spec_from_file_location(f"mongodb_bootstrap_{len(_modules)}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[path] = module
    return _modules[path]


def new_state(path, members, up=None, ready_after=0.2, auth=False):
    with open(path, "w") as f:
        json.dump(
            {
                "members": {m: {"up": up is None or m in up} for m in members},
                "sets": {},
                "calls": [],
                "ready_after": ready_after,
                "auth": auth,
                "lose_answer": [],
                "health": {},
            },
            f,
        )


def _unauthorized(command):
    return {"ok": 0.0, "errmsg": f"Command {command} requires authentication", "code": 13, "codeName": "Unauthorized"}


class FakeBackend:
    """The bootstrap's backend interface on the shared state. `local` hosts are reached through a loopback
    address (the localhost exception applies to them); `bs` is the bootstrap module whose exceptions to raise."""

    def __init__(self, path, bs, aliases=None, username=None, password=None):
        self.path, self.bs = path, bs
        self.aliases = {k.lower(): v for k, v in (aliases or {}).items()}
        self.local = set(self.aliases.values())
        self.username, self.password = username, password

    # --- the shared state ---

    @contextmanager
    def state(self, write=False):
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with open(self.path) as f:
                state = json.load(f)
            yield state
            if write:
                tmp = f"{self.path}.{os.getpid()}.tmp"
                with open(tmp, "w") as f:
                    json.dump(state, f, indent=1)
                os.replace(tmp, self.path)

    def _name(self, host):
        return self.aliases.get(host.lower(), host)

    def _member(self, state, host):
        m = state["members"].get(host)
        if m is None or not m.get("up", True):
            raise self.bs.MemberUnreachable(f"{host}: connection refused (fake)")
        return m

    def _record(self, state, op, **fields):
        state["calls"].append(
            dict(op=op, pid=os.getpid(), time=time.time(), lock_index=os.environ.get("CONSUL_LOCK_INDEX"), **fields)
        )

    def _authorized(self, state, host):
        if not state.get("auth"):
            return True
        m = state["members"][host]
        users = state["sets"][m["set"]].get("users", {}) if m.get("set") else {}
        if self.username and users.get(self.username) == self.password:
            return True
        return not users and host in self.local  # the localhost exception: no user yet, a loopback connection

    def _lost(self, state, op):
        if op in state.get("lose_answer", []):
            state["lose_answer"].remove(op)
            return True
        return False

    @staticmethod
    def _ready(state, host):
        m = state["members"][host]
        return not m.get("stuck") and not m.get("removed") and time.time() >= m.get("ready_at", 0)

    # --- what a mongod answers ---

    def hello(self, host):
        host = self._name(host)
        with self.state() as state:
            m = self._member(state, host)
            base = {"maxWireVersion": 21, "minWireVersion": 0, "maxBsonObjectSize": 16777216}
            rs = state["sets"].get(m.get("set") or "")
            if rs is None or (m.get("removed") == "no-config"):  # some versions hide a removed member's set
                return dict(base, isWritablePrimary=False, secondary=False, isreplicaset=True, ok=1.0,
                            info="Does not have a valid replica set config")  # fmt: skip
            ready = self._ready(state, host)
            primary = rs["primary"]
            doc = dict(
                base,
                hosts=list(rs["hosts"]),
                setName=rs["name"],
                setVersion=rs["version"],
                isWritablePrimary=ready and host == primary,
                secondary=ready and host != primary,
                me=host,
                ok=1.0,
            )
            if primary and self._ready(state, primary) and not m.get("removed"):
                doc["primary"] = primary
            return doc

    def repl_status(self, host):
        host = self._name(host)
        hello = self.hello(host)
        with self.state() as state:
            m = state["members"][host]
            if not self._authorized(state, host):
                return _unauthorized("replSetGetStatus")
            if m.get("removed"):
                return {"ok": 0.0, "errmsg": "Our replica set config is invalid or we are not a member of it",
                        "code": 93, "codeName": "InvalidReplicaSetConfig"}  # fmt: skip
        if not hello.get("setName"):
            return {"ok": 0.0, "errmsg": "no replset config has been received", "code": 94,
                    "codeName": "NotYetInitialized"}  # fmt: skip
        mine = 1 if hello["isWritablePrimary"] else 2 if hello["secondary"] else 5
        members = [
            {"_id": i, "name": h, "health": 1.0, "state": mine if h == host else 2,
             "stateStr": self.bs.STATE_NAMES[mine if h == host else 2], "self": h == host}
            for i, h in enumerate(hello["hosts"])
        ]  # fmt: skip
        return {"set": hello["setName"], "myState": mine, "members": members, "ok": 1.0}

    def get_config(self, host):
        host = self._name(host)
        with self.state() as state:
            m = self._member(state, host)
            if not self._authorized(state, host):
                return _unauthorized("replSetGetConfig")
            rs = state["sets"].get(m.get("set") or "")
            if rs is None:
                return {"ok": 0.0, "errmsg": "no replset config has been received", "code": 94,
                        "codeName": "NotYetInitialized"}  # fmt: skip
            members = [{"_id": i, "host": h} for i, h in enumerate(rs["hosts"])]
            config = {"_id": rs["name"], "version": rs["version"], "term": 1, "members": members,
                      "settings": {"replicaSetId": {"$oid": m["set"]}}}  # fmt: skip
            return {"config": config, "ok": 1.0}

    def initiate(self, host, config):
        host = self._name(host)
        with self.state(write=True) as state:
            m = self._member(state, host)
            if not self._authorized(state, host):
                raise self.bs.CommandFailed("replSetInitiate: Unauthorized", 13)
            if m.get("set"):
                raise self.bs.CommandFailed("replSetInitiate: AlreadyInitialized already initialized", 23)
            set_id = os.urandom(12).hex()  # an ObjectId: every initiate makes a distinct set
            state["sets"][set_id] = {"name": config["_id"], "version": 1, "hosts": [host], "primary": host, "users": {}}
            m.update(set=set_id, ready_at=time.time() + state.get("ready_after", 0.2))
            self._record(state, "initiate", host=host, set=set_id)
            lost = self._lost(state, "initiate")
        if lost:
            raise self.bs.MemberUnreachable(f"{host}: timed out (fake: the answer to replSetInitiate was lost)")

    def add_member(self, primary, host):
        primary, host = self._name(primary), self._name(host)
        with self.state(write=True) as state:
            p = self._member(state, primary)
            if not self._authorized(state, primary):
                raise self.bs.CommandFailed("replSetGetConfig: Unauthorized", 13)
            rs = state["sets"].get(p.get("set") or "")
            if rs is None or rs["primary"] != primary or not self._ready(state, primary):
                raise self.bs.CommandFailed(f"replSetReconfig: NotWritablePrimary {primary} is not primary", 10107)
            if host not in rs["hosts"]:
                rs["hosts"].append(host)
                rs["version"] += 1
            state["members"].setdefault(host, {"up": True})
            state["members"][host].update(set=p["set"], ready_at=time.time() + state.get("ready_after", 0.2))
            self._record(state, "add", host=host, primary=primary, set=p["set"])
            lost = self._lost(state, "reconfig")
        if lost:
            raise self.bs.MemberUnreachable(f"{primary}: timed out (fake: the answer to replSetReconfig was lost)")

    def create_user(self, host, username, password):
        host = self._name(host)
        with self.state(write=True) as state:
            m = self._member(state, host)
            if not self._authorized(state, host):
                raise self.bs.CommandFailed("createUser: Unauthorized", 13)
            rs = state["sets"].get(m.get("set") or "")
            if rs is None or rs["primary"] != host or not self._ready(state, host):
                raise self.bs.CommandFailed("createUser: NotWritablePrimary", 10107)
            rs.setdefault("users", {})[username] = password
            self._record(state, "createUser", host=host, user=username, set=m["set"])


# --- test helpers on the state file ----------------------------------------------------------------------------


def read_state(path):
    with open(path) as f:
        return json.load(f)


def health(state, host):
    """What Consul's script check (`bootstrap.py check`) would report for host: passing only while PRIMARY or
    SECONDARY, unless the test forced another status (a check timing out, an agent restarting, Unauthorized)."""
    forced = state.get("health", {}).get(host)
    if forced:
        return forced
    m = state["members"].get(host) or {}
    if not m.get("up", True) or m.get("removed"):
        return "critical"
    if m.get("set") and not m.get("stuck") and time.time() >= m.get("ready_at", 0):
        return "passing"
    return "warning"


def main(argv):
    state_path, args = argv[0], argv[1:]
    bs = load_bootstrap()

    def factory(parsed, cfg):
        aliases = {cfg.local_address(): parsed.advertise}
        host, port = cfg.local_address().rsplit(":", 1)
        aliases[f"localhost:{port}"] = parsed.advertise
        return FakeBackend(
            state_path, bs, aliases, getattr(parsed, "username", None), getattr(parsed, "password", None)
        )

    return bs.main(args, backend_factory=factory)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
