"""Exit codes of consul-locker's own outcomes. The child's own code passes through unchanged.

The shim's failures use sysexits.h numbers, which are distinct from the codes that have fixed meanings for a
command runner (0, 1 conflict, 2 usage, 126, 127, 128+N) and are documented in the README.
"""

OK = 0
CONFLICT = 1  # lock not obtained (--no-wait, --timeout); --conflict-exit-code changes it
USAGE = 2  # bad command line
UNAVAILABLE = 69  # Consul unreachable or failing (EX_UNAVAILABLE)
INTERNAL = 70  # a bug in consul-locker (EX_SOFTWARE)
LOCK_LOST = 75  # the lock was lost while the child ran; the child was terminated (EX_TEMPFAIL)
KEY_CONFLICT = 76  # the key is used in an incompatible way: lock vs semaphore, other --limit (EX_PROTOCOL)
PERMISSION = 77  # Consul ACL denied a request (EX_NOPERM)
NOT_EXECUTABLE = 126
NOT_FOUND = 127
SIGNAL_BASE = 128  # 128+N: the child was killed by signal N, or signal N ended the wait for the lock


class ShimError(Exception):
    """A failure of consul-locker itself, reported as one line on stderr with a documented exit code."""

    code = INTERNAL

    def __init__(self, message, code=None):
        super().__init__(message)
        if code is not None:
            self.code = code
