"""consul-locker's one way to write a line on stderr."""

import sys

from shim import sigpipe


def line(text):
    """Write `consul-locker: TEXT` on stderr. Never raises: a closed stderr (EPIPE from `| head`, a restarted log
    collector) must change nothing we do, least of all the supervision of a running child or the release."""
    try:
        sigpipe.call(print, f"consul-locker: {text}", file=sys.stderr, flush=True)
    except OSError:
        pass
