#!/usr/bin/env python3
"""consul-locker side by side with `consul lock`, on one Consul dev agent started for the run.

    .venv/bin/python bench/bench.py [--quick] [--rounds N] [--signal-rounds N] [--burst N] [--skip-failover]
                                    [--with-module] [--only LIST] [--json FILE]

Both tools use the same key layout: `consul-locker NAME` holds consul-locker/NAME/.lock, and so does
`consul lock consul-locker/NAME`. Every timestamp that matters is taken by a tiny C program (bench/stamp.c,
compiled with the system C compiler at start) running as the tools' child, so the figures are the wrappers' own
and not an interpreter's start-up.

Built for a shared, noisy machine: in every round each tool runs once, in an order that rotates from round to
round, so a slow spell hits every tool alike; each figure is a median over rounds; the load average is recorded
before and after every phase and printed with the table. The start-up floor of the Python that consul-locker runs
on (`python -c "import requests, psutil"`, and `python -c pass`) is measured in the same rounds as the
uncontended runs, so consul-locker's own start-up cost is its wall time minus that floor.

The table gives each figure, the ratio consul-locker / consul lock and the project's target for it (issue 13).
These are measurements, not pass/fail tests: the exit code is 0 whenever the benchmark ran, whatever the ratios.
"""

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from lib.consul_agent import Agent, consul_binary, wait_until  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# How long a waiter is given, once it has said it waits (or, for `consul lock`, which says nothing, once its session
# exists), to reach its blocking query on the held key.
SETTLE_WAITER = 0.3
# How long a wrapper runs with its child ready before VmHWM is read (threads started, first queries answered).
SETTLE_RSS = 1.0
# How long a wrapper runs with its child ready before it is signalled (so it sits in its event loop).
SETTLE_SIGNAL = 0.1
STEP_TIMEOUT = 60.0  # any single step (a process start, a handoff) that takes longer is a failure
FAILOVER_TIMEOUT = 180.0
# What consul-locker prints once it knows the lock is held elsewhere, right before its first blocking query.
WAITING_LINE = b"waiting for "
# The floors: the interpreter consul-locker runs on, doing nothing, and importing what consul-locker depends on.
FLOORS = {
    "floor-deps": ("python -c 'import requests, psutil'", "import requests, psutil"),
    "floor-pass": ("python -c pass", "pass"),
}

FULL = {"rounds": 20, "signal_rounds": 100, "burst": 20, "burst_rounds": 3, "rss_rounds": 3, "failover_rounds": 1}
QUICK = {"rounds": 5, "signal_rounds": 10, "burst": 10, "burst_rounds": 1, "rss_rounds": 1, "failover_rounds": 1}
PHASES = ("uncontended", "handoff", "burst", "rss", "signal", "failover")


class BenchError(Exception):
    pass


# -- the tools ---------------------------------------------------------------------------------------------
class Tool:
    """How to run COMMAND under the lock NAME with one tool. `waiting_line`: what the tool prints when it starts
    to wait for a held lock (None: it prints nothing)."""

    def __init__(self, key, label, argv, failover_note, failover_bound=None, waiting_line=None):
        self.key, self.label, self._argv, self.failover_note = key, label, argv, failover_note
        self.failover_bound = failover_bound  # seconds: 2 x TTL + lock-delay of the failover options
        self.waiting_line = waiting_line

    def command(self, name, child, failover=False):
        return self._argv(name, list(child), failover)


def make_tools(args, agent_addr, consul):
    locker = shlex.split(args.locker) if args.locker else [_default_locker()]

    def locker_argv(base):
        def argv(name, child, failover):
            opts = ["--ttl", args.failover_ttl, "--lock-delay", args.failover_lock_delay] if failover else []
            return base + opts + [name] + child

        return argv

    def consul_lock_argv(name, child, failover):
        return [consul, "lock", f"-http-addr={agent_addr}", "-shell=false", f"consul-locker/{name}"] + child

    locker_note = f"--ttl {args.failover_ttl} --lock-delay {args.failover_lock_delay}"
    locker_bound = 2 * _seconds(args.failover_ttl) + _seconds(args.failover_lock_delay)
    consul_note = "session TTL 15s (api default, no flag), lock-delay 15s (Consul default, no flag)"
    tools = [
        Tool("consul-locker", "consul-locker", locker_argv(locker), locker_note, locker_bound, WAITING_LINE),
        Tool("consul-lock", "consul lock", consul_lock_argv, consul_note, 2 * 15.0 + 15.0),
    ]
    if args.with_module:
        module = locker_argv([sys.executable, "-m", "shim"])
        tools.append(Tool("module", "python -m shim", module, locker_note, locker_bound, WAITING_LINE))
    return tools


def _seconds(text):
    """The failover options are Go durations; the bench only needs plain seconds, minutes or milliseconds."""
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


def _default_locker():
    beside = os.path.join(os.path.dirname(sys.executable), "consul-locker")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("consul-locker")
    if not found:
        raise BenchError("consul-locker not found beside this Python or on PATH (pip install . ; or --locker PATH)")
    return found


def locker_python(args):
    """The interpreter consul-locker runs on: the #! line of its console script, else this Python."""
    first = shlex.split(args.locker)[0] if args.locker else _default_locker()
    try:
        with open(first, "rb") as f:
            line = f.readline(4096)
    except OSError:
        return sys.executable
    if line.startswith(b"#!"):
        words = line[2:].decode(errors="replace").split()
        if words and os.path.basename(words[0]).startswith("python"):
            return words[0]
    return sys.executable


# -- process helpers ---------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, agent, workdir, stamp):
        self.args, self.agent, self.workdir, self.stamp = args, agent, workdir, stamp
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_") and k != "DEBUG"}
        self.env["CONSUL_HTTP_ADDR"] = agent.addr
        if args.bytecode_cache and self.env.pop("PYTHONDONTWRITEBYTECODE", None):
            # An installed package has its .pyc files (pip compiles them); without a cache every run would compile
            # shim/*.py again. The cache lives in the bench's own directory, the project tree is not touched.
            self.env["PYTHONPYCACHEPREFIX"] = os.path.join(workdir, "pycache")
        self.live = []
        self._n = 0

    def path(self, what):
        self._n += 1
        return os.path.join(self.workdir, f"{self._n:05d}-{what}")

    def fifo(self):
        p = self.path("fifo")
        os.mkfifo(p)
        return p

    def log_path(self, tool):
        return os.path.join(self.workdir, f"{tool.key}.log")

    def start(self, argv, tool):
        """Start a wrapper in its own process group (so cleanup can kill whatever it leaves), stdin closed."""
        log = open(self.log_path(tool), "ab")
        try:
            p = subprocess.Popen(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        finally:
            log.close()
        p.bench_tool = tool
        self.live.append(p)
        return p

    def finish(self, p, timeout=STEP_TIMEOUT):
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(
                f"{p.bench_tool.label} did not exit within {timeout}s: {p.args}\n{self.log_tail(p)}"
            ) from None
        if p in self.live:
            self.live.remove(p)
        return p.returncode

    def log_tail(self, p, n=15):
        try:
            with open(self.log_path(p.bench_tool), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def log_count(self, tool, text):
        try:
            with open(self.log_path(tool), "rb") as f:
                return f.read().count(text)
        except OSError:
            return 0

    def kill_all(self):
        for p in self.live:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.live = []

    def _alive(self, procs, what):
        for p in procs:
            if p.poll() is not None:
                raise BenchError(f"{p.bench_tool.label} exited ({p.returncode}) before {what}\n{self.log_tail(p)}")

    def wait_file(self, path, what, procs, timeout=STEP_TIMEOUT):
        def ready():
            self._alive(procs, what)
            return os.path.exists(path)

        wait_until(ready, timeout, 0.002, what)

    def wait_sessions(self, name, count, procs, timeout=STEP_TIMEOUT):
        """Wait until `count` sessions for consul-locker/NAME exist (both tools name sessions after the prefix)."""
        marker = f"consul-locker/{name}"

        def ready():
            self._alive(procs, f"{count} session(s) existed")
            return len([s for s in self.agent.sessions() if marker in s.get("Name", "")]) >= count

        wait_until(ready, timeout, 0.01, f"{count} session(s) for {marker}")

    def wait_waiting(self, tool, seen_before, procs, timeout=STEP_TIMEOUT):
        """For a tool that says when it starts to wait: until it has said so once more than `seen_before`."""
        if tool.waiting_line is None:
            return

        def ready():
            self._alive(procs, "the waiter said it waits")
            return self.log_count(tool, tool.waiting_line) > seen_before

        wait_until(ready, timeout, 0.005, f"{tool.label}'s waiting line")

    def release(self, fifo):
        """Let a `hold` child finish: opening its FIFO for writing unblocks it."""
        fd = os.open(fifo, os.O_WRONLY)
        os.close(fd)

    def _waiter_ready(self, tool, name, holder, waiter, seen_before):
        self.wait_sessions(name, 2, [holder, waiter])
        self.wait_waiting(tool, seen_before, [holder, waiter])
        time.sleep(SETTLE_WAITER)

    # -- measurements ----------------------------------------------------------------------------------
    def handoff(self, tool, i):
        """Holder's child ends -> waiter's child starts, in ms."""
        name = f"bench-handoff-{tool.key}-{i:04d}"
        ready, fifo, end, start = self.path("ready"), self.fifo(), self.path("end"), self.path("start")
        holder = self.start(tool.command(name, [self.stamp, "hold", ready, fifo, end]), tool)
        self.wait_file(ready, "the holder's child is running", [holder])
        seen = self.log_count(tool, tool.waiting_line) if tool.waiting_line else 0
        waiter = self.start(tool.command(name, [self.stamp, "stamp", start]), tool)
        self._waiter_ready(tool, name, holder, waiter, seen)
        self.release(fifo)
        self.finish(holder)
        self.finish(waiter)
        return (_read_ns(start, waiter) - _read_ns(end, holder)) / 1e6

    def burst(self, tool, i, n):
        """n contenders started at once, each runs `true` under the lock: (seconds until the last has exited, CPU
        seconds of all contenders, CPU seconds of the Consul agent meanwhile). The CPU figures say where the time
        goes: n interpreters starting on 2 cores, or the contenders' requests and Consul's answers."""
        name = f"bench-burst-{tool.key}-{i:04d}"
        cpu0, agent0 = _children_cpu(), self.agent_cpu()
        t0 = time.perf_counter()
        procs = [self.start(tool.command(name, ["true"]), tool) for _ in range(n)]
        codes = [self.finish(p, STEP_TIMEOUT + 10 * n) for p in procs]
        wall = time.perf_counter() - t0
        if any(codes):
            raise BenchError(f"{tool.label} burst: exit codes {codes}\n{self.log_tail(procs[0])}")
        return wall, _children_cpu() - cpu0, self.agent_cpu() - agent0

    def agent_cpu(self):
        """CPU seconds the Consul agent has used so far."""
        with open(f"/proc/{self.agent.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _timed(self, argv, tool):
        """Run argv to its end: (wall ms, CPU ms of it and its children, from wait4's rusage)."""
        t0 = time.perf_counter()
        p = self.start(argv, tool)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        self.live.remove(p)
        if p.returncode != 0:
            raise BenchError(f"{tool.label}: {argv} exited {p.returncode}\n{self.log_tail(p)}")
        return wall * 1e3, (usage.ru_utime + usage.ru_stime) * 1e3

    def uncontended(self, tool, i):
        """`true` under a free lock: (wall ms, CPU ms of the wrapper and its child)."""
        return self._timed(tool.command(f"bench-uncontended-{tool.key}-{i:04d}", ["true"]), tool)

    def floor(self, floor_tool):
        """The interpreter's own start-up: (wall ms, CPU ms)."""
        return self._timed(floor_tool.command("", []), floor_tool)

    def peak_rss(self, tool, i):
        """VmHWM of the wrapper process (MiB) while its child waits."""
        name = f"bench-rss-{tool.key}-{i:04d}"
        ready, fifo, end = self.path("ready"), self.fifo(), self.path("end")
        p = self.start(tool.command(name, [self.stamp, "hold", ready, fifo, end]), tool)
        self.wait_file(ready, "the child is running", [p])
        time.sleep(SETTLE_RSS)
        with open(f"/proc/{p.pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        self.release(fifo)
        self.finish(p)
        return int(status["VmHWM"].split()[0]) / 1024

    def signal_latency(self, tool, i):
        """SIGTERM to the wrapper -> the child's TERM handler runs, in ms."""
        name = f"bench-signal-{tool.key}-{i:04d}"
        ready, out = self.path("ready"), self.path("term")
        p = self.start(tool.command(name, [self.stamp, "term", ready, out]), tool)
        self.wait_file(ready, "the child's handler is installed", [p])
        time.sleep(SETTLE_SIGNAL)
        sent = time.time_ns()
        os.kill(p.pid, signal.SIGTERM)
        self.finish(p)
        return (_read_ns(out, p) - sent) / 1e6

    def failover(self, tool, i):
        """The holder (wrapper) is SIGKILLed -> the waiter's child starts, in seconds."""
        name = f"bench-failover-{tool.key}-{i:04d}"
        ready, fifo, end, start = self.path("ready"), self.fifo(), self.path("end"), self.path("start")
        holder = self.start(tool.command(name, [self.stamp, "hold", ready, fifo, end], failover=True), tool)
        self.wait_file(ready, "the holder's child is running", [holder])
        seen = self.log_count(tool, tool.waiting_line) if tool.waiting_line else 0
        waiter = self.start(tool.command(name, [self.stamp, "stamp", start], failover=True), tool)
        self._waiter_ready(tool, name, holder, waiter, seen)
        killed = time.time_ns()
        os.kill(holder.pid, signal.SIGKILL)
        self.finish(waiter, FAILOVER_TIMEOUT)
        try:
            os.killpg(holder.pid, signal.SIGKILL)  # `consul lock` leaves its child running; ours died with us
        except ProcessLookupError:
            pass
        self.finish(holder)
        return (_read_ns(start, waiter) - killed) / 1e9


def _children_cpu():
    """CPU seconds of every child this process has waited for (the contenders of a burst, once reaped)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _read_ns(path, proc):
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        text = ""
    if not text.endswith("\n"):
        raise BenchError(f"{proc.bench_tool.label}: the child wrote no timestamp to {path} (exit {proc.returncode})")
    return int(text)


def rotated(items, i):
    """items, starting at position i (mod len): who goes first changes from round to round."""
    k = i % len(items)
    return items[k:] + items[:k]


# -- statistics and report ---------------------------------------------------------------------------------
def median(xs):
    return statistics.median(xs) if xs else None


def p90(xs):
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=10, method="inclusive")[8]


# (metric key, row label, unit, summary function, target). Targets (issue 13): ("ratio", x) is consul-locker /
# consul lock <= x; "startup" is consul-locker's wall minus the floor, over consul lock's whole wall; "bound" is
# each tool's 2 x TTL + lock-delay; "floor" rows show the interpreter's figure in consul-locker's column.
ROWS = [
    ("handoff", "handoff, median", "ms", median, ("ratio", 1.2)),
    ("handoff", "handoff, p90", "ms", p90, None),
    ("signal", "SIGTERM -> child handler, median", "ms", median, ("ratio", 1.0)),
    ("signal", "SIGTERM -> child handler, p90", "ms", p90, None),
    ("burst", "burst of {burst} `true`, total", "s", median, ("ratio", 0.7)),
    ("burst_cpu", "burst: CPU of all contenders", "s", median, None),
    ("burst_agent_cpu", "burst: CPU of the Consul agent", "s", median, None),
    ("rss", "peak RSS while child sleeps", "MiB", median, ("ratio", 0.75)),
    ("uncontended_wall", "uncontended `true`, wall", "ms", median, None),
    ("uncontended_wall", "uncontended wall minus floor", "ms", median, ("startup", 2.0)),
    ("floor-deps", "floor: python -c 'import requests, psutil'", "ms", median, "floor"),
    ("floor-pass", "floor: python -c pass", "ms", median, "floor"),
    ("uncontended_cpu", "uncontended `true`, CPU", "ms", median, None),
    ("failover", "failover after SIGKILL", "s", median, "bound"),
]


def summarize(results, tools, args):
    rows = []
    for key, label, unit, fn, target in ROWS:
        if key not in results:
            continue
        values = {t.key: fn(results[key].get(t.key, [])) for t in tools}
        row = {"metric": key, "label": label.format(burst=args.burst), "unit": unit, "values": values}
        ours, theirs = values.get("consul-locker"), values.get("consul-lock")
        kind, limit = target if isinstance(target, tuple) else (target, None)
        if kind == "floor":
            row["values"] = {t.key: None for t in tools}
            row["values"]["consul-locker"] = fn(results[key].get("python", []))
            ours = theirs = None
        if kind == "startup":
            row["metric"] = "startup_over_floor"
            floor = median(results.get("floor-deps", {}).get("python", []))
            for t in tools:
                if t.key != "consul-lock" and values[t.key] is not None and floor is not None:
                    row["values"][t.key] = values[t.key] - floor
            ours = row["values"].get("consul-locker")
        ratio = ours / theirs if ours is not None and theirs else None
        row.update(ratio=ratio, target=limit, met=None, target_text="-")
        if kind in ("ratio", "startup") and ratio is not None:
            row["met"] = ratio <= limit
            what = "x consul lock's whole wall" if kind == "startup" else "x"
            row["target_text"] = f"<= {limit:g}{what} " + ("ok" if row["met"] else "MISSED")
        elif kind == "bound" and ours is not None:
            tool = next(t for t in tools if t.key == "consul-locker")
            row["target"] = tool.failover_bound
            row["met"] = ours <= tool.failover_bound
            row["target_text"] = f"<= {tool.failover_bound:g}s (2 x TTL + lock-delay) " + (
                "ok" if row["met"] else "MISSED"
            )
        rows.append(row)
    return rows


def _fmt(value, unit):
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value:.2f}" if value < 10 else f"{value:.1f}"
    if unit == "s":
        return f"{value:.2f}"
    return f"{value:.1f}"


def render(rows, tools):
    head = ["figure", "unit"] + [t.label for t in tools] + ["ratio", "target"]
    body = []
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        body.append([r["label"], r["unit"]] + [_fmt(r["values"][t.key], r["unit"]) for t in tools] + [ratio])
        body[-1].append(r["target_text"])
    widths = [max(len(str(row[i])) for row in [head] + body) for i in range(len(head))]

    def line(cells):
        out = []
        for i, c in enumerate(cells):
            out.append(c.ljust(widths[i]) if i < 2 or i == len(cells) - 1 else c.rjust(widths[i]))
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(b) for b in body])


def machine_info(consul):
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    consul_version = subprocess.run([consul, "version"], stdout=subprocess.PIPE, text=True).stdout.splitlines()[0]
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "consul": consul_version,
    }


def compile_stamp(workdir):
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise BenchError("a C compiler (gcc or cc) is needed to build the benchmark's child, bench/stamp.c")
    out = os.path.join(workdir, "stamp")
    subprocess.run([cc, "-O2", "-Wall", "-o", out, os.path.join(HERE, "stamp.c")], check=True)
    return out


def load():
    return os.getloadavg()[0]


# -- main --------------------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"fewer rounds: {QUICK}")
    p.add_argument("--rounds", type=int, help="handoff and uncontended rounds (20; quick 5)")
    p.add_argument("--signal-rounds", type=int, help="signal latency rounds (100; quick 10)")
    p.add_argument("--burst", type=int, help="contenders in the burst (20; quick 10)")
    p.add_argument("--burst-rounds", type=int, help="bursts per tool (3; quick 1)")
    p.add_argument("--rss-rounds", type=int, help="peak RSS samples per tool (3; quick 1)")
    p.add_argument("--failover-rounds", type=int, help="failover rounds per tool (1)")
    p.add_argument("--skip-failover", action="store_true", help="skip failover (it takes ~1 min per round)")
    p.add_argument("--failover-ttl", default="10s", help="consul-locker --ttl for failover (10s)")
    p.add_argument("--failover-lock-delay", default="15s", help="consul-locker --lock-delay for failover (15s)")
    p.add_argument(
        "--locker",
        help="consul-locker command to measure, split like a shell would (default: the console script beside python)",
    )
    p.add_argument("--with-module", action="store_true", help="also measure `python -m shim` (a third column)")
    p.add_argument(
        "--no-bytecode-cache",
        dest="bytecode_cache",
        action="store_false",
        help="keep PYTHONDONTWRITEBYTECODE if set (by default the bench gives Python a .pyc cache, as an install has)",
    )
    p.add_argument("--only", help=f"comma-separated subset: {','.join(PHASES)}")
    p.add_argument("--json", metavar="FILE", help="also write every sample and the table to FILE")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in defaults:
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be at least 1")
    if args.only and not set(args.only.split(",")) <= set(PHASES):
        p.error(f"--only takes a subset of {','.join(PHASES)}")
    return args


def run(args, out=sys.stdout):
    consul = consul_binary()
    workdir = tempfile.mkdtemp(prefix="consul-locker-bench-")
    agent = Agent("bench", log_dir=workdir)
    bench, ok = None, False
    loads = {"start": load()}
    try:
        stamp = compile_stamp(workdir)
        agent.start()
        bench = Bench(args, agent, workdir, stamp)
        tools = make_tools(args, agent.addr, consul)
        python = locker_python(args)
        floors = [Tool(key, label, lambda name, child, failover, c=code: [python, "-c", c], "")
                  for key, (label, code) in FLOORS.items()]  # fmt: skip
        only = set(args.only.split(",")) if args.only else None
        results = {}

        def want(phase):
            return (only is None or phase in only) and not (phase == "failover" and args.skip_failover)

        def record(metric, tool, value):
            results.setdefault(metric, {}).setdefault(tool.key, []).append(value)

        def progress(text):
            print(text, file=sys.stderr, flush=True)

        # Warm-up (not recorded): fills the .pyc cache and the page cache for every tool and the floors.
        for i in range(1 if args.quick else 2):
            for t in tools:
                bench.uncontended(t, 1000 + i)
            for f in floors:
                bench.floor(f)

        def phase(name, text, rounds, one_round):
            if not want(name):
                return
            progress(f"{text} (load average {load():.2f})")
            before = load()
            for i in range(rounds):
                one_round(i)
            loads[name] = (before, load())

        def uncontended_round(i):
            for t in rotated(tools + floors, i):
                if t in floors:
                    wall, _ = bench.floor(t)
                    results.setdefault(t.key, {}).setdefault("python", []).append(wall)
                else:
                    wall, cpu = bench.uncontended(t, i)
                    record("uncontended_wall", t, wall)
                    record("uncontended_cpu", t, cpu)

        def each_tool(metric, measure):
            def one_round(i):
                for t in rotated(tools, i):
                    record(metric, t, measure(t, i))

            return one_round

        phase("uncontended", f"uncontended `true` and floors: {args.rounds} rounds", args.rounds, uncontended_round)
        phase("handoff", f"handoff: {args.rounds} rounds", args.rounds, each_tool("handoff", bench.handoff))

        def burst_round(i):
            for t in rotated(tools, i):
                wall, cpu, agent_cpu = bench.burst(t, i, args.burst)
                record("burst", t, wall)
                record("burst_cpu", t, cpu)
                record("burst_agent_cpu", t, agent_cpu)

        phase("burst", f"burst: {args.burst} contenders, {args.burst_rounds} round(s)", args.burst_rounds, burst_round)
        phase("rss", f"peak RSS: {args.rss_rounds} round(s)", args.rss_rounds, each_tool("rss", bench.peak_rss))
        phase(
            "signal", f"signal latency: {args.signal_rounds} rounds", args.signal_rounds,
            each_tool("signal", bench.signal_latency),
        )  # fmt: skip
        phase(
            "failover",
            f"failover: {args.failover_rounds} round(s) (tens of seconds each)",
            args.failover_rounds,
            each_tool("failover", bench.failover),
        )
        loads["end"] = load()

        rows = summarize(results, tools, args)
        info = machine_info(consul)
        table = render(rows, tools)
        counts = {
            "uncontended": f"uncontended and floors {args.rounds}",
            "handoff": f"handoff {args.rounds}",
            "burst": f"burst {args.burst_rounds} x {args.burst} contenders",
            "rss": f"RSS {args.rss_rounds}",
            "signal": f"signal {args.signal_rounds}",
            "failover": f"failover {args.failover_rounds}",
        }
        notes = [
            f"machine: {info['nproc']} CPUs, {info['cpu']}, Linux {info['kernel']}, Python {info['python']}, "
            f"{info['consul']} (dev agent on loopback; `consul lock` is the same binary)",
            "rounds (each tool once per round, the order rotating from round to round; figures are medians): "
            + ", ".join(text for name, text in counts.items() if name in loads),
            "load average (1 min) at start {:.2f}, at end {:.2f}; by phase: {}".format(
                loads["start"],
                loads["end"],
                ", ".join(f"{name} {loads[name][0]:.1f}->{loads[name][1]:.1f}" for name in PHASES if name in loads)
                or "-",
            ),
            f"floors: {python}, same environment as consul-locker, in the uncontended rounds",
            "Python tools ran with "
            + (
                "a .pyc cache (PYTHONPYCACHEPREFIX in the bench's directory), as an installed package has"
                if "PYTHONPYCACHEPREFIX" in bench.env and args.bytecode_cache
                else "the environment's bytecode settings"
            ),
        ]
        if "failover" in results:
            for t in tools:
                notes.append(f"failover {t.label}: {t.failover_note}")
        print(table, file=out)
        for n in notes:
            print(n, file=out)
        if args.json:
            doc = {
                "machine": info,
                "config": {k: v for k, v in vars(args).items() if k != "json"},
                "tools": {t.key: {"label": t.label, "example": t.command("NAME", ["true"])} for t in tools},
                "floors": {f.key: f.command("", []) for f in floors},
                "failover": {t.key: t.failover_note for t in tools} if "failover" in results else None,
                "load": loads,
                "samples": results,
                "rows": rows,
                "table": table,
                "notes": notes,
            }
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=2)
        ok = True
        return 0
    finally:
        if bench is not None:
            bench.kill_all()
        agent.cleanup()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"bench: logs kept in {workdir}", file=sys.stderr)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
