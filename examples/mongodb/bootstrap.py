#!/usr/bin/env python3
"""Bootstrap a MongoDB replica set when every machine boots at once: exactly one initiates, the others join.

Run it under the lock, on every MongoDB machine:

    consul-locker mongodb-bootstrap python3 bootstrap.py --config /etc/mongod.conf --advertise mongo1:27017

Under the lock it waits for the local mongod, asks Consul for the passing members of the service `mongodb`, asks
each of them (`hello`) whether it has a replica set, and then:

  - this mongod is already a member          -> nothing to do but wait until it is PRIMARY or SECONDARY;
  - a peer has the replica set               -> ask its primary to add this member (replSetReconfig);
  - no peer has one, every peer answered     -> replSetInitiate with this member alone;
  - Consul or a peer cannot be asked         -> exit 3 without touching anything (run it again later).

It exits only when this member is PRIMARY or SECONDARY *and* Consul lists it as passing, so the lock is held until
the next machine can see the replica set. Until then it waits (forever by default: a second replica set is far
worse than a stuck bootstrap; --timeout bounds the wait).

Health-check mode, for a Consul script check (exit 0 passing, 1 warning, 2 critical):

    python3 bootstrap.py check --config /etc/mongod.conf

Exit codes: 0 done; 1 refused (the replica set looks inconsistent, a human should look); 2 usage or config error;
3 try again later (Consul, the local mongod or a peer unreachable, no primary right now, --timeout passed).
"""

import argparse
import fcntl
import ipaddress
import json
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager

OK, REFUSED, USAGE, RETRY = 0, 1, 2, 3
CHECK_PASSING, CHECK_WARNING, CHECK_CRITICAL = 0, 1, 2
DEFAULT_PORT = 27017
# replSetGetStatus myState numbers (MongoDB's MemberState)
STATE_NAMES = {
    0: "STARTUP",
    1: "PRIMARY",
    2: "SECONDARY",
    3: "RECOVERING",
    5: "STARTUP2",
    6: "UNKNOWN",
    7: "ARBITER",
    8: "DOWN",
    9: "ROLLBACK",
    10: "REMOVED",
}
NOT_YET_INITIALIZED = 94  # replSetGetStatus error code before replSetInitiate
CRITICAL_STATES = {6, 8, 10}


def log(message):
    print(f"mongodb-bootstrap: {message}", file=sys.stderr, flush=True)


class Failure(Exception):
    """Stop with this exit code and message."""

    def __init__(self, message, code=RETRY):
        super().__init__(message)
        self.code = code


class MemberUnreachable(Exception):
    """No answer from a mongod (refused, timed out, unknown host)."""


class CommandFailed(Exception):
    """A mongod answered a command with ok: 0."""


# --- mongod's configuration file ------------------------------------------------------------------------------


class MongodConfig:
    def __init__(self, port, bind_ips, bind_all, set_name):
        self.port, self.bind_ips, self.bind_all, self.set_name = port, bind_ips, bind_all, set_name

    @classmethod
    def load(cls, path):
        import yaml  # PyYAML: mongod's config is YAML (nested keys, lists, "a,b" strings), not key=value lines

        try:
            with open(path) as f:
                doc = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise Failure(f"cannot read mongod config {path}: {e}", USAGE) from None
        return cls.from_dict(doc, path)

    @classmethod
    def from_dict(cls, doc, path="config"):
        if not isinstance(doc, dict):
            raise Failure(f"{path}: not a YAML mapping", USAGE)
        net = doc.get("net") or {}
        replication = doc.get("replication") or {}
        try:
            port = int(net.get("port", DEFAULT_PORT))
        except (TypeError, ValueError):
            raise Failure(f"{path}: net.port {net.get('port')!r} is not a number", USAGE) from None
        bind = net.get("bindIp", "127.0.0.1")
        if isinstance(bind, (list, tuple)):
            bind_ips = [str(b).strip() for b in bind]
        else:
            bind_ips = [b.strip() for b in str(bind).split(",")]
        set_name = replication.get("replSetName")
        if not set_name:
            raise Failure(f"{path}: replication.replSetName is not set; mongod is not a replica set member", USAGE)
        return cls(port, [b for b in bind_ips if b], bool(net.get("bindIpAll")), str(set_name))

    def local_address(self):
        """host:port to reach this mongod from this machine."""
        ips = [b for b in self.bind_ips if not b.startswith("/")]  # unix socket paths are allowed in bindIp
        if self.bind_all or not ips or any(b in ("0.0.0.0", "::", "*") for b in ips):
            host = "127.0.0.1"
        else:
            host = next((b for b in ips if b in ("127.0.0.1", "localhost", "::1")), ips[0])
        return join_host_port(host, self.port)


def join_host_port(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(address):
    host, _, port = address.rpartition(":")
    return host.strip("[]").lower(), int(port)


def _is_ip(host):
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def same_member(a, b):
    """Whether two host:port strings name the same mongod: same port, and the same name, or a name and an IP
    address it resolves to (Consul may list a node's address where the replica set uses its name)."""
    (ha, pa), (hb, pb) = split_host_port(a), split_host_port(b)
    if pa != pb:
        return False
    if ha == hb:
        return True
    if _is_ip(ha) == _is_ip(hb):  # two different names, or two different addresses
        return False
    name, ip = (hb, ha) if _is_ip(ha) else (ha, hb)
    try:
        return ip in {ai[4][0] for ai in socket.getaddrinfo(name, pa, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        return False


# --- the decision (pure: documents in, decision out) ----------------------------------------------------------


class Decision:
    def __init__(self, action, reason, primary=None):
        self.action, self.reason, self.primary = action, reason, primary

    def __repr__(self):
        return f"Decision({self.action!r}, {self.reason!r}, primary={self.primary!r})"


def _member_hosts(hello):
    return [h for key in ("hosts", "passives", "arbiters") for h in (hello.get(key) or [])]


def _is_ok(doc):
    return isinstance(doc, dict) and doc.get("ok") in (1, 1.0, True)


def decide(me, set_name, local_hello, peers):
    """What to do, from this member's `hello` and each peer's (a dict, or an Exception when it did not answer).

    Actions: "wait" (already a member), "join" (ask .primary to add me), "initiate", "retry", "refuse".
    """
    if not _is_ok(local_hello):
        return Decision("retry", f"the local mongod answered hello with an error: {local_hello!r}")
    local_set = local_hello.get("setName")
    if local_set:
        if local_set != set_name:
            return Decision("refuse", f"the local mongod is in replica set {local_set!r}, the config says {set_name!r}")
        return Decision("wait", f"already a member of {local_set!r}")
    if not local_hello.get("isreplicaset"):
        return Decision("refuse", "the local mongod does not run with a replica set name (replication.replSetName)")

    unreachable = sorted(h for h, doc in peers.items() if isinstance(doc, Exception))
    in_set = {h: doc for h, doc in peers.items() if not isinstance(doc, Exception) and doc.get("setName")}
    for host, doc in sorted(in_set.items()):
        if doc["setName"] != set_name:
            return Decision("refuse", f"peer {host} is in replica set {doc['setName']!r}, not {set_name!r}")
    if in_set:
        for host, doc in sorted(in_set.items()):
            if any(same_member(me, h) for h in _member_hosts(doc)):
                return Decision("wait", f"{me} is already in the configuration of {set_name!r} (seen by {host})")
        writable = sorted(h for h, doc in in_set.items() if doc.get("isWritablePrimary") or doc.get("ismaster"))
        named = sorted({doc["primary"] for doc in in_set.values() if doc.get("primary")})
        primary = (writable or named or [None])[0]
        if primary is None:
            return Decision("retry", f"replica set {set_name!r} has no primary right now (election?)")
        return Decision("join", f"replica set {set_name!r} exists (seen by {', '.join(sorted(in_set))})", primary)
    if unreachable:
        return Decision(
            "retry", f"cannot tell whether {', '.join(unreachable)} already has a replica set: no answer to hello"
        )
    return Decision("initiate", f"no peer has a replica set ({len(peers)} asked)")


def config_with_member(config, host):
    """The replica set config for replSetReconfig with host added, or None when host is already a member."""
    members = list(config.get("members") or [])
    if any(same_member(host, m.get("host", "")) for m in members):
        return None
    new = {k: v for k, v in config.items() if k != "term"}  # the primary sets the term itself
    new["members"] = members + [{"_id": max((int(m["_id"]) for m in members), default=-1) + 1, "host": host}]
    new["version"] = int(config.get("version", 0)) + 1
    return new


def check_status(status):
    """(exit code, message) for a Consul check, from a replSetGetStatus reply (ok: 0 replies included)."""
    if not _is_ok(status):
        if status.get("code") == NOT_YET_INITIALIZED:
            return CHECK_WARNING, "WARNING: replica set not initiated yet"
        return CHECK_CRITICAL, f"CRITICAL: replSetGetStatus failed: {status.get('errmsg', status)}"
    state = int(status.get("myState", 6))
    me = next((m for m in status.get("members") or [] if m.get("self")), {})
    name = me.get("stateStr") or STATE_NAMES.get(state, str(state))
    healthy = sum(1 for m in status.get("members") or [] if m.get("health") in (1, 1.0, True))
    text = f"{name} of {status.get('set')!r}, {healthy}/{len(status.get('members') or [])} members healthy"
    if state in (1, 2):
        return CHECK_PASSING, f"OK: {text}"
    if state in CRITICAL_STATES:
        return CHECK_CRITICAL, f"CRITICAL: {text}"
    return CHECK_WARNING, f"WARNING: {text}"


def is_ready(hello):
    """PRIMARY or SECONDARY, from a hello reply."""
    return _is_ok(hello) and bool(
        hello.get("setName") and (hello.get("isWritablePrimary") or hello.get("ismaster") or hello.get("secondary"))
    )


# --- the seam: the replica-set operations the script needs ----------------------------------------------------


class PyMongoBackend:
    """The real backend: pymongo, one direct connection per member."""

    def __init__(self, timeout=5.0):
        import pymongo  # imported here only: the fake backend, the tests and `--help` need no driver
        from pymongo import errors

        self._pymongo, self._errors, self.timeout, self._clients = pymongo, errors, timeout, {}

    def _command(self, host, name, value=1):
        client = self._clients.get(host)
        if client is None:
            ms = int(self.timeout * 1000)
            client = self._pymongo.MongoClient(
                host,
                directConnection=True,
                serverSelectionTimeoutMS=ms,
                connectTimeoutMS=ms,
                socketTimeoutMS=ms,
                appname="consul-locker-mongodb-bootstrap",
            )
            self._clients[host] = client
        try:
            return client.admin.command(name, value)
        except self._errors.OperationFailure as e:  # ok: 0 -- the caller reads the document
            return e.details or {"ok": 0, "errmsg": str(e), "code": e.code}
        except self._errors.ConnectionFailure as e:  # includes server selection timeouts
            raise MemberUnreachable(f"{host}: {e}") from None

    def hello(self, host):
        doc = self._command(host, "hello")
        if doc.get("code") == 59:  # CommandNotFound: MongoDB older than 4.4.2
            doc = dict(self._command(host, "isMaster"))
            doc["isWritablePrimary"] = doc.get("ismaster", False)
        return doc

    def repl_status(self, host):
        return self._command(host, "replSetGetStatus")

    def initiate(self, host, config):
        _expect_ok(self._command(host, "replSetInitiate", config), "replSetInitiate")

    def add_member(self, primary, host):
        reply = _expect_ok(self._command(primary, "replSetGetConfig"), "replSetGetConfig")
        new = config_with_member(reply["config"], host)
        if new is not None:
            _expect_ok(self._command(primary, "replSetReconfig", new), "replSetReconfig")


def _expect_ok(doc, what):
    if not _is_ok(doc):
        raise CommandFailed(f"{what}: {doc.get('codeName', '')} {doc.get('errmsg', doc)}".strip())
    return doc


class FakeBackend:
    """A stand-in for a fleet of mongods, shared by several processes through one JSON file (fcntl-locked).

    For tests of the bootstrap race without MongoDB: it records every initiate and add, with the lock holder's
    fencing index, and answers hello/replSetGetStatus in MongoDB's shapes. A member becomes PRIMARY or SECONDARY
    `ready_after` seconds after it was initiated or added, like a real one after its election or initial sync.
    State: {"members": {host: {"up": bool, "set": set id or null, "ready_at": t}}, "sets": {...}, "calls": [...]}.
    """

    def __init__(self, path, aliases=None):
        self.path = path
        self.aliases = {k.lower(): v for k, v in (aliases or {}).items()}

    @contextmanager
    def _state(self, write=False):
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

    @staticmethod
    def _member(state, host):
        m = state["members"].get(host)
        if m is None or not m.get("up", True):
            raise MemberUnreachable(f"{host}: connection refused (fake)")
        return m

    def _record(self, state, op, **fields):
        state["calls"].append(
            dict(op=op, pid=os.getpid(), time=time.time(), lock_index=os.environ.get("CONSUL_LOCK_INDEX"), **fields)
        )

    def hello(self, host):
        host = self._name(host)
        with self._state() as state:
            m = self._member(state, host)
            base = {"maxWireVersion": 21, "minWireVersion": 0, "maxBsonObjectSize": 16777216}
            if not m.get("set"):
                return dict(
                    base,
                    isWritablePrimary=False,
                    secondary=False,
                    isreplicaset=True,
                    ok=1.0,
                    info="Does not have a valid replica set config",
                )
            rs = state["sets"][m["set"]]
            ready = time.time() >= m.get("ready_at", 0)
            primary_ready = time.time() >= state["members"][rs["primary"]].get("ready_at", 0)
            return dict(
                base,
                hosts=list(rs["hosts"]),
                setName=rs["name"],
                setVersion=rs["version"],
                isWritablePrimary=ready and host == rs["primary"],
                secondary=ready and host != rs["primary"],
                me=host,
                ok=1.0,
                **({"primary": rs["primary"]} if primary_ready else {}),
            )

    def repl_status(self, host):
        hello = self.hello(host)
        if not hello.get("setName"):
            return {
                "ok": 0.0,
                "errmsg": "no replset config has been received",
                "code": 94,
                "codeName": "NotYetInitialized",
            }
        state = 1 if hello["isWritablePrimary"] else 2 if hello["secondary"] else 5
        members = [
            {
                "_id": i,
                "name": h,
                "health": 1.0,
                "state": state if h == hello["me"] else 2,
                "stateStr": STATE_NAMES[state if h == hello["me"] else 2],
                "self": h == hello["me"],
            }
            for i, h in enumerate(hello["hosts"])
        ]
        return {"set": hello["setName"], "myState": state, "members": members, "ok": 1.0}

    def initiate(self, host, config):
        host = self._name(host)
        with self._state(write=True) as state:
            m = self._member(state, host)
            if m.get("set"):
                raise CommandFailed("replSetInitiate: AlreadyInitialized already initialized")
            set_id = f"{config['_id']}@{host}"  # every initiate makes a distinct set: two would show as two
            state["sets"][set_id] = {"name": config["_id"], "version": 1, "hosts": [host], "primary": host}
            m.update(set=set_id, ready_at=time.time() + state.get("ready_after", 0.2))
            self._record(state, "initiate", host=host, set=set_id)

    def add_member(self, primary, host):
        primary, host = self._name(primary), self._name(host)
        with self._state(write=True) as state:
            p = self._member(state, primary)
            rs = state["sets"].get(p.get("set") or "")
            if rs is None or rs["primary"] != primary:
                raise CommandFailed(f"replSetReconfig: NotWritablePrimary {primary} is not primary")
            if host not in rs["hosts"]:
                rs["hosts"].append(host)
                rs["version"] += 1
            state["members"].setdefault(host, {"up": True})
            state["members"][host].update(set=p["set"], ready_at=time.time() + state.get("ready_after", 0.2))
            self._record(state, "add", host=host, primary=primary, set=p["set"])


# --- Consul ---------------------------------------------------------------------------------------------------


class Consul:
    """The one Consul query the bootstrap needs, with the consul CLI's environment variables."""

    def __init__(self, addr=None, token=None, timeout=5.0, env=None):
        env = os.environ if env is None else env
        addr = addr or env.get("CONSUL_HTTP_ADDR") or "127.0.0.1:8500"
        if "://" not in addr:
            ssl_on = env.get("CONSUL_HTTP_SSL", "").lower() in ("1", "true", "yes")
            addr = ("https://" if ssl_on else "http://") + addr
        self.addr = addr.rstrip("/")
        self.token = token or env.get("CONSUL_HTTP_TOKEN", "")
        if not self.token and env.get("CONSUL_HTTP_TOKEN_FILE"):
            with open(env["CONSUL_HTTP_TOKEN_FILE"]) as f:
                self.token = f.read().strip()
        self.timeout = timeout
        self.context = None
        if self.addr.startswith("https://"):
            self.context = ssl.create_default_context(cafile=env.get("CONSUL_CACERT") or None)
            if env.get("CONSUL_CLIENT_CERT"):
                self.context.load_cert_chain(env["CONSUL_CLIENT_CERT"], env.get("CONSUL_CLIENT_KEY") or None)

    def members(self, service, passing=True):
        """host:port of the instances of service (only those whose checks all pass, by default).

        Raises Failure when Consul cannot say, including when its ACLs filtered the answer: an empty list that only
        means "this token may not see them" must never be read as "there is nobody"."""
        query = "?passing=1" if passing else ""
        url = f"{self.addr}/v1/health/service/{urllib.parse.quote(service, safe='')}{query}"
        req = urllib.request.Request(url)
        if self.token:
            req.add_header("X-Consul-Token", self.token)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.context) as resp:
                filtered = resp.headers.get("X-Consul-Results-Filtered-By-ACLs", "").lower() == "true"
                entries = json.load(resp)
            if filtered:
                raise Failure(f"Consul's ACLs hid instances of {service!r} from this token (needs service:read)")
            return [
                join_host_port(e["Service"].get("Address") or e["Node"]["Address"], int(e["Service"]["Port"]))
                for e in entries
            ]
        except urllib.error.HTTPError as e:
            raise Failure(f"Consul answered {e.code} to {url}: {e.read()[:200]!r}") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise Failure(f"cannot ask Consul ({url}): {e}") from None


# --- the bootstrap --------------------------------------------------------------------------------------------


def _wait(what, probe, timeout, interval=0.5):
    """Call probe until it returns something truthy, and return that; Failure(RETRY) after timeout s (0: never)."""
    start = last_note = time.monotonic()
    while True:
        value = probe()
        if value:
            return value
        now = time.monotonic()
        if timeout and now - start >= timeout:
            raise Failure(f"gave up after {timeout:g}s waiting for {what}")
        if now - last_note >= 30:
            log(f"still waiting for {what} ({now - start:.0f}s)")
            last_note = now
        time.sleep(interval)


def _hello_or_none(backend, host):
    try:
        return backend.hello(host)
    except MemberUnreachable:
        return None


def bootstrap(args, backend, consul, cfg):
    me, local = args.advertise, cfg.local_address()
    if os.environ.get("CONSUL_LOCK_HELD") != "true" and not args.no_lock_check:
        raise Failure("not running under consul-locker (CONSUL_LOCK_HELD is not true); see --help", USAGE)
    log(f"member {me}, replica set {cfg.set_name!r}, local mongod {local}, Consul service {args.service!r}")

    local_hello = _wait(f"the local mongod at {local}", lambda: _hello_or_none(backend, local), args.mongod_timeout)
    # Consul must know this member (in any health) before its list of peers is trusted: a wrong service name, a
    # missing registration or a token that may not read the service all give an empty list, never "no peers".
    if not any(same_member(m, me) for m in consul.members(args.service, passing=False)):
        raise Failure(
            f"Consul does not list {me} in service {args.service!r} (not registered yet, another name, or "
            "an ACL token that may not read it): not trusting its list of peers"
        )
    peers = [p for p in consul.members(args.service) if not same_member(p, me)]
    answers = {}
    for peer in peers:
        try:
            answers[peer] = backend.hello(peer)
        except MemberUnreachable as e:
            answers[peer] = e
    decision = decide(me, cfg.set_name, local_hello, answers)
    log(f"{decision.action}: {decision.reason}")
    if decision.action == "refuse":
        raise Failure(decision.reason, REFUSED)
    if decision.action == "retry":
        raise Failure(decision.reason, RETRY)
    try:
        if decision.action == "initiate":
            backend.initiate(local, {"_id": cfg.set_name, "members": [{"_id": 0, "host": me}]})
        elif decision.action == "join":
            backend.add_member(decision.primary, me)
    except (MemberUnreachable, CommandFailed) as e:
        raise Failure(f"{decision.action} failed: {e}") from None
    _wait(f"{me} to be PRIMARY or SECONDARY", lambda: is_ready(_hello_or_none(backend, local) or {}), args.timeout)

    def visible():
        try:
            return any(same_member(p, me) for p in consul.members(args.service))
        except Failure as e:  # keep the lock through a Consul blip: exiting now could let a second set start
            log(f"{e}; still waiting")
            return False

    _wait(f"Consul to list {me} as a passing instance of {args.service!r}", visible, args.timeout)
    log(f"done: {me} is a member of {cfg.set_name!r} and visible in Consul")
    return OK


def check(args, backend, cfg):
    try:
        code, message = check_status(backend.repl_status(cfg.local_address()))
    except MemberUnreachable as e:
        code, message = CHECK_CRITICAL, f"CRITICAL: mongod does not answer: {e}"
    print(message)
    return code


def build_parser():
    p = argparse.ArgumentParser(
        prog="bootstrap.py",
        description=__doc__.split("\n\n")[0],
        epilog="Modes: bootstrap (default; run under consul-locker) and check (a Consul script check).",
    )
    p.add_argument("mode", nargs="?", choices=("bootstrap", "check"), default="bootstrap")
    p.add_argument("--config", default="/etc/mongod.conf", help="mongod's YAML config (/etc/mongod.conf)")
    p.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help="this member's name in the replica set and in Consul (default: this host's name and net.port)",
    )
    p.add_argument("--service", default="mongodb", help="Consul service of the members (mongodb)")
    p.add_argument("--consul-addr", help="Consul HTTP address (env CONSUL_HTTP_ADDR, http://127.0.0.1:8500)")
    p.add_argument("--mongod-timeout", type=float, default=120.0, help="seconds to wait for the local mongod (120)")
    p.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        help="seconds to wait to be PRIMARY/SECONDARY and passing "
        "in Consul; 0 = forever (the default: exiting earlier lets the next machine start a second set)",
    )
    p.add_argument(
        "--connect-timeout", type=float, default=3.0, help="seconds for each connection or command to a mongod (3)"
    )
    p.add_argument("--no-lock-check", action="store_true", help="run even when not under consul-locker (unsafe)")
    p.add_argument(
        "--fake-state",
        metavar="FILE",
        default=os.environ.get("MONGODB_BOOTSTRAP_FAKE_STATE"),
        help="use the file-backed fake MongoDB of the tests instead of pymongo (env MONGODB_BOOTSTRAP_FAKE_STATE)",
    )
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        cfg = MongodConfig.load(args.config)
        args.advertise = args.advertise or join_host_port(socket.gethostname(), cfg.port)
        if args.fake_state:
            backend = FakeBackend(args.fake_state, aliases={cfg.local_address(): args.advertise})
        else:
            try:
                backend = PyMongoBackend(args.connect_timeout)
            except ImportError:
                raise Failure("pymongo is not installed (pip install pymongo)", USAGE) from None
        if args.mode == "check":
            return check(args, backend, cfg)
        return bootstrap(args, backend, Consul(args.consul_addr), cfg)
    except Failure as e:
        if args.mode == "check":
            print(f"CRITICAL: {e}")
            return CHECK_CRITICAL
        log(f"error: {e}")
        return e.code


if __name__ == "__main__":
    sys.exit(main())
