"""Interactive use at a real pseudo-terminal (issue 9, item 6): one Ctrl-C gives the child one SIGINT, not two.

consul-locker runs as a shell would run a foreground job: a process group of its own that is the terminal's
foreground group (here: a session leader whose controlling terminal is the pty). Ctrl-C makes the kernel send
SIGINT to that whole group, the child included; consul-locker must not send it a second one. A signal that the
kernel did not already deliver to the child (`kill -INT` of consul-locker alone) is still forwarded.

On the code before the fixes (SHIM_SRC=/work/snap-old): the plain case FAILED, the child logged SIGINT twice for one
Ctrl-C; with -g (the child's own group takes the terminal) it passed there too.
"""

import fcntl
import os
import signal
import subprocess
import termios
import threading

import pytest
from lib.consul_agent import wait_until
from lib.locker import LOCKER, assert_no_session, locker_env
from lib.probe import probe
from lib.procs import child_pids
from lib.procs import log_lines as lines


class Terminal:
    """consul-locker ARGS at a new pseudo-terminal, as the terminal's foreground process group."""

    def __init__(self, args, env):
        self.master, slave = os.openpty()
        self.output = bytearray()
        self.proc = subprocess.Popen(
            LOCKER + [str(a) for a in args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,  # a session (and process group) of its own ...
            preexec_fn=_take_controlling_terminal,  # ... whose controlling terminal is the pty
        )
        os.close(slave)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO once no process has the terminal open any more
                return
            if not data:
                return
            self.output += data

    def type(self, data):
        os.write(self.master, data)

    def text(self):
        return self.output.decode(errors="replace")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        self._reader.join(5)


def _take_controlling_terminal():
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("group", [[], ["-g"]], ids=["same-group", "own-group"])
def test_one_ctrl_c_at_a_terminal_gives_the_child_one_sigint(consul, name, tmp_path, group):
    # The child logs every SIGINT and SIGUSR1 it gets (one line each), touches READY once its handlers are in place.
    log, ready = tmp_path / "signals", tmp_path / "ready"
    term = Terminal([*group, name, *probe("signals", log, ready, "SIGINT,SIGUSR1")], locker_env(consul))
    try:
        wait_until(lambda: ready.exists() or term.proc.poll() is not None, 20, message="the child at the terminal")
        assert term.proc.poll() is None, term.text()
        fg = os.tcgetpgrp(term.master)
        assert fg == (term.proc.pid if not group else os.getpgid(child_pids(term.proc.pid)[0])), "not the foreground"
        for press in range(1, 4):
            term.type(b"\x03")  # Ctrl-C: the kernel sends SIGINT to the terminal's foreground process group
            wait_until(lambda: lines(log).count("SIGINT") >= press, 10, message="the child's SIGINT")  # noqa: B023
            # A barrier: a signal consul-locker forwards after anything it would have forwarded for the Ctrl-C.
            os.kill(term.proc.pid, signal.SIGUSR1)
            wait_until(lambda: lines(log).count("SIGUSR1") >= press, 10, message="the forwarded SIGUSR1")  # noqa: B023
            assert lines(log) == ["SIGINT", "SIGUSR1"] * press, f"{press} Ctrl-C, the child got: {lines(log)}"
        # A SIGINT sent to consul-locker alone (not by the terminal) is still forwarded, once.
        os.kill(term.proc.pid, signal.SIGINT)
        wait_until(lambda: len(lines(log)) >= 7, 10, message="the forwarded SIGINT")
        os.kill(term.proc.pid, signal.SIGUSR1)
        wait_until(lambda: len(lines(log)) >= 8, 10, message="the last SIGUSR1")
        assert lines(log) == ["SIGINT", "SIGUSR1"] * 4, lines(log)
        os.kill(term.proc.pid, signal.SIGTERM)
        assert term.proc.wait(20) == 128 + signal.SIGTERM, term.text()
    finally:
        term.close()
    assert_no_session(consul, name)
