"""consul-locker's outcomes: its exit codes and the exceptions that carry them, in one place.

The child's own exit code passes through unchanged. consul-locker's own failures use sysexits.h numbers, which
are distinct from the codes that have fixed meanings for a command runner (0, 1 conflict, 2 usage, 126, 127,
128+N) and from each other, so a script or an orchestrator can tell them apart. README "Exit codes" lists them.
"""

OK = 0
CONFLICT = 1  # lock not obtained (--no-wait, --timeout); --conflict-exit-code changes it
USAGE = 2  # bad command line or bad input (names, durations, token, address): nothing was sent to Consul
UNAVAILABLE = 69  # Consul unreachable, or an answer we cannot trust (EX_UNAVAILABLE)
INTERNAL = 70  # a bug in consul-locker (EX_SOFTWARE)
OS_ERROR = 71  # the operating system refused what was asked: e.g. --pid-namespace cannot be made (EX_OSERR)
LOCK_LOST = 75  # the lock was lost while the child ran; the child's tree was terminated (EX_TEMPFAIL)
KEY_CONFLICT = 76  # the key is used in an incompatible way: lock vs semaphore, other --limit (EX_PROTOCOL)
PERMISSION = 77  # Consul's ACL denied a request (EX_NOPERM)
TIMED_OUT = 124  # --max-runtime passed; the child's tree was terminated (as timeout(1))
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


class UsageError(ShimError):
    """Bad input from the user (command line, environment, token file): exit 2, nothing sent to Consul."""

    code = USAGE


class SpawnError(ShimError):
    """COMMAND cannot be run: 127 not found, 126 found but not executable."""

    code = NOT_EXECUTABLE


class NamespaceError(ShimError):
    """--pid-namespace was asked for and the kernel (or our privileges) refused it."""

    code = OS_ERROR


class KeyConflict(ShimError):
    """The KV prefix holds something else: a lock where a semaphore was asked for, another limit, bad JSON."""

    code = KEY_CONFLICT


class ConsulError(ShimError):
    """Consul did not give a usable answer. `transient` ones are worth retrying until the caller's deadline."""

    code = UNAVAILABLE
    transient = False


class Unreachable(ConsulError):
    """No HTTP answer at all: refused, reset, timed out, DNS, TLS handshake failure that may pass."""

    transient = True


class HTTPError(ConsulError):
    """Consul answered with a status we did not expect. 5xx and 429 are transient (leader election, overload);
    any other (a redirect, 400, 405...) is final: it means a bug or a misconfiguration, never "free"."""

    def __init__(self, message, status, body=""):
        super().__init__(message)
        self.status = status
        self.body = body
        self.transient = status >= 500 or status == 429


class PermissionDenied(HTTPError):
    code = PERMISSION


class BadAnswer(ConsulError):
    """An answer that is not what Consul sends (malformed JSON, a missing field). Transient: a proxy or a
    half-written response, not something to act on; retried like a dropped connection."""

    transient = True
