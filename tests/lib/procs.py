"""Starting consul-locker as a test's own process and looking at processes: what the signal, PID-1 and terminal
tests share."""

import os
import subprocess

import psutil

from lib.consul_agent import wait_until
from lib.locker import LOCKER, locker_env


def start(consul, *args, prefix=(), **kw):
    """Start consul-locker ARGS (behind PREFIX, e.g. unshare) against the agent; stdout/stderr captured."""
    kw.setdefault("env", locker_env(consul))
    return subprocess.Popen(
        list(prefix) + LOCKER + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def finish(p, timeout=20):
    """Wait for p; return (returncode, stderr). Kills it (and fails) if it does not end in time."""
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
        raise AssertionError(f"consul-locker did not exit within {timeout}s; stderr:\n{err}") from None
    return p.returncode, err


def wait_file(path, timeout=20, p=None):
    """Wait for PATH to exist; fail early, with the shim's stderr, if the shim P exits first."""

    def ready():
        if p is not None and p.poll() is not None:
            raise AssertionError(f"consul-locker exited with {p.returncode} first:\n{p.stderr.read()}")
        return os.path.exists(path)

    wait_until(ready, timeout, message=f"{path} to appear")


def log_lines(path):
    """The lines of PATH ([] while it does not exist)."""
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def child_of(pid, name, timeout=20):
    """The child process called NAME of process PID (psutil.Process), once it exists."""

    def find():
        try:
            return next((c for c in psutil.Process(pid).children() if c.name() == name), None)
        except psutil.Error:
            return None

    return wait_until(find, timeout, message=f"a child {name} of {pid}")


def child_pids(pid):
    """PIDs of the children of process PID, from /proc ([] once it is gone)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def signal_state(pid):
    """SigBlk, SigIgn, SigCgt of PID as integers (bit N-1 set: signal N)."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    return {k: int(fields[k], 16) for k in ("SigBlk", "SigIgn", "SigCgt")}


def is_gone(proc):
    """True once the psutil.Process has exited (a zombie left to another parent counts as exited)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True
