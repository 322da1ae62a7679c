"""Command line -> configuration -> run: wait for the lock, supervise the child, release, exit with its code."""

import argparse
import os
import sys
import threading
import time

from shim import __version__, consul, exitcodes, lock, supervisor
from shim.duration import format_go
from shim.duration import parse as parse_duration
from shim.exitcodes import ShimError
from shim.log import line as _log

PROG = "consul-locker"
MIN_TTL, MAX_TTL = 10.0, 86400.0  # Consul's session TTL bounds
MAX_LOCK_DELAY = 60.0  # Consul caps lock-delay at 60 s
# Without --timeout, how long Consul may stay unreachable while we wait for the lock before we give up.
DEFAULT_UNREACHABLE_FOR = 10.0
# Budgets for the last Consul calls (release, destroy): short after a stop signal, which must end us within 1 s.
CLOSE_BUDGET = 5.0
CLOSE_BUDGET_STOPPING = 0.5

BASH_FUNCTION = r"""consulLocker() {
    # consulLocker NAME CMD [ARGS]: run CMD (a command, or a function of this shell) under the lock NAME.
    local name=$1; shift
    if [ "$(type -t "$1")" = function ]; then
        consul-locker "$name" bash -c "$(declare -f)"'; "$@"' consulLocker "$@"
    else
        consul-locker "$name" "$@"
    fi
}"""

DESCRIPTION = """Run COMMAND while holding a Consul lock, so that it runs on one machine at a time.
Safe as a container's PID 1: forwards signals, reaps zombies, cleans the whole process tree."""

EPILOG = f"""exit codes:
  N      COMMAND's own exit code; 128+N when COMMAND was killed by signal N
  1      lock not obtained (--no-wait, --timeout); see --conflict-exit-code
  2      usage error
  {exitcodes.UNAVAILABLE}     Consul unreachable or failing
  {exitcodes.INTERNAL}     internal error in consul-locker
  {exitcodes.LOCK_LOST}     the lock was lost while COMMAND ran; COMMAND was terminated
  {exitcodes.KEY_CONFLICT}     the key is used in an incompatible way (lock vs semaphore, other --limit)
  {exitcodes.PERMISSION}     Consul's ACL denied a request (check the token)
  126    COMMAND not executable
  127    COMMAND not found
  128+N  signal N (TERM, INT, HUP, QUIT) ended the wait for the lock

Bash: eval "$({PROG} --bash-function)" defines consulLocker NAME CMD [ARGS], CMD may be a shell function."""


class UsageError(ShimError):
    code = exitcodes.USAGE


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def _duration(text):
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int_in(low, high, what):
    def convert(text):
        try:
            n = int(text)
        except ValueError:
            n = low - 1
        if not low <= n <= high:
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r} ({low}-{high})")
        return n

    return convert


_exit_code = _int_in(0, 255, "exit code")
_positive_int = _int_in(1, 1_000_000, "limit")


def build_parser():
    p = _Parser(
        prog=PROG,
        usage=f"{PROG} [OPTIONS] NAME [--] COMMAND [ARG...]",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", metavar="NAME", help="lock name; the key is consul-locker/NAME/.lock")
    p.add_argument("command", metavar="COMMAND", nargs=argparse.REMAINDER, help="command and arguments")
    g = p.add_argument_group("lock")
    g.add_argument("--no-wait", action="store_true", help="if the lock is held elsewhere, exit at once")
    g.add_argument("--timeout", type=_duration, metavar="DURATION", help="stop waiting after DURATION")
    g.add_argument(
        "--conflict-exit-code",
        type=_exit_code,
        default=exitcodes.CONFLICT,
        metavar="N",
        help="exit code when the lock is not obtained (default 1)",
    )
    g.add_argument(
        "--limit",
        type=_positive_int,
        default=1,
        metavar="N",
        help="semaphore: at most N holders at once (layout of `consul lock -n`)",
    )
    g.add_argument("--ttl", type=_duration, default=15.0, metavar="DURATION", help="session TTL, 10s-24h (15s)")
    g.add_argument(
        "--lock-delay",
        type=_duration,
        default=15.0,
        metavar="DURATION",
        help="Consul lock-delay after a lost session, 0s-60s (15s)",
    )
    g.add_argument("--prefix", metavar="PREFIX", help="KV prefix; the key is PREFIX/.lock (consul-locker/NAME)")
    g = p.add_argument_group("child")
    g.add_argument(
        "--kill-timeout",
        type=_duration,
        default=10.0,
        metavar="DURATION",
        help="grace between SIGTERM and SIGKILL for the child and its descendants (10s)",
    )
    g.add_argument("--shell", action="store_true", help="run COMMAND through /bin/sh -c")
    g.add_argument(
        "-g",
        "--process-group",
        action="store_true",
        help="run the child in its own process group and forward signals to the whole group",
    )
    g = p.add_argument_group("Consul connection (as the consul CLI; flags override the environment)")
    g.add_argument("--http-addr", metavar="ADDR", help="env CONSUL_HTTP_ADDR (http://127.0.0.1:8500)")
    g.add_argument("--token", metavar="TOKEN", help="ACL token; env CONSUL_HTTP_TOKEN")
    g.add_argument("--token-file", metavar="FILE", help="file holding the ACL token; env CONSUL_HTTP_TOKEN_FILE")
    g.add_argument("--datacenter", metavar="DC", help="datacenter (default: the agent's)")
    g = p.add_argument_group("other")
    g.add_argument("-v", "--verbose", action="store_true", help="log every Consul request (env DEBUG too)")
    g.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    g.add_argument(
        "--bash-function",
        action=_PrintAndExit,
        text=BASH_FUNCTION,
        help="print a Bash function consulLocker NAME CMD [ARGS] to eval",
    )
    return p


class _PrintAndExit(argparse.Action):
    def __init__(self, option_strings, dest, text, **kw):
        super().__init__(option_strings, dest, nargs=0, **kw)
        self.text = text

    def __call__(self, parser, namespace, values, option_string=None):
        print(self.text)
        parser.exit(0)


def _check_key_part(what, text):
    if not text or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise UsageError(f"{what} must be non-empty printable text, got {text!r}")
    if any(seg in ("", ".", "..") for seg in text.strip("/").split("/")):
        raise UsageError(f"{what} {text!r} has an empty, '.' or '..' path segment")


def parse_args(argv):
    args = build_parser().parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        raise UsageError("COMMAND is missing: consul-locker [OPTIONS] NAME [--] COMMAND [ARG...]")
    _check_key_part("NAME", args.name)
    if args.prefix is not None:
        _check_key_part("--prefix", args.prefix)
    if not MIN_TTL <= args.ttl <= MAX_TTL:
        raise UsageError(f"--ttl {format_go(args.ttl)} is outside Consul's range 10s-24h")
    if not 0 <= args.lock_delay <= MAX_LOCK_DELAY:
        raise UsageError(f"--lock-delay {format_go(args.lock_delay)} is outside Consul's range 0s-60s")
    if args.timeout == 0:  # "do not wait at all": one attempt, like --no-wait
        args.no_wait, args.timeout = True, None
    if args.shell:
        args.command = ["/bin/sh", "-c", " ".join(args.command)]
    args.prefix = (args.prefix if args.prefix is not None else f"consul-locker/{args.name}").strip("/")
    args.verbose = args.verbose or bool(os.environ.get("DEBUG"))
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    verbose = bool(os.environ.get("DEBUG"))
    try:
        args = parse_args(argv)
        verbose = args.verbose
        return run(args)
    except ShimError as e:
        _log(f"error: {e}")
        return e.code
    except Exception as e:  # a bug: one line, the traceback only when asked for
        if verbose:
            import traceback

            try:
                traceback.print_exc()
            except OSError:
                pass
        _log(f"internal error: {type(e).__name__}: {e}")
        return exitcodes.INTERNAL


def run(args):
    if args.kill_timeout + 1.0 >= args.lock_delay:
        _log(
            f"warning: --kill-timeout {format_go(args.kill_timeout)} is not at least 1s shorter than --lock-delay "
            f"{format_go(args.lock_delay)}: after a partition, the next holder may start before this child is "
            "killed"
        )
    events = supervisor.Events()
    supervisor.become_subreaper()
    supervisor.resolve(args.command[0], os.environ)  # 126/127 before we touch Consul
    log = _log if args.verbose else None
    client = consul.Client(
        consul.Settings.from_env(
            addr=args.http_addr, token=args.token, token_file=args.token_file, datacenter=args.datacenter
        ),
        verbose=args.verbose,
    )
    unreachable_for = args.timeout if args.timeout is not None else DEFAULT_UNREACHABLE_FOR
    locker = lock.Locker(
        client,
        lock.Options(
            prefix=args.prefix,
            limit=args.limit,
            ttl=args.ttl,
            lock_delay=args.lock_delay,
            unreachable_for=unreachable_for,
        ),
        notify=events.notify,
    )
    budget = CLOSE_BUDGET
    try:
        outcome = _wait_for_lock(args, locker, events)
        if isinstance(outcome, int):
            budget = CLOSE_BUDGET_STOPPING
            return outcome
        hold = outcome
        if log:
            log(f"lock {hold.key} held by session {hold.session}, fencing index {hold.index}")
        env = dict(
            os.environ,
            CONSUL_LOCK_HELD="true",
            CONSUL_LOCK_KEY=hold.key,
            CONSUL_LOCK_SESSION=hold.session,
            CONSUL_LOCK_INDEX=str(hold.index),
        )
        status = supervisor.Supervisor(events, args.kill_timeout, args.process_group, log).run(
            args.command, env, lost=hold.lost, started=locker.start_monitor
        )
        if hold.lost.is_set():
            _log(f"error: lock lost while the child ran ({hold.lost_reason}); the child was terminated")
            return exitcodes.LOCK_LOST
        return supervisor.exit_code(status)
    finally:
        warning = locker.close(budget)
        if warning:
            _log(f"warning: {warning}")


def _wait_for_lock(args, locker, events):
    """Acquire in a worker thread while the main thread handles signals. Returns the Hold or an exit code."""
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    stop, result = threading.Event(), {}

    def worker():
        try:
            result["hold"] = locker.acquire(stop, deadline, wait=not args.no_wait)
        except BaseException as e:  # handed to the main thread
            result["error"] = e
        events.notify()

    threading.Thread(target=worker, name="consul-locker-acquire", daemon=True).start()
    while True:
        timeout = None if deadline is None else deadline - time.monotonic()
        for sig in events.wait(timeout):
            if sig in supervisor.STOPPING:
                stop.set()
                _log(f"signal {sig} while waiting for the lock: not running the command")
                return exitcodes.SIGNAL_BASE + sig
        supervisor.reap_all()  # as PID 1 we may adopt orphans even before the child exists
        if "error" in result:
            raise result["error"]
        if "hold" in result:
            if result["hold"] is not None:
                return result["hold"]
            break
        if deadline is not None and time.monotonic() >= deadline:
            stop.set()
            break
    if locker.unreachable_since is not None and locker.last_error is not None:
        raise locker.last_error
    what = "held elsewhere" if args.timeout is None else f"not obtained within {format_go(args.timeout)}"
    _log(f"lock {args.prefix}/{lock.LOCK_KEY} {what}; not running the command")
    return args.conflict_exit_code
