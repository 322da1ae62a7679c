"""The tests' one child program: `probe(MODE, *ARGS)` is `[sys.executable, PROBE, MODE, *ARGS]`.

A test runs it as the COMMAND of consul-locker; each MODE is one behaviour a test needs of that command:

  signals LOG READY NAMES [--label L] [--grandchild READY2]
      note each signal of NAMES (comma-separated: SIGUSR1,SIGHUP) as a line "[L ]SIGNAME" in LOG, touch READY once
      the handlers are in place, then wait for signals forever. --grandchild: first start a copy of itself
      labelled "grandchild" in the same process group, which touches READY2.
  burst COUNT CODE
      COUNT times, two orphans (re-parented to the nearest reaper): one exits at once, one a moment later; then
      exit CODE without waiting for them, so the last of them die around this process's own exit.
  orphans PPIDS GO COUNT
      COUNT orphans, each of which after a moment appends the PID of its parent then (the reaper it was
      re-parented to) to PPIDS and exits; then wait until GO exists.
  tree TERMED RELEASE STARTED [--code N]
      leave a tree behind, each part in a session of its own: a `sleep 300` and a `leftover TERMED RELEASE
      STARTED`; once the leftover has started, exit N.
  leftover TERMED RELEASE STARTED
      a descendant that needs time to exit: SIGTERM makes it touch TERMED and linger until RELEASE exists, then
      exit 0. Python, not sh: while a tree is cleaned, every new process in it gets SIGTERM too (a `touch` would
      die). Touches STARTED once its handler is in place.
  daemonize TAG READY
      start a daemon (fork, setsid, fork) that runs `deaf TAG-daemon READY`; then wait forever.
  deaf TAG READY
      ignore SIGTERM, touch READY, run until killed. TAG only marks the command line, for finding it from outside.
  section LOG HOLD [WANT] [options]
      a critical section, logged to LOG (lib/sectionlog.py reads it; options below).

Every line is one write(2) with O_APPEND: lines of concurrent writers never interleave.

Section log: "S <ns> <pid>" at the start and "E <ns> <pid>" at the end (times from the wall clock, or from
CLOCK_MONOTONIC with --monotonic). With WANT, it stays inside until that many processes are inside at once
(counted in LOG.count under flock) or HOLD seconds pass, so a semaphore's limit is reached deterministically
instead of by luck; without, it stays HOLD seconds (HOLD may be "inf" with --until). Options (only the tests that
ask for them see the extra lines):
  --monotonic         times from CLOCK_MONOTONIC (system-wide: comparable with a test's time.monotonic())
  --until FILE        leave the section when FILE exists (or HOLD seconds pass)
  --ignore-term       SIGTERM does not end the section: the child lives on until SIGKILL (or its section ends);
                      each SIGTERM is logged as "T <ns> <pid>"
  --exit-on-term      SIGTERM is logged as "T <ns> <pid>", then the child exits 0 at once (no "E" line)
  --hop MS            before the section, start a leftover that forks and exits every MS milliseconds, forever:
                      each generation forks its successor and exits at once, so the leftover is never the same
                      process for long. It is a session of its own (setsid): its process group is LOG's
                      "G <pgid> <pid>" line, for killpg. Every generation logs "H <ns> <pid>" (pid: the
                      section's child) as it starts, so a leftover still alive shows up in LOG. It stops by
                      itself when LOG.stop exists.
  --hop-ignore-term   the leftover ignores SIGTERM (only SIGKILL ends it)
  --code N            exit with N
  --env               log "I <ns> <pid> <CONSUL_LOCK_INDEX> <CONSUL_LOCK_SESSION>" ("-" where unset) in the same
                      write(2) as the "S" line: no SIGTERM handler's line comes between them
"""

import os
import signal
import sys
import time

PROBE = os.path.abspath(__file__)


def probe(mode, *args):
    """The argv that runs this program in MODE with ARGS."""
    return [sys.executable, PROBE, mode, *map(str, args)]


# -- small tools ---------------------------------------------------------------------------------------------------
def _append(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _touch(path):
    open(path, "w").close()


def _wait_for(path, interval=0.02):
    while not os.path.exists(path):
        time.sleep(interval)


def _forever():
    while True:
        time.sleep(1)


def _parse(argv, flags=(), options=None):
    """ARGV as (positional arguments, {option: value}): FLAGS take no value (True when given), OPTIONS
    ({name: default}) take one."""
    options = dict(options or {})
    opts = {**dict.fromkeys(flags, False), **options}
    positional = []
    args = iter(argv)
    for a in args:
        if a in flags:
            opts[a] = True
        elif a in options:
            opts[a] = next(args)
        elif a.startswith("--"):
            sys.exit(f"probe: unknown option {a}")
        else:
            positional.append(a)
    return positional, opts


def _orphans(*then):
    """Start one process for each function of THEN, which runs it and exits, by way of a child that exits at once:
    they are re-parented to the nearest reaper (a subreaper, or PID 1 of the namespace), which must reap them."""
    pid = os.fork()
    if pid == 0:
        try:
            for fn in then:
                if os.fork() == 0:
                    try:
                        fn()
                    finally:
                        os._exit(0)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


# -- modes ---------------------------------------------------------------------------------------------------------
def signals(argv):
    (log, ready, names), opts = _parse(argv, options={"--label": "", "--grandchild": None})
    prefix = f"{opts['--label']} " if opts["--label"] else ""

    def note(signum, frame):
        _append(log, f"{prefix}{signal.Signals(signum).name}\n")

    for name in names.split(","):
        signal.signal(getattr(signal, name), note)
    if opts["--grandchild"]:
        import subprocess

        subprocess.Popen(probe("signals", log, opts["--grandchild"], names, "--label", "grandchild"))
    _touch(ready)
    while True:
        signal.pause()


def burst(argv):
    count, code = int(argv[0]), int(argv[1])
    for _ in range(count):
        _orphans(lambda: None, lambda: time.sleep(0.1))
    sys.exit(code)


def orphans(argv):
    ppids, go, count = argv[0], argv[1], int(argv[2])

    def note_parent():
        time.sleep(0.2)
        _append(ppids, f"{os.getppid()}\n")

    for _ in range(count):
        _orphans(note_parent)
    _wait_for(go)


def tree(argv):
    (termed, release, started), opts = _parse(argv, options={"--code": "0"})
    import subprocess

    # Never waited for: they are what this process leaves behind.
    subprocess.Popen(["sleep", "300"], start_new_session=True)
    subprocess.Popen(probe("leftover", termed, release, started), start_new_session=True)
    _wait_for(started)
    sys.exit(int(opts["--code"]))


def leftover(argv):
    termed, release, started = argv

    def linger(signum, frame):
        _touch(termed)
        _wait_for(release)
        sys.exit(0)

    signal.signal(signal.SIGTERM, linger)
    _touch(started)
    while True:
        signal.pause()


def daemonize(argv):
    tag, ready = argv
    if os.fork() == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, probe("deaf", f"{tag}-daemon", ready))
        finally:
            os._exit(0)
    os.wait()
    _forever()


def deaf(argv):
    _, ready = argv
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _touch(ready)
    _forever()


class _SectionLog:
    def __init__(self, path, monotonic):
        self.path, self.clock = path, time.monotonic_ns if monotonic else time.time_ns

    def text(self, kind, *fields):
        return " ".join([kind, str(self.clock()), *map(str, fields)]) + "\n"

    def line(self, kind, *fields):
        _append(self.path, self.text(kind, *fields))


def _bump(path, delta):
    import fcntl

    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        n = int(f.read() or 0) + delta
        f.seek(0)
        f.truncate()
        f.write(str(n))
        return n


def _start_hopper(log, interval, ignore_term, owner):
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


def section(argv):
    flags = ("--monotonic", "--ignore-term", "--exit-on-term", "--hop-ignore-term", "--env")
    positional, opts = _parse(argv, flags, {"--until": None, "--hop": None, "--code": "0"})
    path, hold = positional[0], float(positional[1])
    want = int(positional[2]) if len(positional) > 2 else 0
    log = _SectionLog(path, opts["--monotonic"])
    me = os.getpid()
    if opts["--exit-on-term"]:

        def term(signum, frame):
            log.line("T", me)
            os._exit(0)

        signal.signal(signal.SIGTERM, term)
    elif opts["--ignore-term"]:
        signal.signal(signal.SIGTERM, lambda signum, frame: log.line("T", me))
    start = log.text("S", me)
    if opts["--env"]:
        env = os.environ
        start += log.text("I", me, env.get("CONSUL_LOCK_INDEX", "-"), env.get("CONSUL_LOCK_SESSION", "-"))
    _append(path, start)
    if opts["--hop"] is not None:
        _start_hopper(log, float(opts["--hop"]) / 1000, opts["--hop-ignore-term"], me)
    if want:
        _bump(path + ".count", 1)
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline:
            with open(path + ".count") as f:
                if int(f.read() or 0) >= want:
                    break
            time.sleep(0.005)
        time.sleep(0.05)  # let the last peer see the count too
        _bump(path + ".count", -1)
    elif opts["--until"]:
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline and not os.path.exists(opts["--until"]):
            time.sleep(0.01)
    else:
        end = time.monotonic() + hold
        while time.monotonic() < end:  # a SIGTERM handler may cut a sleep short
            time.sleep(max(0.0, end - time.monotonic()))
    log.line("E", me)
    sys.exit(int(opts["--code"]))


MODES = {f.__name__: f for f in (signals, burst, orphans, tree, leftover, daemonize, deaf, section)}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in MODES:
        sys.exit(f"usage: probe.py MODE ARGS... (modes: {', '.join(MODES)}); see the docstring")
    MODES[sys.argv[1]](sys.argv[2:])
