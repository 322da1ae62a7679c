"""Process entry point. Kept tiny on purpose: it blocks signals before anything else is imported.

Between the exec of the interpreter and the first line of main() there is an unavoidable window (interpreter
start-up, docs/pid1.md) in which every signal has its default disposition. Not PID 1: a SIGTERM/SIGINT/SIGHUP/
SIGQUIT then kills us at once, which is harmless, since no session and no child exist yet. As PID 1 of a PID
namespace the kernel discards such a signal (init is protected from signals it has no handler for), so a stop
request in that window is lost; the runtime's SIGKILL after its grace period ends us. From the first line of
main() on, every catchable signal is blocked, in every thread, for the whole life: held pending, never discarded
(even as PID 1), and taken one at a time by the supervisor's loop (sigtimedwait).
"""

# The C module behind `signal`: it is built into the interpreter, whereas `import signal` loads more modules
# first, inside the window above.
import _signal


def main(argv=None):
    _signal.pthread_sigmask(_signal.SIG_BLOCK, _signal.valid_signals() - {_signal.SIGKILL, _signal.SIGSTOP})
    from shim.cli import main as cli_main

    return cli_main(argv)
