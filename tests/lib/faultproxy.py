"""A fault-injecting TCP proxy on loopback, for putting network trouble between consul-locker and an agent.

    proxy = FaultProxy(("127.0.0.1", agent.http_port)).start()
    env = locker_env(agent, CONSUL_HTTP_ADDR=proxy.addr)
    proxy.cut()     # a partition: nothing passes either way, no RST, new connections hang
    proxy.heal()    # the partition ends: what was held back is delivered, as TCP retransmission would
    proxy.drop()    # every open connection is reset (RST), as by a restarted agent or a NAT timeout
    proxy.close()

A cut holds bytes back rather than throwing them away: a real network cut loses packets, but TCP resends them
once the path is back, so the peers see a stall, never a corrupted stream. One thread per direction per
connection; each waits for the proxy to be "flowing" before it passes on what it read.

With http=True the proxy reads the HTTP/1.1 requests it passes on (consul-locker never pipelines: one request,
then its answer) and can fault one request at a time, chosen by method and path:

    proxy = FaultProxy(upstream, http=True).start()
    renew = proxy.rule("reset", "PUT", "/v1/session/renew/")        # every renewal meets a reset connection
    grant = proxy.rule("hold", "PUT", "/v1/txn", times=1)             # the next txn hangs (grant.hit is set)
    grant.release()                                                   # ... until released: then reset
    proxy.rule("respond", "GET", "/v1/kv/", status=301, headers={"Location": "/v1/kv/x"})
    proxy.rule("delay", "PUT", "/v1/session/renew/", seconds=2)       # forwarded late
    proxy.rule("hold", "PUT", "/v1/session/renew/", then="forward")   # held, then forwarded when released
    proxy.rule("drop_answer", "PUT", "/v1/txn", body=b'"cas"')        # reaches Consul; the answer never returns
    proxy.requests("PUT", "/v1/session/renew/")                       # what was seen, and what became of it

cut/heal/drop work the same in both modes. `accepted` counts connections, `log` every request (http mode).
"""

import os
import select
import socket
import struct
import subprocess
import threading
import time

from lib import sectionlog
from lib.consul_agent import wait_until
from lib.probe import probe

ACTIONS = ("pass", "reset", "respond", "hold", "delay", "drop_answer")
_REASONS = {200: "OK", 301: "Moved Permanently", 404: "Not Found", 429: "Too Many Requests", 500: "Server Error"}


class Rule:
    """A fault for the requests it matches: method (None: any), path prefix (the query string excluded), and
    optionally a substring of the query string and of the body. It applies to the next `times` matching requests
    (None: to all of them); the rules are tried in the order they were added.

    actions: reset (RST, nothing forwarded); respond (answer status/headers/content ourselves, nothing
    forwarded); hold (nothing forwarded until release() or `seconds` pass or the client hangs up, then `then`:
    "reset" or "forward"); delay (forward after `seconds`); drop_answer (forward, read Consul's answer, never
    pass it on: hold as above, then reset).
    """

    def __init__(self, action, method=None, path="", query=None, body=None, times=None, seconds=None,
                 status=200, headers=None, content=b"", then="reset"):  # fmt: skip
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        self.action, self.method, self.path, self.query, self.body = action, method, path, query, body
        self.times, self.seconds, self.then = times, seconds, then
        self.status, self.headers = status, dict(headers or {})
        self.content = content.encode() if isinstance(content, str) else content
        self.hits = []  # the Request entries this rule applied to
        self.hit = threading.Event()  # set on the first of them
        self._released = threading.Event()

    def matches(self, method, path, query, body):
        if self.times is not None and len(self.hits) >= self.times:
            return False
        if self.method is not None and method != self.method:
            return False
        if not path.startswith(self.path):
            return False
        if self.query is not None and self.query not in query:
            return False
        return self.body is None or self.body in body

    def release(self):
        """End the hold of every request this rule holds (now and later)."""
        self._released.set()

    def wait_hit(self, timeout, count=1):
        """Wait until the rule has applied to `count` requests; return the last of those Request entries."""
        wait_until(lambda: len(self.hits) >= count, timeout, message=f"{count} request(s) matching {self}")
        return self.hits[count - 1]

    def __repr__(self):
        return f"Rule({self.action} {self.method or '*'} {self.path}*)"


class Request:
    """One request the proxy saw (http mode): when, what, the action taken, and Consul's answer if relayed."""

    def __init__(self, method, target, body, action):
        self.t = time.monotonic()
        self.method, self.target, self.body, self.action = method, target, body, action
        self.path, _, self.query = target.partition("?")
        self.status = None  # Consul's status (or ours, for respond), once known
        self.answered = False  # the answer reached the client
        self.t_answer = None

    def __repr__(self):
        return f"<{self.method} {self.target} {self.action} -> {self.status}{'' if self.answered else ' (unseen)'}>"


class FaultProxy:
    def __init__(self, upstream, listen=("127.0.0.1", 0), http=False):
        self.upstream = upstream
        self.http = http
        self._listener = socket.create_server(listen)
        self.port = self._listener.getsockname()[1]
        self.addr = f"http://127.0.0.1:{self.port}"
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._conns = set()  # every socket of every open connection, both sides
        self.accepted = 0
        self.rules = []
        self.log = []  # every Request (http mode)

    def start(self):
        threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True).start()
        return self

    # -- faults --------------------------------------------------------------------------------------------
    def cut(self):
        self._flowing.clear()

    def heal(self):
        self._flowing.set()

    def drop(self):
        """Reset every open connection (SO_LINGER 0 makes close() send RST)."""
        with self._lock:
            conns, self._conns = self._conns, set()
        for s in conns:
            _reset(s)

    def close(self):
        self._closed.set()
        self._flowing.set()
        for r in list(self.rules):
            r.release()
        self._listener.close()
        self.drop()

    # -- per-request faults (http mode) ----------------------------------------------------------------------
    def rule(self, action, method=None, path="", **kw):
        """Add a Rule (see its doc) and return it."""
        if not self.http:
            raise RuntimeError("per-request rules need FaultProxy(..., http=True)")
        r = Rule(action, method, path, **kw)
        with self._lock:
            self.rules.append(r)
        return r

    def remove(self, rule):
        with self._lock:
            if rule in self.rules:
                self.rules.remove(rule)
        rule.release()

    def requests(self, method=None, path=""):
        """The logged requests with this method (None: any) whose path starts with `path`."""
        return [r for r in list(self.log) if (method is None or r.method == method) and r.path.startswith(path)]

    def _match(self, method, target, body):
        path, _, query = target.partition("?")
        with self._lock:
            rule = next((r for r in self.rules if r.matches(method, path, query, body)), None)
            entry = Request(method, target, body, rule.action if rule else "pass")
            if rule is not None:
                rule.hits.append(entry)
            self.log.append(entry)
        if rule is not None:
            rule.hit.set()
        return rule, entry

    # -- plumbing ------------------------------------------------------------------------------------------
    def _wait_flowing(self):
        while not self._flowing.wait(0.05):
            if self._closed.is_set():
                return False
        return not self._closed.is_set()

    def _accept_loop(self):
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            target = self._serve_http if self.http else self._connect
            threading.Thread(target=target, args=(client,), daemon=True).start()

    def _connect(self, client):
        with self._lock:
            self._conns.add(client)
        # During a cut a new connection is accepted (the kernel does that) but goes nowhere until healed.
        if not self._wait_flowing():
            _reset(client)
            return
        try:
            server = socket.create_connection(self.upstream, timeout=5)
            server.settimeout(None)
        except OSError:
            _reset(client)
            return
        with self._lock:
            if client not in self._conns:  # dropped while we connected
                _reset(server)
                return
            self._conns.add(server)
        other = threading.Thread(target=self._pump, args=(client, server), daemon=True)
        other.start()
        self._pump(server, client)
        other.join()
        with self._lock:
            self._conns.discard(client)
            self._conns.discard(server)
        client.close()
        server.close()

    def _pump(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not self._wait_flowing():
                    break
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            # One side failed or was reset: reset the other side too, as a broken path would.
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            _reset(src)
            _reset(dst)

    # -- http mode: one thread per connection, one request and then its answer at a time -----------------------
    def _serve_http(self, client):
        with self._lock:
            self._conns.add(client)
        reader, server, upstream = _Reader(client), None, None
        graceful = False
        try:
            while True:
                try:
                    head = reader.until(b"\r\n\r\n")
                except EOFError:
                    graceful = True  # the client hung up between requests
                    return
                method, target, headers = _parse_head(head)
                body = reader.body(headers)
                rule, entry = self._match(method, target, body)
                action = rule.action if rule else "pass"
                if action == "reset":
                    return
                if action == "respond":
                    if not self._wait_flowing():
                        return
                    client.sendall(_response(rule.status, rule.headers, rule.content))
                    entry.status, entry.answered, entry.t_answer = rule.status, True, time.monotonic()
                    continue
                if action == "hold":
                    self._hold(rule, client)
                    if rule.then != "forward" or _hung_up(client) or self._closed.is_set():
                        return
                if action == "delay":
                    self._hold(rule, client)
                    if _hung_up(client) or self._closed.is_set():
                        return
                if not self._wait_flowing():
                    return
                if server is None:
                    server = socket.create_connection(self.upstream, timeout=5)
                    server.settimeout(None)
                    with self._lock:
                        if client not in self._conns:  # dropped meanwhile
                            _reset(server)
                            return
                        self._conns.add(server)
                    upstream = _Reader(server)
                server.sendall(head + body)
                status, answer, close = upstream.response(method)
                entry.status = status
                if action == "drop_answer":
                    self._hold(rule, client)
                    return
                if not self._wait_flowing() or _hung_up(client):
                    return
                client.sendall(answer)
                entry.answered, entry.t_answer = True, time.monotonic()
                if close or headers.get("connection", "").lower() == "close":
                    graceful = True
                    return
        except (OSError, EOFError, ValueError):
            return
        finally:
            with self._lock:
                self._conns.discard(client)
                if server is not None:
                    self._conns.discard(server)
            for s in (client, server):
                if s is None:
                    continue
                if graceful:
                    try:
                        s.close()
                    except OSError:
                        pass
                else:
                    _reset(s)

    def _hold(self, rule, client):
        """Wait until the rule is released, its `seconds` pass, the client hangs up or the proxy closes."""
        until = None if rule.seconds is None else time.monotonic() + rule.seconds
        while not self._closed.is_set():
            timeout = 0.05 if until is None else min(0.05, until - time.monotonic())
            if timeout <= 0 or rule._released.wait(timeout) or _hung_up(client):
                return


class _Reader:
    """Buffered reading of one socket, as much as HTTP/1.1 framing needs."""

    def __init__(self, sock):
        self.sock, self.buf = sock, bytearray()

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        self.buf += data

    def until(self, sep, limit=1 << 20):
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out = bytes(self.buf[: i + len(sep)])
                del self.buf[: i + len(sep)]
                return out
            if len(self.buf) > limit:
                raise ValueError("no end of HTTP head")
            self._fill()

    def exact(self, n):
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def rest(self):
        try:
            while True:
                self._fill()
        except EOFError:
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def body(self, headers):
        """The raw bytes of a message body framed by Content-Length or chunked encoding."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            out = bytearray()
            while True:
                line = self.until(b"\r\n")
                out += line
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while True:  # trailers, up to the empty line
                        line = self.until(b"\r\n")
                        out += line
                        if line == b"\r\n":
                            return bytes(out)
                out += self.exact(size + 2)
        return self.exact(int(headers.get("content-length", "0") or 0))

    def response(self, method):
        """Read one answer: (status, its raw bytes, whether the server closes the connection after it)."""
        head = self.until(b"\r\n\r\n")
        status_line, _, rest = head.decode("latin-1").partition("\r\n")
        status = int(status_line.split()[1])
        headers = _headers(rest)
        close = headers.get("connection", "").lower() == "close"
        if method == "HEAD" or status < 200 or status in (204, 304):
            return status, head, close
        if "transfer-encoding" in headers or "content-length" in headers:
            return status, head + self.body(headers), close
        return status, head + self.rest(), True


def _headers(text):
    headers = {}
    for line in text.split("\r\n"):
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return headers


def _parse_head(head):
    line, _, rest = head.decode("latin-1").partition("\r\n")
    method, target, _ = line.split(" ", 2)
    return method, target, _headers(rest)


def _response(status, headers, content):
    head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Fault')}\r\n"
    fields = {"Content-Length": str(len(content)), "Content-Type": "text/plain; charset=utf-8"}
    fields.update(headers)
    head += "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return head.encode("latin-1") + b"\r\n" + content


def _hung_up(sock):
    """Whether the peer closed its side (readable, and a peek reads nothing) or reset the connection."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def _reset(sock):
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


# -- tools shared by the fault tests ---------------------------------------------------------------------------


class Child:
    """The child the fault tests run under the lock, and what it logged: lib/probe.py in mode `section`, logging
    with CLOCK_MONOTONIC times (system-wide on Linux, so comparable with the test's time.monotonic()) to
    DIR/events. It stays until DIR/go exists, then exits with CODE. On SIGTERM it logs that and exits 0 at once:
    the shim must still report the lost lock with its own code, not the child's."""

    def __init__(self, directory, code=0):
        self.dir = str(directory)
        os.makedirs(self.dir, exist_ok=True)
        self.log, self.go_file = os.path.join(self.dir, "events"), os.path.join(self.dir, "go")
        until = ["--until", self.go_file, "--exit-on-term", "--code", code]
        self.argv = probe("section", self.log, "inf", "--monotonic", "--env", *until)

    def events(self):
        """[(what, monotonic time, pid, session)] in the order logged: "start", "term" (SIGTERM arrived), "end"."""
        lines = sectionlog.lines(self.log)
        # The session is on the "I" line, written with the "S" line: a start counts once both are read.
        sessions = {int(parts[2]): parts[4] for parts in lines if parts[0] == "I"}
        names = {"S": "start", "T": "term", "E": "end"}
        out = []
        for parts in lines:
            pid = int(parts[2]) if parts[0] in names else None
            if pid is None or (parts[0] == "S" and pid not in sessions):
                continue
            session = sessions.get(pid, "-")
            out.append((names[parts[0]], int(parts[1]) / 1e9, pid, "" if session == "-" else session))
        return out

    def event(self, what):
        """The first event named `what`, or None."""
        return next((e for e in self.events() if e[0] == what), None)

    def wait(self, what, timeout):
        return wait_until(lambda: self.event(what), timeout, message=f"child event {what!r} in {self.dir}")

    def go(self):
        open(self.go_file, "w").close()


class Watched:
    """A consul-locker process whose stderr lines are collected, each with the monotonic time it was read."""

    def __init__(self, argv, env):
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines = []  # [(time, line)]
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def stderr(self):
        return "\n".join(line for _, line in self.lines)

    def lines_with(self, text, after=0.0):
        return [(t, line) for t, line in list(self.lines) if text in line and t >= after]

    def wait_line(self, text, timeout, after=0.0):
        """The first stderr line containing text and read at or after `after`: (time, line)."""
        found = wait_until(lambda: self.lines_with(text, after), timeout, message=f"stderr line with {text!r}")
        return found[0]

    def wait(self, timeout):
        """Exit code; stderr is complete when this returns."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._reader.join(5)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class DeathWatch:
    """When did each watched process die? Times (monotonic) for processes that leave no "end" line, e.g. a
    critical-section child SIGKILLed after its SIGTERM was ignored. A thread polls the processes' pidfds;
    `sections(path)` makes it also watch every child that logs a start in that section log (lib/probe.py)."""

    def __init__(self):
        self.deaths = {}  # pid -> monotonic time it was seen dead (within one poll round of its death)
        self._fds = {}  # pid -> pidfd
        self._logs = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="deathwatch", daemon=True)
        self._thread.start()

    def watch(self, pid):
        with self._lock:
            if pid in self._fds or pid in self.deaths:
                return
            try:
                self._fds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                self.deaths[pid] = time.monotonic()  # already gone: no better bound than now

    def sections(self, path):
        with self._lock:
            self._logs.append(path)

    def died(self, pid):
        return self.deaths.get(pid)

    def wait(self, pid, timeout):
        return wait_until(lambda: self.deaths.get(pid), timeout, 0.01, f"process {pid} to die")

    def close(self):
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _run(self):
        offsets = {}  # log -> how far it has been read (logs only grow)
        while not self._stop.is_set():
            for path in list(self._logs):
                for pid in self._new_starts(path, offsets):
                    self.watch(pid)
            with self._lock:
                fds = dict(self._fds)
            poller = select.poll()
            for fd in fds.values():
                poller.register(fd, select.POLLIN)
            ready = {fd for fd, _ in poller.poll(5)} if fds else set()
            if not fds:
                time.sleep(0.005)
            now = time.monotonic()
            with self._lock:
                for pid, fd in fds.items():
                    if fd in ready and pid in self._fds:
                        self.deaths[pid] = now
                        os.close(self._fds.pop(pid))

    @staticmethod
    def _new_starts(path, offsets):
        """PIDs of the "S <ns> <pid>" lines (lib/probe.py, mode `section`) appended to PATH since the last call."""
        try:
            with open(path, "rb") as f:
                f.seek(offsets.get(path, 0))
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        offsets[path] = offsets.get(path, 0) + len(complete)
        return [int(line.split()[2]) for line in complete.splitlines() if line.startswith(b"S ")]
