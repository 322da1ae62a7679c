"""A fenced resource, the child that uses it under consul-locker, and the checker of its history.

The resource is what a lock protects in real life (a database, a file store) with the one defence a lock service
cannot give by itself: a fencing token. Lines, one request per line, one answer line each (OK / REFUSED):

    ENTER <token> <id>     begin a critical section with the holder's CONSUL_LOCK_INDEX
    WRITE <token> [<id>]   a write inside it
    EXIT <token> [<id>]    end it

One TCP connection is one critical section; the connection closing (the process died) ends it too, and is
recorded, so the history shows when a killed child was really gone. Rules:
  * --limit 1: a token lower than the highest accepted so far is REFUSED (the classic fencing token);
  * --limit N > 1: a section is fenced as soon as N sections with higher tokens are open at once beside it
    (entered, not ended, not fenced): with at most N holders at once, a holder that still held its slot could not
    have N later grants beside it. Its requests are REFUSED from then on, even once the newer ones have left.
    (Weaker than the lock's fence, as a stale holder is caught only once N newer ones overlapped, but all a
    resource can do for a semaphore without knowing the holder set. It assumes the newer ones are live: a stale
    holder still connected (frozen) beside a live older one would get the older one fenced instead, so a test
    freezes one semaphore holder at a time and gives no other one a long task meanwhile.) A FENCE line records
    the moment.
  * once refused, a section stays fenced: every later request of it is REFUSED.
The resource does not enforce the limit on ENTER; it records how many sections were open, and the checker judges.

History file: one line per event, flushed at once, in decision order (one thread), times from CLOCK_MONOTONIC
(comparable with the test process's time.monotonic()):

    <time> <conn> <KIND> <token> <id> <verdict> <open sections after it>

usage:
    fenced.py serve HOST PORT LIMIT HISTORY
    fenced.py child HOST:PORT NODE [MIN_WORK MAX_WORK]

The child enters with CONSUL_LOCK_INDEX, works MIN..MAX seconds (random; or the range in the file named by
$FENCED_WORK_FILE, when it exists) writing every WRITE_EVERY seconds, exits. Its id is
NODE/<consul-locker's pid>/<own pid>/<planned work>, so the test can find (and freeze) a holder from the history.
Exit codes: 0 done, 3 refused (fenced), 4 the resource could not be reached.
"""

import os
import random
import selectors
import socket
import sys
import time

WRITE_EVERY = 0.1
WORK_FILE_ENV = "FENCED_WORK_FILE"  # a file holding "MIN MAX": overrides the child's work range while it exists
REFUSED_EXIT = 3
UNREACHABLE_EXIT = 4


# -- the server ------------------------------------------------------------------------------------------------
class _Conn:
    def __init__(self, number, sock):
        self.number, self.sock = number, sock
        self.buf = b""
        self.token = None
        self.id = "-"
        self.open = False  # an accepted ENTER, not yet ended
        self.fenced = False


class Resource:
    def __init__(self, limit, history):
        self.limit = limit
        self.history = history
        self.highest = -1  # highest token accepted (limit 1)
        self.conns = {}

    def _open_sections(self):
        return [c for c in self.conns.values() if c.open]

    def _allowed(self, conn, token):
        if conn.fenced:
            return False
        if self.limit == 1:
            return token >= self.highest
        newer = [c for c in self._open_sections() if c is not conn and c.token > token]
        return len(newer) < self.limit

    def record(self, conn, kind, token, verdict):
        t = time.monotonic()
        tok = "-" if token is None else str(token)
        self.history.write(f"{t:.6f} {conn.number} {kind} {tok} {conn.id} {verdict} {len(self._open_sections())}\n")
        self.history.flush()

    def handle(self, conn, line):
        parts = line.split()
        if len(parts) < 2 or parts[0] not in ("ENTER", "WRITE", "EXIT"):
            self.record(conn, "BAD", None, "ERR")
            return "ERR"
        kind = parts[0]
        try:
            token = int(parts[1])
        except ValueError:
            self.record(conn, "BAD", None, "ERR")
            return "ERR"
        if kind == "ENTER":
            if conn.token is not None:
                self.record(conn, kind, token, "ERR")
                return "ERR"
            conn.token = token
            conn.id = parts[2] if len(parts) > 2 else f"conn{conn.number}"
        elif conn.token is None or token != conn.token:
            self.record(conn, kind, token, "ERR")
            return "ERR"
        ok = self._allowed(conn, token)
        if ok:
            if self.limit == 1:
                self.highest = max(self.highest, token)
            conn.open = kind != "EXIT"
        else:
            conn.fenced = True
            conn.open = False
        if kind == "EXIT":
            conn.open = False
        verdict = "OK" if ok else "REFUSED"
        self.record(conn, kind, token, verdict)
        if ok and kind == "ENTER" and self.limit > 1:
            self._supersede()
        return verdict if ok else f"REFUSED {self.highest}"

    def _supersede(self):
        """Fence every open section that now has `limit` newer sections open beside it: had it still held a slot,
        that would be limit+1 holders, so it lost its slot; it stays fenced even when the newer ones leave (only
        its own next request would tell, and by then it must be refused)."""
        for c in self._open_sections():
            if len([o for o in self._open_sections() if o is not c and o.token > c.token]) >= self.limit:
                c.fenced, c.open = True, False
                self.record(c, "FENCE", c.token, "-")

    def close(self, conn):
        conn.open = False
        self.record(conn, "CLOSE", conn.token, "-")
        self.conns.pop(conn.sock, None)


def serve(host, port, limit, history_path):
    listener = socket.create_server((host, port), backlog=64)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    numbers = iter(range(1, 1 << 62))
    with open(history_path, "a") as history:
        history.write(f"# listening {host}:{port} limit {limit}\n")
        history.flush()
        res = Resource(limit, history)
        while True:
            for key, _ in sel.select():
                sock = key.fileobj
                if sock is listener:
                    s, _ = listener.accept()
                    s.setblocking(False)
                    res.conns[s] = _Conn(next(numbers), s)
                    sel.register(s, selectors.EVENT_READ)
                    continue
                conn = res.conns[sock]
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(sock)
                    res.close(conn)
                    sock.close()
                    continue
                conn.buf += data
                while b"\n" in conn.buf:
                    line, conn.buf = conn.buf.split(b"\n", 1)
                    answer = res.handle(conn, line.decode(errors="replace"))
                    try:
                        sock.sendall(answer.encode() + b"\n")
                    except OSError:
                        pass  # the peer is gone; its CLOSE follows


# -- the child ---------------------------------------------------------------------------------------------------
def child(addr, node, lo=0.1, hi=1.0):
    host, port = addr.rsplit(":", 1)
    token = int(os.environ["CONSUL_LOCK_INDEX"])
    # The test can ask the next children of a node for a long task (a holder that a fault must catch inside).
    try:
        with open(os.environ[WORK_FILE_ENV]) as f:
            lo, hi = (float(x) for x in f.read().split())
    except (KeyError, OSError, ValueError):
        pass
    work = random.uniform(lo, hi)
    ident = f"{node}/{os.getppid()}/{os.getpid()}/{work:.1f}"
    try:
        sock = socket.create_connection((host, int(port)), timeout=10)
    except OSError as e:
        print(f"fenced child: cannot reach the resource at {addr}: {e}", file=sys.stderr)
        return UNREACHABLE_EXIT
    # No timeout from here on: a frozen machine resumes with its connections intact, and the point is to see
    # what the resource answers then.
    sock.settimeout(None)
    reader = sock.makefile("rb")

    def ask(line):
        sock.sendall(line.encode() + b"\n")
        answer = reader.readline().decode().strip()
        if not answer:
            raise ConnectionError("the resource closed the connection")
        return answer

    try:
        if ask(f"ENTER {token} {ident}") != "OK":
            return REFUSED_EXIT
        end = time.monotonic() + work
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(WRITE_EVERY, left))
            if ask(f"WRITE {token} {ident}") != "OK":
                return REFUSED_EXIT
        return 0 if ask(f"EXIT {token} {ident}") == "OK" else REFUSED_EXIT
    except OSError as e:
        print(f"fenced child: lost the resource: {e}", file=sys.stderr)
        return UNREACHABLE_EXIT


# -- reading and judging a history ---------------------------------------------------------------------------------
class Event:
    __slots__ = ("t", "conn", "kind", "token", "id", "verdict", "open", "line")

    def __init__(self, line):
        t, conn, kind, token, ident, verdict, open_ = line.split()
        self.t, self.conn, self.kind = float(t), int(conn), kind
        self.token = None if token == "-" else int(token)
        self.id, self.verdict, self.open, self.line = ident, verdict, int(open_), line


class History:
    """The resource's history file, re-read incrementally (the server appends whole lines)."""

    def __init__(self, path):
        self.path = path
        self.events = []
        self._offset = 0
        self._partial = ""

    def refresh(self):
        try:
            with open(self.path) as f:
                f.seek(self._offset)
                chunk = f.read()
                self._offset = f.tell()
        except FileNotFoundError:
            return self.events
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = lines.pop()
        for line in lines:
            if line and not line.startswith("#"):
                self.events.append(Event(line))
        return self.events

    def listening(self):
        try:
            with open(self.path) as f:
                return f.readline().startswith("# listening")
        except FileNotFoundError:
            return False

    def sections(self):
        return build_sections(self.refresh())

    def open_sections(self):
        """Sections entered (accepted), not ended, not fenced, newest last."""
        return [s for s in self.sections().values() if s.accepted and s.phys_end is None and not s.refused]


class Section:
    """One connection's critical section, as the resource saw it."""

    def __init__(self, conn):
        self.conn = conn
        self.id = "-"
        self.token = None
        self.start = None  # time of the accepted ENTER
        self.accepted = False
        self.last_ok = None  # time of the last accepted request
        self.phys_end = None  # EXIT (whatever the verdict) or CLOSE: the child is done with the resource
        self.refused = []  # refused events
        self.events = []

    @property
    def node(self):
        return self.id.split("/")[0]

    @property
    def pids(self):
        """(consul-locker's pid, the child's pid), from the id the child sent."""
        parts = self.id.split("/")
        return int(parts[1]), int(parts[2])

    @property
    def planned(self):
        """How long the child meant to work, from its id (0 if it did not say)."""
        parts = self.id.split("/")
        return float(parts[3]) if len(parts) > 3 else 0.0

    @property
    def finished(self):
        """The child ended its section itself, with an accepted EXIT (not killed, not fenced)."""
        return any(e.kind == "EXIT" and e.verdict == "OK" for e in self.events)

    def interval(self, paused, horizon):
        """When this section counted as inside. A section the nemesis froze together with its consul-locker (a
        paused machine) ends at its last accepted request: past that point only the fence can stop it, and the
        fence is what is judged. Any other section ends when its child is done with the resource or dead."""
        if self.id in paused:
            return self.start, self.last_ok
        return self.start, self.phys_end if self.phys_end is not None else horizon


def build_sections(events):
    sections = {}
    for e in events:
        s = sections.setdefault(e.conn, Section(e.conn))
        s.events.append(e)
        if e.kind == "ENTER" and e.verdict != "ERR":
            s.id, s.token = e.id, e.token
            if e.verdict == "OK":
                s.accepted, s.start = True, e.t
        if e.verdict == "OK":
            s.last_ok = e.t
        if e.verdict == "REFUSED":
            s.refused.append(e)
        if e.kind in ("EXIT", "CLOSE") and s.phys_end is None:
            s.phys_end = e.t
    return sections


class Verdict:
    def __init__(self):
        self.violations = []  # (what, monotonic time it happened: where to cut the history excerpt)
        self.sections = 0
        self.refused = 0
        self.refused_paused = 0
        self.max_concurrent = 0
        self.longest_gap = 0.0
        self.longest_gap_at = None  # (start, end) of that gap

    def excerpt(self, events, around, before=6, after=6):
        """History lines around a time: what a reader needs to see a violation."""
        idx = [i for i, e in enumerate(events) if e.t >= around]
        i = idx[0] if idx else len(events)
        return "\n".join(e.line for e in events[max(0, i - before) : i + after])


def check(events, limit, paused=(), horizon=None):
    """Judge a history. paused: ids of sections the nemesis froze with their consul-locker. Returns a Verdict whose
    violations list is empty when: accepted sections never overlap beyond the limit, no stale token was accepted,
    no two grants share a token, no request broke protocol."""
    v = Verdict()
    paused = set(paused)
    horizon = horizon if horizon is not None else (events[-1].t if events else 0.0)
    sections = [s for s in build_sections(events).values() if s.accepted]
    sections.sort(key=lambda s: s.start)
    v.sections = len(sections)
    for s in build_sections(events).values():
        v.refused += len(s.refused)
        if s.id in paused:
            v.refused_paused += len(s.refused)
        elif s.refused:
            # The fence saved the resource, but the lock did not: this child acted after a newer holder got in,
            # and nothing had paused it (an ENTER refused this way is not even an accepted section).
            e = s.refused[0]
            v.violations.append((f"{s.id} (not paused) sent {e.kind} with stale token {e.token}: refused", e.t))
    bad = [e for e in events if e.verdict == "ERR"]
    if bad:
        v.violations.append((f"{len(bad)} requests broke the protocol", bad[0].t))

    # Tokens: one grant, one token.
    by_token = {}
    for s in sections:
        by_token.setdefault(s.token, []).append(s)
    for token, same in by_token.items():
        if len(same) > 1:
            v.violations.append((f"token {token} used by {len(same)} sections", same[1].start))

    # Overlap beyond the limit.
    intervals = [(s, *s.interval(paused, horizon)) for s in sections]
    points = []
    for s, a, b in intervals:
        # At one instant: ends (0) before starts (1), so back-to-back sections do not overlap; the end of a
        # section that ended where it began (a child frozen right after ENTER) after its own start (2).
        points.append((a, 1, s))
        points.append((b, 2 if b == a else 0, s))
    points.sort(key=lambda p: (p[0], p[1]))
    inside, gap_from = set(), None
    for t, order, s in points:
        if order == 1:
            if not inside and gap_from is not None and t - gap_from > v.longest_gap:
                v.longest_gap, v.longest_gap_at = t - gap_from, (gap_from, t)
            inside.add(s)
            v.max_concurrent = max(v.max_concurrent, len(inside))
            if len(inside) > limit:
                ids = ", ".join(f"{x.id} token {x.token} from {x.start:.3f}" for x in sorted(inside, key=_start))
                v.violations.append((f"{len(inside)} sections inside at {t:.3f} (limit {limit}): {ids}", t))
        else:
            inside.discard(s)
            if not inside:
                gap_from = t

    # No stale token accepted, judged again from the history itself (not from the resource's decisions).
    superseded = _superseded(intervals, limit) if limit > 1 else {}
    highest = -1
    for e in events:
        if e.verdict != "OK" or e.kind not in ("ENTER", "WRITE", "EXIT"):
            continue
        if limit == 1:
            if e.token < highest:
                v.violations.append((f"stale token {e.token} accepted after {highest}", e.t))
            highest = max(highest, e.token)
        elif e.t > superseded.get(e.conn, e.t):
            v.violations.append(
                (f"stale token {e.token} accepted after {limit} newer holders were inside at once", e.t)
            )
    return v


def _superseded(intervals, limit):
    """conn -> the first moment `limit` sections with higher tokens were inside at once beside it (from then on
    it cannot hold a slot any more)."""
    found = {}
    # The order of the overlap sweep in check(): ends, then starts, then ends of sections that ended as they began.
    points = [(a, 1, s) for s, a, _ in intervals] + [(b, 2 if b == a else 0, s) for s, a, b in intervals]
    inside = set()
    for t, order, x in sorted(points, key=_key):
        if order != 1:
            inside.discard(x)
            continue
        inside.add(x)
        for s in inside:
            if s.conn not in found and s.token < x.token:
                if len([y for y in inside if y.token > s.token]) >= limit:
                    found[s.conn] = t
    return found


def _key(point):
    return point[0], point[1]


def _start(s):
    return s.start


def main(argv):
    if len(argv) >= 5 and argv[0] == "serve":
        serve(argv[1], int(argv[2]), int(argv[3]), argv[4])
        return 0
    if len(argv) >= 3 and argv[0] == "child":
        lo, hi = (float(argv[3]), float(argv[4])) if len(argv) >= 5 else (0.1, 1.0)
        return child(argv[1], argv[2], lo, hi)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
