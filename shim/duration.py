"""Go/Consul-style durations: `500ms`, `15s`, `1m30s`, `2h`, `1.5s`; a bare number means seconds."""

import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse(text):
    """Return seconds as a float; raise ValueError with a readable message on bad input."""
    s = text.strip()
    if re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", s):
        return float(s)
    pos, total = 0, 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise ValueError(f"invalid duration {text!r} (use e.g. 500ms, 15s, 1m30s, 2h)")
    return total


def format_go(seconds):
    """Format seconds for Consul's Go parser, exact to the millisecond (Consul wants a unit)."""
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def format_human(seconds):
    """A bound as people write it: 24h, 90m, 60s, 500ms."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 600 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return format_go(seconds)
