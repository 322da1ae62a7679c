"""consul-locker: run a command on one machine at a time under a Consul lock, as a correct PID 1.

Importing this package has no side effects; the command-line entry point is :mod:`shim.entry`.
Library use::

    from shim import held, NotAcquired
    with held("consul-locker/report") as hold:   # a Hold: .key, .session, .index (fencing token), .lost
        ...

Errors are :class:`ShimError` subclasses whose ``code`` is the command line's exit code (shim.errors).
"""

__version__ = "0.2.0"

from shim.errors import ConsulError, KeyConflict, PermissionDenied, ShimError, UsageError  # noqa: E402
from shim.lock import Hold, NotAcquired, Options, held, status  # noqa: E402

__all__ = [
    "ConsulError",
    "Hold",
    "KeyConflict",
    "NotAcquired",
    "Options",
    "PermissionDenied",
    "ShimError",
    "UsageError",
    "held",
    "status",
]
