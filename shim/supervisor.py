"""The init part: one event loop for the whole life -- wait for the lock, run the child, clean the tree.

As in tini, every catchable signal stays blocked in every thread (shim.entry blocks them before anything else
runs) and the main thread takes them one at a time with sigtimedwait: a signal is never lost, none is handled
in the middle of something else, and the siginfo says who sent it. The lock's threads report news by sending
the process a SIGCHLD (never forwarded; it only makes the loop look at the state again).

The child is forked before the lock is granted (ChildProcess): it waits at a pipe, and the grant only writes the
lock's environment into that pipe and lets it exec. If the lock is not obtained, closing the pipe makes it exit
without a trace. With --pid-namespace that forked process is the init of a new PID namespace instead: it runs
the command as its own child, and when consul-locker dies (PR_SET_PDEATHSIG) the kernel kills everything in it.
"""

import ctypes
import datetime
import errno
import json
import os
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Optional

from shim import log
from shim.duration import format_go
from shim.errors import (
    CONFLICT,
    LOCK_LOST,
    NOT_EXECUTABLE,
    NOT_FOUND,
    OK,
    OS_ERROR,
    SIGNAL_BASE,
    TIMED_OUT,
    NamespaceError,
    ShimError,
    SpawnError,
)
from shim.lock import NotAcquired, describe_holder

# Every signal a process can catch. SIGKILL/SIGSTOP cannot be caught; 32 and 33 are glibc's own (NPTL).
CATCHABLE = frozenset(s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP, 32, 33))
# Signals that end the wait for the lock (no child yet): the ones a supervisor sends to stop a service.
STOPPING = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT})
# A forwarded SIGTERM is a request to stop (docker stop, systemctl stop, the kubelet): if the child is still there
# --kill-timeout later, it gets SIGKILL. Every other forwarded signal (HUP often means "reload", INT and QUIT are
# the child's to interpret, USR1...) is only passed on and starts no timer.
ESCALATED = signal.SIGTERM
# What a terminal's line discipline sends to its whole foreground process group, with si_code SI_KERNEL. When
# the child shares our process group it has had the signal from the kernel already: sending it again would turn
# one Ctrl-C into two (many programs take a second one as "force quit").
KEYBOARD = frozenset({signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGWINCH})
SI_KERNEL = 0x80
# While leftover descendants exit, how often the tree is read again (grandchildren send us no SIGCHLD); it backs
# off to the cap so that a process stuck in the kernel does not make us spin.
TREE_RECHECK, TREE_RECHECK_MAX = 0.01, 0.5

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
CLONE_NEWPID = 0x20000000
_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option, arg):
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def become_subreaper():
    """Unless we are PID 1 already, adopt orphaned descendants (they are re-parented to us, not to init), so
    that no process of the tree can leave it and we can wait until every one of them is gone."""
    if os.getpid() != 1:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)


def wake():
    """Called from the lock's threads: make the main loop look at the state again."""
    os.kill(os.getpid(), signal.SIGCHLD)


class Signals:
    """The main thread's only way to wait: for a signal, a thread's news (wake()) or a timeout."""

    def __init__(self):
        self.me = os.getpid()
        signal.pthread_sigmask(signal.SIG_BLOCK, CATCHABLE)  # shim.entry did it already; library callers may not

    def wait(self, timeout=None):
        """Return the siginfo of one external signal worth acting on, or None (timeout, a child's exit, our own
        wake-up, a signal we raised ourselves such as SIGPIPE on a closed stderr)."""
        if timeout is None:
            info = signal.sigwaitinfo(CATCHABLE)
        else:
            info = signal.sigtimedwait(CATCHABLE, max(0.0, timeout))
        if info is None or info.si_signo == signal.SIGCHLD or info.si_pid == self.me:
            return None
        return info


def exit_code(status):
    """A wait status as a shell would report it: the exit code, or 128+N for death by signal N."""
    code = os.waitstatus_to_exitcode(status)
    return SIGNAL_BASE - code if code < 0 else code


def reap_all(child_pid=None):
    """Reap every child that has exited (main child and adopted orphans). Return the main child's status."""
    status_of_child = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status_of_child
        if pid == 0:
            return status_of_child
        if pid == child_pid:
            status_of_child = status


def has_children():
    """Have we any child at all, exited or not? As subreaper (or PID 1) every descendant is below one of our
    children, so "no" (ECHILD) is proof that the whole tree is gone -- a snapshot of the tree is not."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def resolve(command, env):
    """Find COMMAND as execvp would, before anything else happens: 127 not found, 126 found but not runnable."""
    if "/" in command:
        candidates = [command]
    else:
        candidates = [os.path.join(d or ".", command) for d in env.get("PATH", os.defpath).split(os.pathsep)]
    denied = None
    for path in candidates:
        if os.path.isfile(path):
            if os.access(path, os.X_OK):
                return path
            denied = denied or path
        elif os.path.isdir(path) and "/" in command:
            raise SpawnError(f"{command}: is a directory", NOT_EXECUTABLE)
    if denied:
        raise SpawnError(f"{command}: permission denied", NOT_EXECUTABLE)
    raise SpawnError(f"{command}: command not found", NOT_FOUND)


def proc_is_ours():
    """Whether /proc shows our own PID namespace. `unshare --pid --fork` without --mount-proc keeps the host's
    /proc, where "PID 1" is the host's init and its descendants are the whole machine: we must not walk that."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


def _descendants():
    """Every live process below us (psutil is imported here: most runs leave no descendants to look at)."""
    if not has_children() or not proc_is_ours():
        return []
    import psutil

    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    alive = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            pass
    return alive


def _signal_procs(procs, *sigs):
    import psutil

    for p in procs:
        for sig in sigs:
            try:
                p.send_signal(sig)  # psutil checks the create time first: never a recycled PID
            except psutil.Error:
                break


# -- the child ---------------------------------------------------------------------------------------------
def _exec(path, argv, env, err_w):
    """In a forked process whose dispositions are the defaults already (see ChildProcess.fork): clear the mask
    and exec, so the command starts clean. Never returns.

    Signals that reached this process while it waited for the go-ahead are still pending. The terminal's
    (SI_KERNEL: a Ctrl-Z, a window resize while we waited) belonged to the wait, in which nothing is forwarded:
    they are dropped, so the command does not start stopped. Any other (consul-locker forwarding a signal right
    after the go-ahead) is raised again, so it is delivered as soon as the mask is cleared: never lost."""
    try:
        keep = []
        while (info := signal.sigtimedwait(CATCHABLE, 0)) is not None:
            if info.si_code != SI_KERNEL:
                keep.append(info.si_signo)
        for s in keep:
            os.kill(os.getpid(), s)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        try:
            os.execve(path, argv, env)
        except OSError as e:
            if e.errno != errno.ENOEXEC:
                raise
            # A script without a shebang: run it with /bin/sh, as execvp and every shell do.
            os.execve("/bin/sh", ["/bin/sh", path] + list(argv[1:]), env)
    except OSError as e:
        os.write(err_w, str(e.errno).encode())
    finally:
        os._exit(NOT_FOUND)


def _take_terminal():
    """With --process-group, hand the terminal's foreground to the child's group, so it can read from it."""
    try:
        if os.isatty(0) and os.tcgetpgrp(0) == os.getpgid(os.getppid()):
            os.tcsetpgrp(0, os.getpid())  # SIGTTOU is blocked here, so this is allowed from the background
    except OSError:
        pass


def _forwardable(info, child_pgid):
    """Not a keyboard signal that the kernel already gave the child's process group (it is ours too)."""
    return not (info.si_code == SI_KERNEL and info.si_signo in KEYBOARD and child_pgid == os.getpgrp())


class ChildProcess:
    """COMMAND, forked before the lock is granted and held at a pipe until go().

    go() and discard() may race (the lock's thread grants while the main loop takes a stop signal): a mutex
    makes exactly one of them win, and the winner decides whether the command ever runs."""

    def __init__(self, argv, env, process_group=False, pid_namespace=False, kill_timeout=10.0):
        self.argv, self.env = argv, env
        self.process_group, self.pid_namespace, self.kill_timeout = process_group, pid_namespace, kill_timeout
        self.path = resolve(argv[0], env)  # 126/127 before we touch Consul
        self.pid = None
        self.started = False
        self.reaped = False  # collected before it was started (it exited after a discard, or was killed)
        self.discarded = False
        self._decided = threading.Lock()
        self._done = False
        self._go_w = self._err_r = None

    def fork(self):
        """Fork the waiting process. Call it from the main thread before any other thread exists (a forked copy
        of a threaded interpreter is not safe to run Python in). With --pid-namespace, the namespace is made
        here, so a refusal is known before Consul is contacted."""
        go_r, self._go_w = os.pipe2(os.O_CLOEXEC)
        self._err_r, err_w = os.pipe2(os.O_CLOEXEC)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # the waiting process: single-threaded, every signal blocked (inherited)
            try:
                for fd in (self._go_w, self._err_r, ready_r):
                    os.close(fd)
                _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # if consul-locker dies, so do we (and our namespace)
                # Default dispositions now, while every signal is blocked (so none is acted on): after the
                # go-ahead only the exec is left to do. An inherited SIG_IGN would survive the exec.
                for s in CATCHABLE:
                    signal.signal(s, signal.SIG_DFL)
                if self.pid_namespace:
                    # Not in consul-locker itself: a process whose children go to another PID namespace cannot
                    # start threads any more, and consul-locker needs them.
                    if _libc.unshare(CLONE_NEWPID) != 0:
                        os.write(ready_w, str(ctypes.get_errno()).encode())
                        os._exit(OS_ERROR)
                elif self.process_group:
                    os.setpgid(0, 0)
                os.close(ready_w)
                message = b""
                while chunk := os.read(go_r, 65536):  # EOF without a go-ahead: discarded, or our parent died
                    message += chunk
                if not message:
                    os._exit(0)
                env = dict(self.env, **json.loads(message))
                if self.pid_namespace:
                    os._exit(_relay_to_namespace(self, env, err_w))
                if self.process_group:
                    _take_terminal()
                _exec(self.path, self.argv, env, err_w)
            finally:
                os._exit(NOT_FOUND)
        for fd in (go_r, err_w, ready_w):
            os.close(fd)
        with os.fdopen(ready_r, "rb") as ready:
            refused = ready.read()  # EOF once the child is ready (or it died)
        self.pid = pid
        if refused:
            os.waitpid(pid, 0)
            self.pid, self._done = None, True
            raise NamespaceError(
                f"--pid-namespace: cannot create a PID namespace ({os.strerror(int(refused))}); it needs root "
                "(CAP_SYS_ADMIN), or run consul-locker under `unshare --user --map-root-user`; in a container the "
                "container's own PID namespace already gives this protection"
            )
        if self.process_group and not self.pid_namespace:
            try:
                os.setpgid(pid, pid)  # also here, so the group exists before we ever signal it
            except OSError:
                pass
        return self

    def go(self, extra_env):
        """Let the child exec, with extra_env added to its environment. False if it was discarded first."""
        with self._decided:
            if self._done:
                return False
            # Started before the write: the command may run and exit before this thread runs again, and the
            # main loop must then know that the status it reaps is the command's.
            self._done = self.started = True
            try:
                os.write(self._go_w, json.dumps(extra_env).encode())  # far below PIPE_BUF: one write, whole
            except BrokenPipeError:
                pass  # it died waiting (killed by someone): the main loop reaps it and reports its status
            finally:
                os.close(self._go_w)
            return True

    def discard(self):
        """Make the waiting child exit without running COMMAND. False if it had been started already."""
        with self._decided:
            if self._done:
                return not self.started
            self._done = self.discarded = True  # set before the close: the child exits only after it
            os.close(self._go_w)
            return True

    def wait_exec(self, timeout):
        """Wait (at most timeout) until the child has exec'd: the error pipe is close-on-exec, so it reads EOF
        then (or shows the errno of a failed exec). Nothing is read: spawn_error() still finds it."""
        if not self.pid_namespace:  # there the pipe stays open in the namespace's processes
            select.select([self._err_r], [], [], timeout)

    def spawn_error(self):
        """After the child was reaped: the SpawnError its exec met, or None."""
        try:
            data = os.read(self._err_r, 64)
        except OSError:
            data = b""
        if not data:
            return None
        code = int(data)
        return SpawnError(f"{self.argv[0]}: {os.strerror(code)}", NOT_FOUND if code == errno.ENOENT else NOT_EXECUTABLE)

    def signal(self, sig):
        """Send sig to the child (its whole group with --process-group; with --pid-namespace its init forwards
        it). Only before the child is reaped: until then its PID cannot be recycled."""
        target = -self.pid if self.process_group and not self.pid_namespace else self.pid
        try:
            os.kill(target, sig)
        except ProcessLookupError:
            pass

    def pgid(self):
        try:
            return os.getpgid(self.pid)
        except OSError:
            return None


def _relay_to_namespace(child, env, err_w):
    """The waiting process after the go-ahead with --pid-namespace: fork the namespace's init, pass on what
    consul-locker sends, and leave with the init's exit code. If consul-locker dies, PDEATHSIG kills us, ours
    kills the init, and the kernel everything in the namespace."""
    init = os.fork()
    if init == 0:
        try:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            os._exit(_namespace_init(child, env, err_w))
        finally:
            os._exit(NOT_FOUND)
    me = os.getpid()
    while True:
        info = signal.sigwaitinfo(CATCHABLE)
        if info.si_signo != signal.SIGCHLD and info.si_pid != me and _forwardable(info, os.getpgrp()):
            try:
                os.kill(init, info.si_signo)
            except ProcessLookupError:
                pass
        status = reap_all(init)
        if status is not None:
            return exit_code(status) & 0xFF


def _namespace_init(child, env, err_w):
    """PID 1 of the --pid-namespace: run COMMAND, forward what consul-locker sends, reap, and when COMMAND ends,
    end every other process of the namespace (TERM, then KILL after kill-timeout). Returns the exit code to
    leave with: COMMAND's, as a shell reports it. If consul-locker dies, PDEATHSIG kills us, and the kernel the
    whole namespace."""
    pid = os.fork()
    if pid == 0:
        try:
            if child.process_group:
                os.setpgid(0, 0)
                _take_terminal()
            _exec(child.path, child.argv, env, err_w)
        finally:
            os._exit(NOT_FOUND)
    command_pgid = pid if child.process_group else os.getpgrp()
    status = None
    while status is None:
        info = signal.sigwaitinfo(CATCHABLE)
        if info.si_signo != signal.SIGCHLD and _forwardable(info, command_pgid):
            try:
                os.kill(-pid if child.process_group else pid, info.si_signo)
            except ProcessLookupError:
                pass
        status = reap_all(pid)
    # kill(-1) from a namespace's init reaches every other process of the namespace, however it forked.
    for sig, until in ((signal.SIGTERM, time.monotonic() + child.kill_timeout), (signal.SIGKILL, None)):
        for s in (sig, signal.SIGCONT):
            try:
                os.kill(-1, s)
            except ProcessLookupError:
                break
        while has_children() and (until is None or time.monotonic() < until):
            reap_all()
            signal.sigtimedwait({signal.SIGCHLD}, TREE_RECHECK)
        if not has_children():
            break
    return exit_code(status) & 0xFF


# -- the loop ----------------------------------------------------------------------------------------------
# How long the lock's thread stays out of the child's way after the go-ahead (until its exec, at most this).
EXEC_HEADSTART = 0.1
# Budgets for the last Consul calls (release, destroy): short after a stop signal, which must end us within 1 s.
CLOSE_BUDGET = 5.0
CLOSE_BUDGET_STOPPING = 0.5


class Outcome:
    """How the child's part ended: its wait status, and whether we ended it for the lock's sake."""

    def __init__(self):
        self.status = None
        self.lost = False  # the lock was lost while the tree ran
        self.timed_out = False  # --max-runtime passed
        self.spawn_error = None


@dataclass
class Plan:
    """What the command line asked for, as the life loop needs it."""

    deadline: Optional[float] = None  # monotonic time to stop waiting for the lock (--timeout)
    wait: bool = True  # False: --no-wait
    kill_timeout: float = 10.0
    max_runtime: Optional[float] = None
    once: bool = False
    once_token: Optional[str] = None
    conflict_code: int = CONFLICT
    success_codes: frozenset = frozenset()  # -e: the child's own statuses that count as 0


class AlreadyDone:
    """The --once marker was found after acquiring: nothing to run."""

    def __init__(self, marker):
        self.marker = marker


def marker_matches(marker, token):
    """Whether a --once marker means "done" for this run: any marker for a plain --once; with --once-token, only
    a marker that recorded the same token (a new application version runs again)."""
    return marker is not None and (token is None or marker.get("token") == token)


class _Worker(threading.Thread):
    """The lock's side of the life, off the main thread (requests block): acquire, check the --once marker,
    let the child go (no thread hop between the grant and the exec), then watch the key until the end."""

    def __init__(self, locker, child, plan):
        super().__init__(name="consul-locker-lock", daemon=True)
        self.locker, self.child, self.plan = locker, child, plan
        self.result = None  # what ended the wait without a child: an exception or AlreadyDone

    def run(self):
        try:
            hold = self.locker.acquire(self.plan.deadline, self.plan.wait, on_busy=self._waiting)
            if self.plan.once:
                marker = self.locker.read_marker()
                if marker_matches(marker, self.plan.once_token):
                    self.result = AlreadyDone(marker)
                    self.child.discard()
                    return
            if self.child.go(hold.env()):
                # Let the child's exec have the CPU before this thread's watch and the main loop compete for it.
                self.child.wait_exec(EXEC_HEADSTART)
                wake()
                self.locker.renew_soon()
                self.locker.monitor()
        except BaseException as e:
            self.result = e
        finally:
            wake()

    def _waiting(self, holders):
        if log.quiet():
            return
        who = ", ".join(describe_holder(self.locker.client, h) for h in holders[:5])
        who = who or "a holder whose session ended (its slot is kept for --lock-delay)"
        log.info(f"waiting for {self.locker.opts.key}, held by {who}")


class Supervisor:
    """The whole life, in one loop on the main thread: wait for the lock (signals end the wait), run the child
    (forward, reap, escalate, watch for a lost lock and --max-runtime), clean the tree until we have no child
    left at all, write the --once marker, release, and say what the exit code is."""

    def __init__(self, signals, child, plan):
        self.signals, self.child, self.plan = signals, child, plan
        self.kill_timeout, self.max_runtime = plan.kill_timeout, plan.max_runtime
        self.pending_term = False
        self.early_status = None

    def live(self, locker):
        budget = CLOSE_BUDGET
        try:
            worker = _Worker(locker, self.child, self.plan)
            worker.start()
            code = self._wait(worker, locker)
            if code is not None:
                if code >= SIGNAL_BASE:
                    budget = CLOSE_BUDGET_STOPPING
                return code
            try:
                out = self.run(locker.hold.lost)
            except BaseException:
                # A bug, or a failure nobody foresaw, must not end with the lock released under a live tree.
                self._kill_all()
                raise
            return self._verdict(out, locker)
        finally:
            self._discard_unstarted()
            warning = locker.close(budget)
            if warning:
                log.say(f"warning: {warning}")

    def _wait(self, worker, locker):
        """Until the child is started (None) or the wait ended without it (an exit code, or an exception)."""
        while not self.child.started:
            if worker.result is not None:
                return self._not_started(worker.result, locker)
            info = self.signals.wait()
            if info is None:
                pass
            elif info.si_signo in STOPPING and self.child.discard():
                log.say(f"signal {info.si_signo} while waiting for the lock: not running the command")
                return SIGNAL_BASE + info.si_signo
            elif self.child.started:  # granted and started meanwhile: the signal is the child's now
                if _forwardable(info, self.child.pgid()):
                    self.child.signal(info.si_signo)
                    self.pending_term = self.pending_term or info.si_signo == ESCALATED
            else:
                log.debug(f"signal {info.si_signo} while waiting for the lock: no child to forward it to")
            status = reap_all(self.child.pid)  # as PID 1 we may adopt orphans even before the child exists
            if status is not None and self.child.started:
                self.early_status = status  # started and already gone: run() must not wait for it
            elif status is not None:
                self.child.reaped = True
                if self.child.discarded:
                    continue  # discarded by the lock's thread (--once: already done): its result follows
                self.child.discard()
                raise ShimError(
                    f"the process prepared for the command (pid {self.child.pid}) died before the lock was granted "
                    f"(status {exit_code(status)})",
                    exit_code(status),
                )
        return None

    def _not_started(self, result, locker):
        key = locker.opts.key
        if isinstance(result, AlreadyDone):
            log.info(f"{key}: already done (marker {locker.opts.done_key}: {json.dumps(result.marker)}); not running "
                     "the command")  # fmt: skip
            return OK
        if isinstance(result, NotAcquired):
            what = "held elsewhere" if result.reason != NotAcquired.TIMEOUT else "not obtained in time"
            log.say(f"lock {key} {what}; not running the command")
            return self.plan.conflict_code
        raise result

    def _discard_unstarted(self):
        """A child that never got the go-ahead exits at EOF of its pipe: reap it, so nothing is left."""
        if self.child.pid is None or self.child.started or self.child.reaped:
            return
        self.child.discard()
        give_up_at = time.monotonic() + 1.0
        while reap_all(self.child.pid) is None and has_children():
            if time.monotonic() >= give_up_at:
                self.child.signal(signal.SIGKILL)
                give_up_at = float("inf")
            signal.sigtimedwait({signal.SIGCHLD}, TREE_RECHECK)
            if not has_children():
                break

    def _kill_all(self):
        """SIGKILL the child and everything below it, until we have no child left."""
        alive = self.child.pid is not None and not self.child.reaped and reap_all(self.child.pid) is None
        self.end_tree(time.monotonic(), self.child if alive else None)

    def _verdict(self, out, locker):
        """The exit code: ours when we ended the child (lost lock, --max-runtime), else the child's, after the
        --once marker and -e."""
        hold = locker.hold
        if out.lost:
            log.say(f"error: lock lost while the child ran ({hold.lost_reason}); the child was terminated")
            return LOCK_LOST
        if out.timed_out:
            log.say(f"error: --max-runtime {format_go(self.max_runtime)} reached; the child was terminated")
            return TIMED_OUT
        if out.spawn_error is not None:
            raise out.spawn_error
        code = exit_code(out.status)
        if self.plan.once and code == 0:
            marker = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "session": hold.session,
                "index": hold.index,
                "token": self.plan.once_token,
                "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            if not locker.write_marker(marker, time.monotonic() + CLOSE_BUDGET):
                log.say(f"error: lock lost before the --once marker {locker.opts.done_key} was written")
                return LOCK_LOST
        return OK if code in self.plan.success_codes else code

    def run(self, lost=None):
        """Supervise the started child until the whole tree is gone. `lost` is the hold's Event."""
        out = Outcome()
        child = self.child
        log.debug(f"child pid {child.pid} started: {child.argv!r}")
        if not proc_is_ours() and os.getpid() != 1:
            log.say(
                "warning: /proc belongs to another PID namespace (mount a fresh one, e.g. unshare "
                "--mount-proc): descendants left by the child cannot be found, only reaped"
            )
        child_pgid = child.pgid()
        started = time.monotonic()
        end_at = None if self.max_runtime is None else started + self.max_runtime
        # A forwarded SIGTERM is a request to stop: SIGKILL follows at kill_at if the child is still there.
        kill_at = started + self.kill_timeout if self.pending_term else None
        out.status = self.early_status
        while out.status is None:
            due = [t for t in (kill_at, end_at) if t is not None]
            timeout = max(0.0, min(due) - time.monotonic()) if due else None
            if lost is not None and lost.is_set():
                timeout = 0  # lost before we looked (its wake-up may have been taken already): act now
            info = self.signals.wait(timeout)
            # Forward before reaping: until reap_all() has collected it, the child's PID is still ours (at worst
            # a zombie), so no signal can reach a recycled PID.
            if info is not None and _forwardable(info, child_pgid):
                log.debug(f"forwarding signal {info.si_signo} to child {child.pid}")
                child.signal(info.si_signo)
                if info.si_signo == ESCALATED:
                    child.signal(signal.SIGCONT)  # a stopped child (a forwarded SIGTSTP) could not act on it
                    if kill_at is None:
                        kill_at = time.monotonic() + self.kill_timeout
            out.status = reap_all(child.pid)
            if out.status is not None:
                break
            now = time.monotonic()
            if lost is not None and lost.is_set():
                out.lost = True
                log.debug("lock lost: terminating the child and its descendants")
            elif end_at is not None and now >= end_at:
                out.timed_out = True
                log.debug(f"--max-runtime reached after {now - started:.1f}s: terminating the child's tree")
            elif kill_at is None or now < kill_at:
                continue
            # The lock is lost, the time is up, or the grace after a forwarded SIGTERM has passed: the whole
            # tree at once, so that all of it is gone within kill-timeout.
            grace_end = now + self.kill_timeout if out.lost or out.timed_out else now
            out.status = self.end_tree(grace_end if kill_at is None else min(kill_at, grace_end), child)
        out.spawn_error = child.spawn_error()
        # The main child is reaped: its PID may be recycled from here on, so we never signal it again.
        self.end_tree(kill_at or time.monotonic() + self.kill_timeout)
        if lost is not None and lost.is_set():
            out.lost = True  # leftovers ran without the lock
        return out

    def end_tree(self, kill_at, child=None):
        """The one terminate -> wait -> kill routine: SIGTERM (and SIGCONT, so a stopped process can act on it)
        to the child, if given and not yet reaped, and to every descendant, new ones too (a process may keep
        forking); SIGKILL to whatever is left from kill_at on; return only when we have no child at all
        (ECHILD): then no process of the tree can be left. Returns the child's wait status if it was reaped
        here. Signals that arrive meanwhile are dropped: the processes they were meant for are being ended."""
        status, termed, pause = None, set(), TREE_RECHECK
        blind = not proc_is_ours()  # no way to list descendants (a foreign /proc)
        while True:
            if child is not None:
                status = reap_all(child.pid)
                if status is not None:
                    child = None
            else:
                reap_all()
            if not has_children():
                return status
            killing = time.monotonic() >= kill_at
            if blind and os.getpid() == 1:
                # As PID 1, kill(-1) reaches every other process of our namespace: exactly the tree.
                for sig in (signal.SIGKILL,) if killing else (signal.SIGTERM, signal.SIGCONT):
                    try:
                        os.kill(-1, sig)
                    except ProcessLookupError:
                        pass
            elif blind:
                # Leftovers we cannot list cannot be signalled either; the lock is still released only once
                # they have exited by themselves (waitid says so), never under a live tree.
                if child is not None:
                    child.signal(signal.SIGKILL if killing else signal.SIGTERM)
                if "warned" not in termed:
                    termed.add("warned")
                    log.say("warning: waiting for descendants that cannot be found without our own /proc to exit")
            else:
                if child is not None and ("child" not in termed or killing):
                    for sig in (signal.SIGKILL,) if killing else (signal.SIGTERM, signal.SIGCONT):
                        child.signal(sig)
                    termed.add("child")
                procs = _descendants()
                if killing:
                    _signal_procs(procs, signal.SIGKILL)
                else:
                    _signal_procs([p for p in procs if p not in termed], signal.SIGTERM, signal.SIGCONT)
                    termed.update(procs)  # psutil.Process compares by pid and create time
            self.signals.wait(min(pause, max(0.0, kill_at - time.monotonic())) or pause)
            pause = min(TREE_RECHECK_MAX, pause * 1.5)
