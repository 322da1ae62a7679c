"""A critical-section child for exclusion tests: logs its interval, optionally waits to see peers inside.

usage: cs_child.py LOG HOLD_SECONDS [WANT_PEERS] [OPTIONS]
Appends "S <ns> <pid>" and "E <ns> <pid>" to LOG. With WANT_PEERS, stays inside until that many processes are
inside at once (counted in LOG.count under flock) or HOLD_SECONDS pass, so a semaphore's limit is reached
deterministically instead of by luck.

OPTIONS (only the tests that ask for them see the extra lines; without options the log has S and E lines only):
  --monotonic         times from CLOCK_MONOTONIC (system-wide: comparable with a test's time.monotonic())
  --until FILE        leave the section when FILE exists (or HOLD_SECONDS pass)
  --ignore-term       SIGTERM does not end the section: the child lives on until SIGKILL (or its section ends);
                      each SIGTERM is logged as "T <ns> <pid>"
  --hop MS            before the section, start a leftover that forks and exits every MS milliseconds, forever:
                      each generation forks its successor and exits at once, so the leftover is never the same
                      process for long. It is a session of its own (setsid): its process group is LOG's
                      "G <pgid> <pid>" line, for killpg. Every generation logs "H <ns> <pid>" (pid: the
                      section's child) as it starts, so a leftover still alive shows up in LOG. It stops by
                      itself when LOG.stop exists.
  --hop-ignore-term   the leftover ignores SIGTERM (only SIGKILL ends it)
  --code N            exit with N
  --env               log "I <pid> <CONSUL_LOCK_INDEX> <CONSUL_LOCK_SESSION>" at the start
Every line is one write(2) with O_APPEND: lines of concurrent writers never interleave.
"""

import fcntl
import os
import signal
import sys
import time


def bump(path, delta):
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        n = int(f.read() or 0) + delta
        f.seek(0)
        f.truncate()
        f.write(str(n))
        return n


def parse(argv):
    positional, opts = [], {"monotonic": False, "until": None, "ignore_term": False, "hop": None,
                            "hop_ignore_term": False, "code": 0, "env": False}  # fmt: skip
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--monotonic", "--ignore-term", "--hop-ignore-term", "--env"):
            opts[a[2:].replace("-", "_")] = True
        elif a in ("--until", "--hop", "--code"):
            i += 1
            opts[a[2:]] = argv[i]
        else:
            positional.append(a)
        i += 1
    return positional, opts


class Log:
    def __init__(self, path, monotonic):
        self.path, self.clock = path, time.monotonic_ns if monotonic else time.time_ns

    def line(self, kind, *fields):
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (" ".join([kind, str(self.clock()), *map(str, fields)]) + "\n").encode())
        finally:
            os.close(fd)


def start_hopper(log, interval, ignore_term, owner):
    """Fork the fork-and-exit leftover (see --hop); return in the caller at once."""
    if os.fork():
        return
    try:
        os.setsid()
        signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_term else signal.SIG_DFL)
        log.line("G", os.getpgid(0), owner)
        stop = log.path + ".stop"
        while not os.path.exists(stop):
            log.line("H", owner)
            time.sleep(interval)
            if os.fork():
                os._exit(0)  # the successor goes on; this generation is gone
    finally:
        os._exit(0)


class Section:
    """What one child logged (see read())."""

    def __init__(self, pid):
        self.pid = pid
        self.start = self.end = None  # seconds
        self.terms = []  # times SIGTERM arrived (--ignore-term)
        self.hops = []  # start times of the leftover's generations (--hop)
        self.pgid = None  # the leftover's process group (--hop)
        self.index = self.session = None  # --env

    def __repr__(self):
        return f"<section {self.pid} {self.start}..{self.end}>"


def read(path):
    """Parse LOG into {pid: Section} (times in seconds, from the clock the child was told to use)."""
    sections = {}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return sections
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue  # a line being written
        kind, t = parts[0], int(parts[1]) / 1e9
        if kind == "G":
            pgid, pid = int(parts[2]), int(parts[3])
            sections.setdefault(pid, Section(pid)).pgid = pgid
            continue
        s = sections.setdefault(int(parts[2]), Section(int(parts[2])))
        if kind == "S":
            s.start = t
        elif kind == "E":
            s.end = t
        elif kind == "T":
            s.terms.append(t)
        elif kind == "H":
            s.hops.append(t)
        elif kind == "I":
            s.index, s.session = parts[3], parts[4]
    return sections


def max_inside(spans):
    """The largest number of (start, end) spans that overlap at one moment (a span ending as another starts at
    the same instant counts as overlapping)."""
    events = sorted([(s, 0) for s, _ in spans] + [(e, 1) for _, e in spans])
    level = peak = 0
    for _, kind in events:
        level += 1 if kind == 0 else -1
        peak = max(peak, level)
    return peak


def main():
    positional, opts = parse(sys.argv[1:])
    path, hold = positional[0], float(positional[1])
    want = int(positional[2]) if len(positional) > 2 else 0
    log = Log(path, opts["monotonic"])
    if opts["ignore_term"]:
        signal.signal(signal.SIGTERM, lambda signum, frame: log.line("T", os.getpid()))
    log.line("S", os.getpid())
    if opts["env"]:
        log.line("I", os.getpid(), os.environ.get("CONSUL_LOCK_INDEX", "-"), os.environ.get("CONSUL_LOCK_SESSION", "-"))
    if opts["hop"] is not None:
        start_hopper(log, float(opts["hop"]) / 1000, opts["hop_ignore_term"], os.getpid())
    if want:
        bump(path + ".count", 1)
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline:
            with open(path + ".count") as f:
                if int(f.read() or 0) >= want:
                    break
            time.sleep(0.005)
        time.sleep(0.05)  # let the last peer see the count too
        bump(path + ".count", -1)
    elif opts["until"]:
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline and not os.path.exists(opts["until"]):
            time.sleep(0.01)
    else:
        end = time.monotonic() + hold
        while time.monotonic() < end:  # a SIGTERM handler may cut a sleep short
            time.sleep(max(0.0, end - time.monotonic()))
    log.line("E", os.getpid())
    sys.exit(int(opts["code"]))


if __name__ == "__main__":
    main()
