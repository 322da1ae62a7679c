"""The init part: spawn the child, forward signals, reap every zombie, clean the whole tree.

One loop in the main thread, as in tini: every signal and every notification from the lock's threads arrives
as a byte on one pipe (signal.set_wakeup_fd), and the loop acts on it. Nothing polls while the child runs; the
only timed waits are the SIGTERM -> SIGKILL grace and, while leftover descendants that are not our own children
exit, a short re-check of the process tree (we get no SIGCHLD for a grandchild).
"""

import ctypes
import errno
import os
import select
import signal
import time

from shim.exitcodes import NOT_EXECUTABLE, NOT_FOUND, SIGNAL_BASE, ShimError
from shim.log import line as say

# Every signal a process can catch. SIGKILL/SIGSTOP cannot be caught; 32 and 33 are glibc's own (NPTL).
CATCHABLE = frozenset(s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP, 32, 33))
# Signals that end the wait for the lock (no child yet): the ones a supervisor sends to stop a service.
STOPPING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
# A forwarded SIGTERM is a request to stop (docker stop, systemctl stop, the kubelet): if the child is still there
# --kill-timeout later, it gets SIGKILL. Every other forwarded signal (HUP often means "reload", INT and QUIT are
# the child's to interpret, USR1...) is only passed on and starts no timer.
ESCALATED = signal.SIGTERM
# While leftover descendants exit, how often the tree is re-read (grandchildren send us no SIGCHLD).
TREE_RECHECK = 0.02

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option, arg):
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def become_subreaper():
    """Unless we are PID 1 already, adopt orphaned descendants (they are re-parented to us, not to init)."""
    if os.getpid() != 1:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)


def _noop(signum, frame):
    pass


class Events:
    """Signals and thread notifications, delivered to the main thread as bytes on one non-blocking pipe.

    Byte 0 is a notification (see notify()); any other byte is the number of a signal we received.
    """

    def __init__(self):
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for s in CATCHABLE:
            signal.signal(s, _noop)  # replaces inherited SIG_IGN too: the child starts with SIG_DFL after exec
        signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, CATCHABLE)  # entry.main blocked them; pending ones arrive now

    def notify(self):
        try:
            os.write(self._w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so the loop will wake anyway

    def wait(self, timeout=None):
        """Wait until something arrives or timeout seconds pass; return the signal numbers received, in order."""
        if timeout is not None and timeout <= 0:
            timeout = 0
        select.select([self._r], [], [], timeout)
        try:
            data = os.read(self._r, 4096)
        except BlockingIOError:
            return []
        return [b for b in data if b]


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


class SpawnError(ShimError):
    pass


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


def spawn(argv, env, process_group=False):
    """Fork and exec argv; return the child's pid. Raises SpawnError (126/127) when exec fails.

    Signals are blocked across fork, so none is handled by the child's copy of our handlers; the child resets
    every disposition to default and unblocks everything just before exec, so it starts clean. It asks for
    SIGKILL when we die (PR_SET_PDEATHSIG), and checks that we had not died already before it asked.
    """
    path = resolve(argv[0], env)
    parent = os.getpid()
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, CATCHABLE)
    pid = os.fork()
    if pid == 0:  # child: only async-signal-safe-ish work from here to exec
        try:
            os.close(err_r)
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:  # the parent died before prctl took effect: nobody guards the lock
                os.kill(os.getpid(), signal.SIGKILL)
            if process_group:
                os.setpgid(0, 0)
                _take_terminal()
            signal.set_wakeup_fd(-1)
            for s in CATCHABLE:
                signal.signal(s, signal.SIG_DFL)
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
    os.close(err_w)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    with os.fdopen(err_r, "rb") as pipe:
        failure = pipe.read()  # EOF on successful exec (the pipe is close-on-exec)
    if failure:
        os.waitpid(pid, 0)
        code = int(failure)
        rc = NOT_FOUND if code == errno.ENOENT else NOT_EXECUTABLE
        raise SpawnError(f"{argv[0]}: {os.strerror(code)}", rc)
    return pid


def _take_terminal():
    """With --process-group, hand the terminal's foreground to the child's group, so it can read from it."""
    try:
        if os.isatty(0) and os.tcgetpgrp(0) == os.getpgid(os.getppid()):
            os.tcsetpgrp(0, os.getpid())  # SIGTTOU is blocked here, so this is allowed from the background
    except OSError:
        pass


def _has_children():
    """Cheap pre-check: have we any child at all (exited or not)? As subreaper (or PID 1) every descendant is
    below one of our children, so "no" means no descendants, and psutil (~15 ms to import) is not needed."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def proc_is_ours():
    """Whether /proc shows our own PID namespace. `unshare --pid --fork` without --mount-proc keeps the host's
    /proc, where "PID 1" is the host's init and its descendants are the whole machine: we must not walk that."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


def _descendants():
    """Every live process below us (psutil is imported here: most runs leave no descendants to look at)."""
    if not _has_children() or not proc_is_ours():
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


def _signal_procs(procs, sig):
    import psutil

    for p in procs:
        try:
            p.send_signal(sig)  # psutil checks the create time first: never a recycled PID
        except psutil.Error:
            pass


def _terminate_procs(procs):
    """SIGTERM, then SIGCONT: a stopped process (SIGSTOP, a forwarded SIGTSTP) would otherwise hold the TERM
    pending and be killed only at the SIGKILL deadline, without its chance to clean up."""
    _signal_procs(procs, signal.SIGTERM)
    _signal_procs(procs, signal.SIGCONT)


class Supervisor:
    """Run one child to its end and leave no process behind. The caller owns Events and the lock."""

    def __init__(self, events, kill_timeout=10.0, process_group=False, log=None):
        self.events = events
        self.kill_timeout = kill_timeout
        self.process_group = process_group
        self.log = log or (lambda line: None)  # shim.log.line from the CLI: it never raises
        self.pid = None

    def _forward(self, sig):
        target = -self.pid if self.process_group else self.pid
        try:
            os.kill(target, sig)
        except ProcessLookupError:
            pass

    def run(self, argv, env, lost=None, started=None):
        """Spawn argv and supervise it. `lost` (a threading.Event) set from another thread, with an
        events.notify(), makes the whole tree be terminated at once. `started` is called once the child exists;
        if it fails, the tree is killed. Returns the child's wait status."""
        self.pid = spawn(argv, env, self.process_group)
        try:
            if started is not None:
                # Called after the fork, not before: Thread.start() (the lock monitor) waits for the new thread to
                # run, and its first request competes for the GIL; before the fork that delayed the child by ms.
                started()
            return self._supervise(argv, lost)
        except BaseException:
            # A bug, or a failure nobody foresaw, must not end with the caller releasing the lock under a live
            # tree: kill all of it, and wait for it, first.
            self._kill_tree()
            raise

    def _supervise(self, argv, lost):
        self.log(f"child pid {self.pid} started: {argv!r}")
        if not proc_is_ours():
            say(
                "warning: /proc belongs to another PID namespace (mount a fresh one, e.g. unshare "
                "--mount-proc): descendants left by the child cannot be found, only reaped"
            )
        status, kill_at, killed, terminating = None, None, False, False
        while True:
            timeout = None if kill_at is None or killed else kill_at - time.monotonic()
            if lost is not None and lost.is_set() and not terminating:
                timeout = 0  # lost before we looked (its wake-up byte may have been read already): act now
            # Forward before reaping: until reap_all() has collected it, the child's PID is still ours (at worst
            # a zombie), so no signal can reach a recycled PID.
            for sig in self.events.wait(timeout):
                if sig == signal.SIGCHLD:
                    continue
                self.log(f"forwarding signal {sig} to child {self.pid}")
                self._forward(sig)
                if sig == ESCALATED and kill_at is None:
                    kill_at = time.monotonic() + self.kill_timeout
            status = reap_all(self.pid)
            if status is not None:
                break
            if lost is not None and lost.is_set() and not terminating:
                # Lost lock: the whole tree at once, so all of it is gone within kill-timeout of detection.
                self.log("lock lost: terminating the child and its descendants")
                terminating = True
                self._forward(signal.SIGTERM)
                self._forward(signal.SIGCONT)
                _terminate_procs([p for p in _descendants() if p.pid != self.pid])
                deadline = time.monotonic() + self.kill_timeout
                kill_at = deadline if kill_at is None else min(kill_at, deadline)
            if kill_at is not None and not killed and time.monotonic() >= kill_at:
                self.log(f"child {self.pid} still running {self.kill_timeout}s after SIGTERM: SIGKILL")
                self._forward(signal.SIGKILL)
                _signal_procs(_descendants(), signal.SIGKILL)
                killed = True
        # The main child is reaped: its PID may be recycled from here on, so we never signal it again.
        self.pid = None
        self.clean_tree(kill_at)
        return status

    def _kill_tree(self):
        """SIGKILL the child and every descendant; return once they are reaped (or kill-timeout has passed: a
        process stuck in the kernel cannot be waited for forever)."""
        if self.pid is not None:
            self._forward(signal.SIGKILL)
        give_up_at = time.monotonic() + self.kill_timeout
        while True:
            procs = _descendants()
            _signal_procs(procs, signal.SIGKILL)
            if reap_all(self.pid) is not None:
                self.pid = None
            if not procs or time.monotonic() >= give_up_at:
                return
            time.sleep(TREE_RECHECK)

    def clean_tree(self, kill_at=None):
        """TERM every remaining descendant, KILL what is left at kill_at (default now + kill-timeout), and
        return only when the tree is gone (adopted orphans reaped). Signals that arrive meanwhile are dropped:
        the process they were meant for has exited."""
        procs = _descendants()
        if not procs:
            reap_all()
            return
        self.log(f"{len(procs)} descendant(s) left after the child exited: SIGTERM")
        if kill_at is None:
            kill_at = time.monotonic() + self.kill_timeout
        termed = set()
        while procs:
            if time.monotonic() >= kill_at:
                _signal_procs(procs, signal.SIGKILL)
            else:
                _terminate_procs([p for p in procs if p not in termed])
                termed.update(procs)  # psutil.Process compares by pid and create time
            self.events.wait(min(TREE_RECHECK, max(0.0, kill_at - time.monotonic())) or TREE_RECHECK)
            reap_all()
            procs = _descendants()
