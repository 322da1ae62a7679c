"""consul-locker's one way to write on stderr: `consul-locker: TEXT`, one line each.

say: errors and warnings, always. info: what a user may want to know (the waiting line, "already done"),
silenced by -q. debug: every Consul request and what the supervisor does, with -v or DEBUG.
"""

import sys

_quiet = False
_verbose = False


def configure(quiet=False, verbose=False):
    global _quiet, _verbose
    _quiet, _verbose = quiet, verbose


def quiet():
    return _quiet


def verbose():
    return _verbose


def say(text):
    """Never raises: a closed stderr (EPIPE from `| head`, a restarted log collector) must change nothing we do,
    least of all the supervision of a running child or the release. (The SIGPIPE such a write raises is ours:
    the supervisor never forwards a signal its own process sent.)"""
    try:
        print(f"consul-locker: {text}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def info(text):
    if not _quiet:
        say(text)


def debug(text):
    if _verbose:
        say(text)
