"""Writes that cannot raise a SIGPIPE we would take for someone else's.

We catch every signal in order to forward it to the child, SIGPIPE included. But a write of our own to a closed
pipe or socket (stderr behind `| head`, a Consul connection the agent closed) makes the kernel send SIGPIPE to
the writing thread, and without care we would forward it and kill a healthy child with 141. So such writes run
with SIGPIPE blocked in their thread, and the SIGPIPE an EPIPE left pending there is consumed on the spot.
"""

import signal

_PIPE = {signal.SIGPIPE}


def call(fn, *args, **kw):
    """Call fn(*args, **kw) with SIGPIPE blocked in this thread; swallow the SIGPIPE that an EPIPE raised."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _PIPE)
    try:
        return fn(*args, **kw)
    except OSError:  # EPIPE, or a TLS error that wraps one: consume the SIGPIPE if one is pending here
        signal.sigtimedwait(_PIPE, 0)
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
