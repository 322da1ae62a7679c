"""Process entry point. Kept tiny on purpose: it blocks signals before anything heavy is imported.

Between the exec of the interpreter and this function there is an unavoidable window (interpreter start-up,
~20 ms) in which a SIGTERM kills us with the default action; that is harmless, since no session and no child
exist yet. From the first line of main() on, every catchable signal is blocked (held pending, not lost) until
the event loop in shim.supervisor installs its handlers and unblocks them.
"""

import signal


def main(argv=None):
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP})
    from shim.cli import main as cli_main

    return cli_main(argv)
