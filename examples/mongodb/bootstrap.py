#!/usr/bin/env python3
"""Bootstrap a MongoDB replica set when every machine boots at once: exactly one initiates, the others join.

Run it under the lock, on every MongoDB machine:

    consul-locker mongodb-bootstrap python3 bootstrap.py --config /etc/mongod.conf --advertise mongo1:27017

Under the lock it waits for the local mongod, reads the replica set's record in Consul KV, asks the Consul catalog
for *every* registered instance of the service `mongodb` (whatever its health: a member that is recovering, in an
election or failing its check is still a member), asks each of them `hello`, reads the `replicaSetId` of every
set it finds, and then:

  - this mongod is already a member            -> nothing to do but wait until it is PRIMARY or SECONDARY;
  - a peer has the replica set                 -> ask its primary to add this member (replSetReconfig);
  - every instance answered, none is in a set,
    and Consul KV has no record of the set     -> replSetInitiate with this member alone, then write the record
                                                  (check-and-set: created only if absent);
  - the record exists but no member says so,
    two sets share the name, this member was
    REMOVED, a peer is in another set          -> exit 1 without touching anything: a human should look;
  - Consul or an instance cannot be asked      -> exit 3 without touching anything (run it again later).

Every wait is bounded (--mongod-timeout, --timeout); the commands that wait for a majority (replSetInitiate,
replSetReconfig, createUser) get --command-timeout, and when their answer is lost the bootstrap asks the member
what happened before doing anything else.

Auth: with --username and --password-file (a secret), the bootstrap authenticates to every member; the initiator
creates that user itself through MongoDB's localhost exception, while it still holds the lock, so that joiners
(which talk to the remote primary) can authenticate.

Health-check mode, for a Consul script check (exit 0 passing, 1 warning, 2 critical); it uses `hello`, which
needs no authentication:

    python3 bootstrap.py check --config /etc/mongod.conf

Exit codes: 0 done; 1 refused (the replica set looks inconsistent, a human should look); 2 usage or config error;
3 try again later (Consul, the local mongod or a peer unreachable, no primary right now, a bound passed).
"""

import argparse
import datetime
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
# MongoDB error codes the bootstrap reads
UNAUTHORIZED = 13
AUTHENTICATION_FAILED = 18
ALREADY_INITIALIZED = 23
NO_REPLICATION_ENABLED = 76
INVALID_REPLICA_SET_CONFIG = 93  # replSetGetStatus of a member removed from its set
NOT_YET_INITIALIZED = 94  # replSetGetStatus before replSetInitiate
COMMAND_NOT_FOUND = 59
USER_EXISTS = (11000, 51003)
CRITICAL_STATES = {6, 8, 10}


def log(message):
    print(f"mongodb-bootstrap: {message}", file=sys.stderr, flush=True)


class Failure(Exception):
    """Stop with this exit code and message."""

    def __init__(self, message, code=RETRY):
        super().__init__(message)
        self.code = code


class MemberUnreachable(Exception):
    """No answer from a mongod (refused, timed out, unknown host): for a command, its effect is unknown."""


class CommandFailed(Exception):
    """A mongod answered a command with ok: 0."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


# --- mongod's configuration file ------------------------------------------------------------------------------


class MongodConfig:
    def __init__(self, port, bind_ips, bind_all, set_name, key_file=None):
        self.port, self.bind_ips, self.bind_all, self.set_name = port, bind_ips, bind_all, set_name
        self.key_file = key_file

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
        security = doc.get("security") or {}
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
        return cls(port, [b for b in bind_ips if b], bool(net.get("bindIpAll")), str(set_name), security.get("keyFile"))

    def local_address(self):
        """host:port to reach this mongod from this machine (a loopback address: the localhost exception)."""
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


# --- reading MongoDB's answers (pure: documents in, meaning out) ----------------------------------------------


def _is_ok(doc):
    return isinstance(doc, dict) and doc.get("ok") in (1, 1.0, True)


def _member_hosts(hello):
    return [h for key in ("hosts", "passives", "arbiters") for h in (hello.get(key) or [])]


def member_view(hello, me=None):
    """What a `hello` says about the mongod that sent it.

    "primary", "secondary", "arbiter", "member" (in its set's configuration but not readable yet: STARTUP2,
    RECOVERING, ROLLBACK...), "removed" (names a set but is not in its configuration), "uninitialized" (a replica
    set member without a configuration -- or, on some versions, a removed one: replSetGetStatus tells them apart),
    "standalone", "error".
    """
    if not _is_ok(hello):
        return "error"
    if hello.get("setName"):
        if hello.get("isWritablePrimary") or hello.get("ismaster"):
            return "primary"
        if hello.get("secondary"):
            return "secondary"
        if hello.get("arbiterOnly"):
            return "arbiter"
        if hello.get("hidden"):  # hidden members are not listed in hosts, but they are members
            return "member"
        name = hello.get("me") or me
        if name and any(same_member(name, h) for h in _member_hosts(hello)):
            return "member"
        return "removed"
    if hello.get("isreplicaset"):
        return "uninitialized"
    return "standalone"


def is_ready(hello):
    """PRIMARY or SECONDARY (or an arbiter), from a hello reply."""
    return member_view(hello or {}) in ("primary", "secondary", "arbiter")


def replica_set_id(config_reply):
    """The replicaSetId of a replSetGetConfig reply (an ObjectId, as a hex string), or None."""
    if not _is_ok(config_reply):
        return None
    rid = ((config_reply.get("config") or {}).get("settings") or {}).get("replicaSetId")
    if isinstance(rid, dict) and "$oid" in rid:  # Extended JSON
        rid = rid["$oid"]
    return str(rid) if rid else None


def config_hosts(config_reply):
    return [m.get("host", "") for m in ((config_reply or {}).get("config") or {}).get("members") or []]


def _error(doc):
    return f"{doc.get('codeName') or doc.get('code')}: {doc.get('errmsg', doc)}"


# --- the decision (pure) --------------------------------------------------------------------------------------


class Decision:
    def __init__(self, action, reason, primary=None, set_id=None):
        self.action, self.reason, self.primary, self.set_id = action, reason, primary, set_id

    def __repr__(self):
        return f"Decision({self.action!r}, {self.reason!r}, primary={self.primary!r}, set_id={self.set_id!r})"


def decide(me, set_name, local_hello, peers, local_status=None, set_ids=None, record=None):
    """What to do. Inputs:

    local_hello  -- this member's hello;
    peers        -- {host: hello, or an Exception when it did not answer}: every instance Consul has registered,
                    whatever its health, and every member the record names;
    local_status -- this member's replSetGetStatus, asked when its hello shows no set (removed or uninitialized?);
    set_ids      -- {host: replicaSetId, or an Exception}: for this member (key `me`) and each peer in a set;
    record       -- the set's record in Consul KV (a dict with "replicaSetId", "members"), or None.

    Actions: "wait" (already a member), "join" (ask .primary to add me), "initiate", "retry", "refuse".
    """
    set_ids = set_ids or {}
    local = member_view(local_hello, me)
    if local == "error":
        return Decision("retry", f"the local mongod answered hello with an error: {local_hello!r}")
    if local == "standalone":
        return Decision("refuse", "the local mongod does not run with a replica set name (replication.replSetName)")
    if local_hello.get("setName") and local_hello["setName"] != set_name:
        return Decision(
            "refuse", f"the local mongod is in replica set {local_hello['setName']!r}, the config says {set_name!r}"
        )
    if local == "removed":
        return Decision(
            "refuse",
            f"{me} was removed from replica set {set_name!r} (hello names the set, its hosts do not include {me}): "
            "re-add it on the primary (rs.add) or empty its dbPath; not waiting for it to become a member",
        )
    if local == "uninitialized" and isinstance(local_status, dict) and not _is_ok(local_status):
        code = local_status.get("code")
        if code == INVALID_REPLICA_SET_CONFIG:
            return Decision(
                "refuse",
                f"{me} has a replica set configuration it is not a member of ({_error(local_status)}): it was removed; "
                "re-add it on the primary (rs.add) or empty its dbPath",
            )
        if code == UNAUTHORIZED:
            return Decision("retry", f"cannot tell whether {me} was ever in a set: {_error(local_status)} "
                                     "(give the bootstrap --username and --password-file)")  # fmt: skip
        if code != NOT_YET_INITIALIZED:
            return Decision("retry", f"the local mongod answered replSetGetStatus with {_error(local_status)}")

    unreachable = sorted(h for h, doc in peers.items() if isinstance(doc, Exception))
    in_set = {h: doc for h, doc in peers.items() if not isinstance(doc, Exception) and doc.get("setName")}
    for host, doc in sorted(in_set.items()):
        if doc["setName"] != set_name:
            return Decision("refuse", f"peer {host} is in replica set {doc['setName']!r}, not {set_name!r}")

    # Which set(s) of this name exist: MongoDB tells two sets apart by settings.replicaSetId, not by name.
    holders = ([me] if local_hello.get("setName") else []) + sorted(in_set)
    ids = {}
    for host in holders:
        rid = set_ids.get(host)
        if rid is None or isinstance(rid, Exception):
            why = f": {rid}" if rid is not None else ""
            return Decision("retry", f"cannot read the replicaSetId of {host} (replSetGetConfig){why}")
        ids.setdefault(rid, []).append(host)
    if len(ids) > 1:
        seen = "; ".join(f"{rid} on {', '.join(hosts)}" for rid, hosts in sorted(ids.items()))
        return Decision("refuse", f"two replica sets are named {set_name!r}: {seen}")
    recorded = (record or {}).get("replicaSetId")
    if ids and recorded and recorded not in ids:
        ((rid, hosts),) = ids.items()
        return Decision(
            "refuse",
            f"Consul KV records replica set {set_name!r} as {recorded}, but {', '.join(hosts)} "
            f"{'is' if len(hosts) == 1 else 'are'} in {rid}: a second set was initiated",
        )
    set_id = next(iter(ids), None)

    if local in ("primary", "secondary", "arbiter", "member"):
        return Decision("wait", f"already a member of {set_name!r} ({local})", set_id=set_id)
    members_of_set = {h: doc for h, doc in in_set.items() if member_view(doc, h) != "removed"}
    for host, doc in sorted(members_of_set.items()):
        if any(same_member(me, h) for h in _member_hosts(doc)):
            return Decision(
                "wait", f"{me} is already in the configuration of {set_name!r} (seen by {host})", None, set_id
            )
    if in_set:
        writable = sorted(h for h, doc in members_of_set.items() if member_view(doc, h) == "primary")
        named = sorted({doc["primary"] for doc in members_of_set.values() if doc.get("primary")})
        primary = (writable or named or [None])[0]
        if primary is None:
            return Decision("retry", f"replica set {set_name!r} has no primary right now (election?)", set_id=set_id)
        return Decision(
            "join", f"replica set {set_name!r} exists (seen by {', '.join(sorted(in_set))})", primary, set_id
        )
    if record:
        if unreachable:
            return Decision("retry", f"Consul KV records replica set {set_name!r} ({recorded}); no member that "
                                     f"answered is in it and {', '.join(unreachable)} did not answer")  # fmt: skip
        return Decision(
            "refuse",
            f"Consul KV records replica set {set_name!r} ({recorded}, members "
            f"{', '.join(record.get('members') or [])}) but no instance is in it: not initiating a second one "
            "(if the set is truly gone, delete its record)",
        )
    if unreachable:
        return Decision(
            "retry", f"cannot tell whether {', '.join(unreachable)} already has a replica set: no answer to hello"
        )
    return Decision(
        "initiate", f"no instance is in a replica set and Consul KV has no record of one ({len(peers)} asked)"
    )


def config_with_member(config, host):
    """The replica set config for replSetReconfig with host added, or None when host is already a member."""
    members = list(config.get("members") or [])
    if any(same_member(host, m.get("host", "")) for m in members):
        return None
    new = {k: v for k, v in config.items() if k != "term"}  # the primary sets the term itself
    new["members"] = members + [{"_id": max((int(m["_id"]) for m in members), default=-1) + 1, "host": host}]
    new["version"] = int(config.get("version", 0)) + 1
    return new


# --- the health check (pure) ----------------------------------------------------------------------------------


def check_status(status):
    """(exit code, message) for a Consul check, from a replSetGetStatus reply (ok: 0 replies included)."""
    if not _is_ok(status):
        code = status.get("code")
        if code == NOT_YET_INITIALIZED:
            return CHECK_WARNING, "WARNING: replica set not initiated yet"
        if code == INVALID_REPLICA_SET_CONFIG:
            return CHECK_CRITICAL, f"CRITICAL: REMOVED or invalid configuration ({_error(status)})"
        if code == UNAUTHORIZED:
            return CHECK_WARNING, f"WARNING: cannot read the member state ({_error(status)})"
        if code == NO_REPLICATION_ENABLED:
            return CHECK_CRITICAL, "CRITICAL: mongod runs without --replSet (replication.replSetName)"
        return CHECK_CRITICAL, f"CRITICAL: replSetGetStatus failed: {_error(status)}"
    state = int(status.get("myState", 6))
    me = next((m for m in status.get("members") or [] if m.get("self")), {})
    name = me.get("stateStr") or STATE_NAMES.get(state, str(state))
    healthy = sum(1 for m in status.get("members") or [] if m.get("health") in (1, 1.0, True))
    text = f"{name} of {status.get('set')!r}, {healthy}/{len(status.get('members') or [])} members healthy"
    if state in (1, 2, 7):
        return CHECK_PASSING, f"OK: {text}"
    if state in CRITICAL_STATES:
        return CHECK_CRITICAL, f"CRITICAL: {text}"
    return CHECK_WARNING, f"WARNING: {text}"


def check_member(hello, status=None):
    """(exit code, message) for a Consul check from `hello` (no authentication needed); replSetGetStatus only
    when hello shows no set, to tell "not initiated yet" (warning) from "removed" (critical)."""
    view = member_view(hello)
    name = hello.get("setName")
    if view in ("primary", "secondary", "arbiter"):
        return CHECK_PASSING, f"OK: {view.upper()} of {name!r}"
    if view == "member":
        return CHECK_WARNING, f"WARNING: member of {name!r}, neither primary nor secondary (STARTUP2, RECOVERING?)"
    if view == "removed":
        return CHECK_CRITICAL, f"CRITICAL: REMOVED from {name!r} (not in its hosts)"
    if view == "standalone":
        return CHECK_CRITICAL, "CRITICAL: mongod runs without --replSet (replication.replSetName)"
    if view == "error":
        return CHECK_CRITICAL, f"CRITICAL: hello failed: {hello!r}"
    if status is None:
        return CHECK_WARNING, "WARNING: no replica set configuration yet"
    return check_status(status)


# --- the seam: the replica-set operations the script needs ----------------------------------------------------


class PyMongoBackend:
    """The real backend: pymongo, one direct connection per member (and per timeout)."""

    def __init__(self, timeout=3.0, command_timeout=60.0, username=None, password=None):
        import pymongo  # imported here only: the tests' fake backend, the check of a fixture, `--help` need no driver
        from pymongo import errors

        self._pymongo, self._errors = pymongo, errors
        self.timeout, self.command_timeout = timeout, command_timeout
        self.username, self.password = username, password
        self._clients = {}

    def client(self, host, slow=False, auth=True):
        """A client for host; `slow` ones wait --command-timeout for an answer (majority writes), the others
        --connect-timeout. Clients connect lazily."""
        auth = bool(auth and self.username)
        key = (host, slow, auth)
        if key not in self._clients:
            ms = int(self.timeout * 1000)
            kw = {"username": self.username, "password": self.password, "authSource": "admin"} if auth else {}
            self._clients[key] = self._pymongo.MongoClient(
                host,
                directConnection=True,
                serverSelectionTimeoutMS=ms,
                connectTimeoutMS=ms,
                socketTimeoutMS=int((self.command_timeout if slow else self.timeout) * 1000),
                appname="consul-locker-mongodb-bootstrap",
                **kw,
            )
        return self._clients[key]

    def _command(self, host, name, value=1, slow=False, **kw):
        # With credentials, authenticate; when the user does not exist yet (a fresh member), fall back to an
        # unauthenticated connection: on localhost that is MongoDB's localhost exception.
        for auth in (True, False) if self.username else (False,):
            try:
                return self.client(host, slow, auth).admin.command(name, value, **kw)
            except self._errors.OperationFailure as e:  # ok: 0 -- the caller reads the document
                if auth and e.code == AUTHENTICATION_FAILED:
                    continue
                return e.details or {"ok": 0, "errmsg": str(e), "code": e.code}
            except self._errors.ConnectionFailure as e:  # includes timeouts: the command's effect is unknown
                raise MemberUnreachable(f"{host}: {e}") from None
        raise AssertionError("unreachable")

    def hello(self, host):
        doc = self._command(host, "hello")
        if doc.get("code") == COMMAND_NOT_FOUND:  # MongoDB older than 4.4.2
            doc = dict(self._command(host, "isMaster"))
            doc["isWritablePrimary"] = doc.get("ismaster", False)
        return doc

    def repl_status(self, host):
        return self._command(host, "replSetGetStatus")

    def get_config(self, host):
        return self._command(host, "replSetGetConfig")

    def initiate(self, host, config):
        _expect_ok(self._command(host, "replSetInitiate", config, slow=True), "replSetInitiate")

    def add_member(self, primary, host):
        reply = _expect_ok(self.get_config(primary), "replSetGetConfig")
        new = config_with_member(reply["config"], host)
        if new is not None:
            _expect_ok(self._command(primary, "replSetReconfig", new, slow=True), "replSetReconfig")

    def create_user(self, host, username, password):
        doc = self._command(
            host, "createUser", username, slow=True, pwd=password, roles=["root"], writeConcern={"w": "majority"}
        )
        if not _is_ok(doc) and doc.get("code") not in USER_EXISTS:
            _expect_ok(doc, "createUser")


def _expect_ok(doc, what):
    if not _is_ok(doc):
        raise CommandFailed(f"{what}: {_error(doc)}", doc.get("code"))
    return doc


# --- Consul ---------------------------------------------------------------------------------------------------


class Consul:
    """The Consul calls the bootstrap needs (catalog, KV), with the consul CLI's environment variables."""

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

    def _call(self, method, path, body=None, missing_ok=False):
        url = self.addr + path
        req = urllib.request.Request(url, data=body, method=method)
        if self.token:
            req.add_header("X-Consul-Token", self.token)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.context) as resp:
                filtered = resp.headers.get("X-Consul-Results-Filtered-By-ACLs", "").lower() == "true"
                return json.load(resp), filtered
        except urllib.error.HTTPError as e:
            if missing_ok and e.code == 404:
                return None, False
            raise Failure(f"Consul answered {e.code} to {method} {url}: {e.read()[:200]!r}") from None
        except (OSError, ValueError) as e:
            raise Failure(f"cannot ask Consul ({method} {url}): {e}") from None

    def instances(self, service):
        """host:port of every registered instance of service, whatever its health (the catalog).

        Raises Failure when Consul cannot say, including when its ACLs filtered the answer: an empty list that only
        means "this token may not see them" must never be read as "there is nobody"."""
        entries, filtered = self._call("GET", f"/v1/catalog/service/{urllib.parse.quote(service, safe='')}")
        if filtered:
            raise Failure(f"Consul's ACLs hid instances of {service!r} from this token (needs service:read)")
        try:
            return [join_host_port(e.get("ServiceAddress") or e["Address"], int(e["ServicePort"])) for e in entries]
        except (KeyError, TypeError, ValueError) as e:
            raise Failure(f"unexpected catalog answer for {service!r}: {e}") from None

    def read(self, key):
        """(value as a dict, ModifyIndex) of key, or (None, 0) when it does not exist."""
        entries, _ = self._call("GET", f"/v1/kv/{urllib.parse.quote(key)}", missing_ok=True)
        if not entries:
            return None, 0
        import base64

        try:
            return json.loads(base64.b64decode(entries[0]["Value"] or b"")), int(entries[0]["ModifyIndex"])
        except (ValueError, KeyError, TypeError) as e:
            raise Failure(f"Consul KV {key} does not hold the bootstrap's JSON record: {e}", REFUSED) from None

    def cas(self, key, value, index):
        """Write value only if key's ModifyIndex is still index (0: only if key does not exist). True if written."""
        done, _ = self._call("PUT", f"/v1/kv/{urllib.parse.quote(key)}?cas={index}", json.dumps(value).encode())
        return done is True


# --- the bootstrap --------------------------------------------------------------------------------------------


def _wait(what, probe, timeout, interval=0.5, detail=None):
    """Call probe until it returns something truthy, and return that; Failure(RETRY) after timeout seconds."""
    start = last_note = time.monotonic()
    while True:
        value = probe()
        if value:
            return value
        now = time.monotonic()
        if now - start >= timeout:
            extra = f" ({detail()})" if detail else ""
            raise Failure(f"gave up after {timeout:g}s waiting for {what}{extra}")
        if now - last_note >= 30:
            log(f"still waiting for {what} ({now - start:.0f}s)")
            last_note = now
        time.sleep(interval)


def _hello_or_none(backend, host):
    try:
        return backend.hello(host)
    except MemberUnreachable:
        return None


def _describe(backend, host, me):
    hello = _hello_or_none(backend, host)
    if hello is None:
        return "the local mongod does not answer"
    view = member_view(hello, me)
    if view == "member":
        return "in the configuration but neither PRIMARY nor SECONDARY: initial sync (STARTUP2), RECOVERING, or " \
               "a keyFile or host name the other members do not accept -- see mongod's log"  # fmt: skip
    return f"it is {view}"


def _lock_prefix():
    key = os.environ.get("CONSUL_LOCK_KEY", "")
    return key.rsplit("/", 1)[0] if "/" in key else "consul-locker/mongodb-bootstrap"


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Bootstrap:
    def __init__(self, args, backend, consul, cfg):
        self.args, self.backend, self.consul, self.cfg = args, backend, consul, cfg
        self.me, self.local = args.advertise, cfg.local_address()
        self.key = args.record_key or f"{_lock_prefix()}/replica-set/{cfg.set_name}"

    def run(self):
        args, me, local = self.args, self.me, self.local
        if os.environ.get("CONSUL_LOCK_HELD") != "true" and not args.no_lock_check:
            raise Failure("not running under consul-locker (CONSUL_LOCK_HELD is not true); see --help", USAGE)
        log(f"member {me}, replica set {self.cfg.set_name!r}, local mongod {local}, Consul service {args.service!r}")

        local_hello = _wait(
            f"the local mongod at {local}", lambda: _hello_or_none(self.backend, local), args.mongod_timeout
        )
        # Consul must know this member (in any health) before its list of peers is trusted: a wrong service name,
        # a missing registration or a token that may not read the service all give an empty list, never "no peers".
        instances = self.consul.instances(args.service)
        if not any(same_member(m, me) for m in instances):
            raise Failure(
                f"Consul does not list {me} in service {args.service!r} (not registered yet, another name, or "
                "an ACL token that may not read it): not trusting its list of peers"
            )
        record, record_index = self.consul.read(self.key)
        if record:
            log(f"Consul KV {self.key}: replica set {record.get('replicaSetId')} members {record.get('members')}")
        peers = {}
        for host in instances + list((record or {}).get("members") or []):
            if not same_member(host, me) and not any(same_member(host, p) for p in peers):
                peers[host] = None
        for peer in peers:
            try:
                peers[peer] = self.backend.hello(peer)
            except MemberUnreachable as e:
                peers[peer] = e
        local_status = None
        if member_view(local_hello, me) == "uninitialized":
            local_status = self._status_or_error(local)
        set_ids = {}
        holders = ([(me, local)] if local_hello.get("setName") else []) + [
            (h, h) for h, doc in peers.items() if isinstance(doc, dict) and doc.get("setName")
        ]
        for name, address in holders:
            set_ids[name] = self._set_id(address)

        decision = decide(me, self.cfg.set_name, local_hello, peers, local_status, set_ids, record)
        log(f"{decision.action}: {decision.reason}")
        if decision.action == "refuse":
            raise Failure(decision.reason, REFUSED)
        if decision.action == "retry":
            raise Failure(decision.reason, RETRY)
        set_id = decision.set_id
        if decision.action == "initiate":
            set_id = self.initiate()
            record, record_index = self.consul.read(self.key)
        elif decision.action == "join":
            self.join(decision.primary)

        _wait(
            f"{me} to be PRIMARY or SECONDARY",
            lambda: is_ready(_hello_or_none(self.backend, local)),
            args.timeout,
            detail=lambda: (
                _describe(self.backend, local, me) + f"; it stays in {self.cfg.set_name!r}, a later run sees it there"
            ),
        )
        if decision.action == "initiate" and self.args.username:
            self.create_user()
        self.keep_record(set_id, record, record_index)
        log(f"done: {me} is a member of {self.cfg.set_name!r} ({set_id})")
        return OK

    def _status_or_error(self, host):
        try:
            return self.backend.repl_status(host)
        except MemberUnreachable as e:
            raise Failure(f"the local mongod stopped answering: {e}") from None

    def _set_id(self, host):
        try:
            reply = self.backend.get_config(host)
        except MemberUnreachable as e:
            return e
        rid = replica_set_id(reply)
        return rid if rid else CommandFailed(f"replSetGetConfig: {_error(reply)}", reply.get("code"))

    def initiate(self):
        me, local = self.me, self.local
        try:
            self.backend.initiate(local, {"_id": self.cfg.set_name, "members": [{"_id": 0, "host": me}]})
        except MemberUnreachable as e:
            # The answer was lost, not necessarily the command: ask the member before anything else.
            log(f"no answer to replSetInitiate ({e}); asking {local} whether it took effect")
            hello = _wait(
                f"{local} to answer hello", lambda: _hello_or_none(self.backend, local), self.args.mongod_timeout
            )
            if not hello.get("setName"):
                status = self._status_or_error(local)
                if _is_ok(status) or status.get("code") != NOT_YET_INITIALIZED:
                    raise Failure(f"cannot tell whether replSetInitiate took effect: {status!r}") from None
                raise Failure("replSetInitiate did not take effect (the member has no configuration)") from None
            log("replSetInitiate took effect")
        except CommandFailed as e:
            if e.code == ALREADY_INITIALIZED:
                raise Failure(f"{local} got a configuration between the check and replSetInitiate: {e}") from None
            raise Failure(f"initiate failed: {e}") from None
        set_id = _wait(
            f"the replicaSetId of {local}",
            lambda: (lambda r: r if isinstance(r, str) else None)(self._set_id(local)),
            self.args.mongod_timeout,
        )
        record = {
            "set": self.cfg.set_name,
            "replicaSetId": set_id,
            "members": [me],
            "initiatedBy": me,
            "initiated": _now(),
            "lockIndex": os.environ.get("CONSUL_LOCK_INDEX"),
        }
        if self.consul.cas(self.key, record, 0):
            log(f"recorded replica set {self.cfg.set_name!r} ({set_id}) in Consul KV {self.key}")
        else:
            found, _ = self.consul.read(self.key)
            if (found or {}).get("replicaSetId") != set_id:
                raise Failure(
                    f"initiated {self.cfg.set_name!r} as {set_id}, but Consul KV {self.key} already records "
                    f"{(found or {}).get('replicaSetId')}: two sets exist, a human must merge them",
                    REFUSED,
                )
        return set_id

    def join(self, primary):
        try:
            self.backend.add_member(primary, self.me)
        except MemberUnreachable as e:
            log(f"no answer from {primary} to the reconfig ({e}); asking whether {self.me} is in its configuration")
            try:
                hosts = config_hosts(self.backend.get_config(primary))
            except MemberUnreachable as e2:
                raise Failure(f"join: cannot tell whether the reconfig took effect: {e2}") from None
            if not any(same_member(self.me, h) for h in hosts):
                raise Failure("join: the reconfig did not take effect") from None
        except CommandFailed as e:
            raise Failure(f"join failed: {e}") from None

    def create_user(self):
        # Through the localhost exception: the set has no user yet, and this connection is to a loopback address.
        # It happens under the lock, before any joiner (which talks to this primary) needs to authenticate.
        try:
            self.backend.create_user(self.local, self.args.username, self.args.password)
        except (MemberUnreachable, CommandFailed) as e:
            raise Failure(f"cannot create user {self.args.username!r} on {self.local}: {e}") from None
        log(f"created user {self.args.username!r} (localhost exception)")

    def keep_record(self, set_id, record, index):
        """Write or update the set's record; a set made before records existed gets one now (cas=0)."""
        if not set_id:
            return
        for _ in range(5):
            if record and record.get("replicaSetId") != set_id:
                raise Failure(
                    f"Consul KV {self.key} records {record.get('replicaSetId')}, this set is {set_id}", REFUSED
                )
            members = list((record or {}).get("members") or [])
            if any(same_member(self.me, m) for m in members):
                return
            new = dict(record or {"set": self.cfg.set_name, "replicaSetId": set_id})
            new["members"] = members + [self.me]
            if self.consul.cas(self.key, new, index if record else 0):
                return
            record, index = self.consul.read(self.key)
        log(f"warning: could not add {self.me} to the record {self.key} (it keeps changing)")


def check(args, backend, cfg):
    local = cfg.local_address()
    try:
        hello = backend.hello(local)
        status = backend.repl_status(local) if member_view(hello, args.advertise) == "uninitialized" else None
        code, message = check_member(hello, status)
    except MemberUnreachable as e:
        code, message = CHECK_CRITICAL, f"CRITICAL: mongod does not answer: {e}"
    print(message)
    return code


def _positive(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds: every wait is bounded")
    return value


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
    p.add_argument(
        "--record-key",
        metavar="KEY",
        help="Consul KV key of the set's record (default: the lock's prefix + /replica-set/SETNAME)",
    )
    p.add_argument("--mongod-timeout", type=_positive, default=120.0, help="seconds to wait for the local mongod (120)")
    p.add_argument(
        "--timeout",
        type=_positive,
        default=600.0,
        help="seconds to wait for this member to be PRIMARY or SECONDARY (600); then exit 3 -- it stays in the set",
    )
    p.add_argument(
        "--connect-timeout", type=_positive, default=3.0, help="seconds for a connection or a quick command (3)"
    )
    p.add_argument(
        "--command-timeout",
        type=_positive,
        default=60.0,
        help="seconds for replSetInitiate, replSetReconfig, createUser, which wait for a majority (60)",
    )
    p.add_argument(
        "--username", default=os.environ.get("MONGODB_BOOTSTRAP_USER"), help="admin user (env MONGODB_BOOTSTRAP_USER)"
    )
    p.add_argument(
        "--password-file",
        default=os.environ.get("MONGODB_BOOTSTRAP_PASSWORD_FILE"),
        help="file holding its password, e.g. a mounted secret (env MONGODB_BOOTSTRAP_PASSWORD_FILE)",
    )
    p.add_argument("--no-lock-check", action="store_true", help="run even when not under consul-locker (unsafe)")
    return p


def load_credentials(args):
    args.password = None
    if bool(args.username) != bool(args.password_file):
        raise Failure("--username and --password-file go together", USAGE)
    if args.password_file:
        try:
            with open(args.password_file) as f:
                args.password = f.read().rstrip("\r\n")
        except OSError as e:
            raise Failure(f"cannot read the password file: {e}", USAGE) from None
        if not args.password:
            raise Failure(f"{args.password_file} is empty", USAGE)


def main(argv=None, backend_factory=None):
    """backend_factory(args, cfg) -> backend: the seam for the tests' fake MongoDB (default: pymongo)."""
    args = build_parser().parse_args(argv)
    try:
        cfg = MongodConfig.load(args.config)
        args.advertise = args.advertise or join_host_port(socket.gethostname(), cfg.port)
        load_credentials(args)
        if cfg.key_file and not args.username and args.mode == "bootstrap":
            log("warning: security.keyFile is set but no --username: joiners cannot authenticate to the primary")
        if backend_factory is not None:
            backend = backend_factory(args, cfg)
        else:
            try:
                backend = PyMongoBackend(args.connect_timeout, args.command_timeout, args.username, args.password)
            except ImportError:
                raise Failure("pymongo is not installed (pip install pymongo)", USAGE) from None
        if args.mode == "check":
            return check(args, backend, cfg)
        return Bootstrap(args, backend, Consul(args.consul_addr), cfg).run()
    except Failure as e:
        if args.mode == "check":
            print(f"CRITICAL: {e}")
            return CHECK_CRITICAL
        log(f"error: {e}")
        return e.code


if __name__ == "__main__":
    sys.exit(main())
