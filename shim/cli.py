"""Command line -> options -> the life: parse and validate everything first (bad input never reaches Consul),
then wire the Consul client, the lock and the child together and hand them to the supervisor's loop."""

import argparse
import gc
import json
import os
import sys
import time

from shim import __version__, consul, errors, lock, log, supervisor
from shim.duration import format_go, format_human
from shim.duration import parse as parse_duration
from shim.errors import ShimError, UsageError

PROG = "consul-locker"
# The longest duration any option takes besides --ttl and --lock-delay (which Consul bounds): one year.
MAX_DURATION = 8760 * 3600.0

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
Safe as a container's PID 1: forwards signals, reaps zombies, cleans the whole process tree.
consul-locker --status [--json] NAME reports the lock without taking it."""

EPILOG = f"""exit codes:
  N      COMMAND's own exit code; 128+N when COMMAND was killed by signal N
  1      lock not obtained (--no-wait, --timeout); see --conflict-exit-code
  2      usage error (nothing was sent to Consul)
  {errors.UNAVAILABLE}     Consul unreachable, or an answer it should not give
  {errors.INTERNAL}     internal error in consul-locker
  {errors.OS_ERROR}     --pid-namespace: the PID namespace cannot be made
  {errors.LOCK_LOST}     the lock was lost while COMMAND ran; COMMAND was terminated
  {errors.KEY_CONFLICT}     the key is used in an incompatible way (lock vs semaphore, other --limit)
  {errors.PERMISSION}     Consul's ACL denied a request (check the token)
  {errors.TIMED_OUT}    --max-runtime reached; COMMAND was terminated
  126    COMMAND not executable
  127    COMMAND not found
  128+N  signal N (TERM, INT, HUP, QUIT) ended the wait for the lock
--status: 0 held, 1 free, {errors.UNAVAILABLE}, {errors.KEY_CONFLICT}, {errors.PERMISSION} as above.

Bash: eval "$({PROG} --bash-function)" defines consulLocker NAME CMD [ARGS], CMD may be a shell function."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def _duration(low=0.0, high=MAX_DURATION):
    def convert(text):
        try:
            seconds = parse_duration(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if not low <= seconds <= high:
            top = "8760h (one year)" if high == MAX_DURATION else format_human(high)
            raise argparse.ArgumentTypeError(f"{text!r} is outside {format_human(low)}-{top}")
        return seconds

    return convert


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


def build_parser():
    p = _Parser(
        prog=PROG,
        usage=f"{PROG} [OPTIONS] NAME [--] COMMAND [ARG...]\n       {PROG} --status [--json] [OPTIONS] NAME",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", metavar="NAME", help="lock name; the key is consul-locker/NAME/.lock")
    p.add_argument("command", metavar="COMMAND", nargs=argparse.REMAINDER, help="command and arguments")
    g = p.add_argument_group("lock")
    g.add_argument("--no-wait", action="store_true", help="if the lock is held elsewhere, exit at once")
    g.add_argument("--timeout", type=_duration(), metavar="DURATION", help="stop waiting after DURATION")
    g.add_argument("--conflict-exit-code", type=_exit_code, default=errors.CONFLICT, metavar="N",
                   help="exit code when the lock is not obtained (default 1)")  # fmt: skip
    g.add_argument("--limit", type=_int_in(1, 1_000_000, "limit"), default=1, metavar="N",
                   help="semaphore: at most N holders at once (layout of `consul lock -n`)")  # fmt: skip
    g.add_argument("--ttl", type=_duration(lock.MIN_TTL, lock.MAX_TTL), default=15.0, metavar="DURATION",
                   help="session TTL, 10s-24h (15s)")  # fmt: skip
    g.add_argument("--lock-delay", type=_duration(0, lock.MAX_LOCK_DELAY), default=15.0, metavar="DURATION",
                   help="Consul lock-delay after a lost session, 0s-60s (15s)")  # fmt: skip
    g.add_argument("--prefix", metavar="PREFIX", help="KV prefix; the key is PREFIX/.lock (consul-locker/NAME)")
    g.add_argument("--once", action="store_true",
                   help="run COMMAND at most once to success per prefix (marker PREFIX/.done)")  # fmt: skip
    g.add_argument("--once-token", metavar="TOKEN",
                   help="implies --once; a marker with another TOKEN does not count (e.g. an app version)")  # fmt: skip
    g.add_argument("--status", action="store_true", help="report the lock without taking it (no COMMAND)")
    g.add_argument("--json", action="store_true", help="with --status: one JSON object on stdout")
    g = p.add_argument_group("child")
    g.add_argument("--kill-timeout", type=_duration(), default=10.0, metavar="DURATION",
                   help="grace between SIGTERM and SIGKILL for the child and its descendants (10s)")  # fmt: skip
    g.add_argument("--max-runtime", type=_duration(), metavar="DURATION",
                   help="terminate COMMAND (and its tree) after DURATION, exit 124")  # fmt: skip
    g.add_argument("-e", "--success-exit-code", type=_exit_code, action="append", default=[], metavar="N",
                   help="repeatable: COMMAND's own exit status N counts as 0 (as tini -e)")  # fmt: skip
    g.add_argument("--shell", action="store_true", help="run COMMAND through /bin/sh -c")
    g.add_argument("-g", "--process-group", action="store_true",
                   help="run the child in its own process group and forward signals to the whole group")  # fmt: skip
    g.add_argument("--pid-namespace", action="store_true",
                   help="the child's tree in its own PID namespace, which dies with consul-locker")  # fmt: skip
    g = p.add_argument_group("Consul connection (as the consul CLI; a flag wins over its environment variable)")
    g.add_argument("--http-addr", metavar="ADDR", help="env CONSUL_HTTP_ADDR (http://127.0.0.1:8500, unix:///path)")
    g.add_argument("--token", metavar="TOKEN", help="ACL token; env CONSUL_HTTP_TOKEN")
    g.add_argument("--token-file", metavar="FILE", help="file holding the ACL token; env CONSUL_HTTP_TOKEN_FILE")
    g.add_argument("--datacenter", metavar="DC", help="datacenter (default: the agent's)")
    g = p.add_argument_group("other")
    g.add_argument("-q", "--quiet", action="store_true", help="no informational lines; warnings and errors stay")
    g.add_argument("-v", "--verbose", action="store_true", help="log every Consul request (env DEBUG too)")
    g.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    g.add_argument("--bash-function", action=_PrintAndExit, text=BASH_FUNCTION,
                   help="print a Bash function consulLocker NAME CMD [ARGS] to eval")  # fmt: skip
    return p


class _PrintAndExit(argparse.Action):
    def __init__(self, option_strings, dest, text, **kw):
        super().__init__(option_strings, dest, nargs=0, **kw)
        self.text = text

    def __call__(self, parser, namespace, values, option_string=None):
        print(self.text)
        parser.exit(0)


def parse_args(argv):
    """Parse and validate the whole command line; raise UsageError. Nothing here talks to Consul."""
    args = build_parser().parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    lock.check_key_part("NAME", args.name)
    if args.prefix is not None:
        lock.check_key_part("--prefix", args.prefix)
    args.prefix = args.prefix if args.prefix is not None else f"consul-locker/{args.name}"
    if args.once_token is not None:
        args.once = True
    if args.status:
        if args.command:
            raise UsageError("--status takes no COMMAND: consul-locker --status [--json] NAME")
    elif not args.command:
        raise UsageError("COMMAND is missing: consul-locker [OPTIONS] NAME [--] COMMAND [ARG...]")
    elif args.json:
        raise UsageError("--json goes with --status")
    if args.once and args.limit > 1:
        raise UsageError("--once runs COMMAND once per prefix; it does not go with --limit > 1")
    if args.timeout == 0:  # "do not wait at all": one attempt, like --no-wait
        args.no_wait, args.timeout = True, None
    if args.shell:
        args.command = ["/bin/sh", "-c", " ".join(args.command)]
    args.verbose = args.verbose or bool(os.environ.get("DEBUG"))
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        log.configure(quiet=args.quiet, verbose=args.verbose)
        return status(args) if args.status else run(args)
    except ShimError as e:
        log.say(f"error: {e}")
        return e.code
    except Exception as e:  # a bug: one line, the traceback only when asked for
        if log.verbose() or os.environ.get("DEBUG"):
            import traceback

            try:
                traceback.print_exc()
            except OSError:
                pass
        log.say(f"internal error: {type(e).__name__}: {e}")
        return errors.INTERNAL


def _client(args):
    settings = consul.Settings.from_env(
        addr=args.http_addr, token=args.token, token_file=args.token_file, datacenter=args.datacenter
    )
    return consul.Client(settings, verbose=args.verbose, log=log.say)


def _lock_options(args):
    return lock.Options(
        prefix=args.prefix,
        limit=args.limit,
        ttl=args.ttl,
        lock_delay=args.lock_delay,
        # Without --timeout, how long Consul may stay unreachable while we wait before we give up.
        unreachable_for=args.timeout if args.timeout is not None else lock.DEFAULT_UNREACHABLE_FOR,
    )


def run(args):
    if args.kill_timeout + 1.0 >= args.lock_delay:
        log.say(
            f"warning: --kill-timeout {format_go(args.kill_timeout)} is not at least 1s shorter than --lock-delay "
            f"{format_go(args.lock_delay)}: after a partition, the next holder may start before this child is "
            "killed"
        )
    opts = _lock_options(args)
    client = _client(args)  # bad address or token: exit 2 before anything is forked or sent
    signals = supervisor.Signals()
    supervisor.become_subreaper()
    child = supervisor.ChildProcess(
        args.command, dict(os.environ), args.process_group, args.pid_namespace, args.kill_timeout
    )  # 126/127 here, before Consul is contacted
    # Everything imported so far lives until exit: freeze it, so that neither the forked child's copy-on-write
    # pages nor our exit's last collection walk it (the practice the gc documentation gives for forking).
    gc.freeze()
    child.fork()  # before any thread exists: the forked process must be single-threaded
    plan = supervisor.Plan(
        deadline=None if args.timeout is None else time.monotonic() + args.timeout,
        wait=not args.no_wait,
        kill_timeout=args.kill_timeout,
        max_runtime=args.max_runtime,
        once=args.once,
        once_token=args.once_token,
        conflict_code=args.conflict_exit_code,
        success_codes=frozenset(args.success_exit_code),
    )
    locker = lock.Locker(client, opts, notify=supervisor.wake)
    return supervisor.Supervisor(signals, child, plan).live(locker)


def status(args):
    report = lock.status(_client(args), _lock_options(args))
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['key']}: {'held' if report['held'] else 'free'} (limit {report['limit']})")
        for h in report["holders"]:
            if h["node"] is None:
                print(f"  holder: session {h['session']} (its details cannot be read with this token)")
            else:
                print(f"  holder: session {h['session']} on node {h['node']} ({h['name']})")
        if report["index"] is not None:
            print(f"  fencing index: {report['index']}")
        if report["done"] is not None:
            print(f"  done: {json.dumps(report['done'])}")
    return errors.OK if report["held"] else errors.CONFLICT
