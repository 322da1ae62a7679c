"""Reading the log of critical-section children (lib/probe.py, mode `section`, which documents the lines).

sections = sectionlog.read(path)       # {pid: Section}
every = sectionlog.read_all(path)      # [Section] in start order, a PID used twice counted twice
sectionlog.max_inside([(s.start, s.end) for s in every])
"""


class Section:
    """What one child logged (see read())."""

    def __init__(self, pid):
        self.pid = pid
        self.start = self.end = None  # seconds
        self.terms = []  # times SIGTERM arrived (--ignore-term, --exit-on-term)
        self.hops = []  # start times of the leftover's generations (--hop)
        self.pgid = None  # the leftover's process group (--hop)
        self.index = self.session = None  # --env

    def __repr__(self):
        return f"<section {self.pid} {self.start}..{self.end}>"


def lines(path):
    """The complete lines of LOG, split into fields ([] if there is no log yet). A last line without its newline
    is still being written: left for the next read."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    return [line.split() for line in text[: text.rfind("\n") + 1].splitlines()]


def read_all(path):
    """Parse LOG into [Section] in the order they started (times in seconds, from the clock the child was told to
    use). Every "S" line is a section of its own, even where a PID was used again; later lines of that PID belong
    to its latest section."""
    every, latest = [], {}

    def of(pid):
        if pid not in latest:  # a line of a section whose start is not in this log
            latest[pid] = Section(pid)
            every.append(latest[pid])
        return latest[pid]

    for parts in lines(path):
        kind, t = parts[0], int(parts[1]) / 1e9
        if kind == "G":
            of(int(parts[3])).pgid = int(parts[2])
            continue
        pid = int(parts[2])
        if kind == "S":
            latest[pid] = Section(pid)
            latest[pid].start = t
            every.append(latest[pid])
            continue
        s = of(pid)
        if kind == "E":
            s.end = t
        elif kind == "T":
            s.terms.append(t)
        elif kind == "H":
            s.hops.append(t)
        elif kind == "I":
            s.index, s.session = parts[3], parts[4]
    return every


def read(path):
    """Parse LOG into {pid: Section} (for a PID used twice: its latest section)."""
    return {s.pid: s for s in read_all(path)}


def max_inside(spans):
    """The largest number of (start, end) spans that overlap at one moment (a span ending as another starts at
    the same instant counts as overlapping)."""
    events = sorted([(s, 0) for s, _ in spans] + [(e, 1) for _, e in spans])
    level = peak = 0
    for _, kind in events:
        level += 1 if kind == 0 else -1
        peak = max(peak, level)
    return peak
