"""A fault-injecting TCP proxy on loopback, for putting network trouble between consul-locker and an agent.

    proxy = FaultProxy(("127.0.0.1", agent.http_port)).start()
    env = locker_env(agent, CONSUL_HTTP_ADDR=proxy.addr)
    proxy.cut()     # a partition: nothing passes either way, no RST, new connections hang
    proxy.heal()    # the partition ends: what was held back is delivered, as TCP retransmission would
    proxy.drop()    # every open connection is reset (RST), as by a restarted agent or a NAT timeout
    proxy.close()

A cut holds bytes back rather than throwing them away: a real network cut loses packets, but TCP resends them
once the path is back, so the peers see a stall, never a corrupted stream. One thread per direction per
connection; each waits for the proxy to be "flowing" before it passes on what it read.
"""

import os
import socket
import struct
import subprocess
import sys
import threading
import time

from lib.consul_agent import wait_until


class FaultProxy:
    def __init__(self, upstream, listen=("127.0.0.1", 0)):
        self.upstream = upstream
        self._listener = socket.create_server(listen)
        self.port = self._listener.getsockname()[1]
        self.addr = f"http://127.0.0.1:{self.port}"
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._conns = set()  # every socket of every open connection, both sides
        self.accepted = 0

    def start(self):
        threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True).start()
        return self

    # -- faults --------------------------------------------------------------------------------------------
    def cut(self):
        self._flowing.clear()

    def heal(self):
        self._flowing.set()

    def drop(self):
        """Reset every open connection (SO_LINGER 0 makes close() send RST)."""
        with self._lock:
            conns, self._conns = self._conns, set()
        for s in conns:
            _reset(s)

    def close(self):
        self._closed.set()
        self._flowing.set()
        self._listener.close()
        self.drop()

    # -- plumbing ------------------------------------------------------------------------------------------
    def _wait_flowing(self):
        while not self._flowing.wait(0.05):
            if self._closed.is_set():
                return False
        return not self._closed.is_set()

    def _accept_loop(self):
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client):
        with self._lock:
            self._conns.add(client)
        # During a cut a new connection is accepted (the kernel does that) but goes nowhere until healed.
        if not self._wait_flowing():
            _reset(client)
            return
        try:
            server = socket.create_connection(self.upstream, timeout=5)
            server.settimeout(None)
        except OSError:
            _reset(client)
            return
        with self._lock:
            if client not in self._conns:  # dropped while we connected
                _reset(server)
                return
            self._conns.add(server)
        other = threading.Thread(target=self._pump, args=(client, server), daemon=True)
        other.start()
        self._pump(server, client)
        other.join()
        with self._lock:
            self._conns.discard(client)
            self._conns.discard(server)
        client.close()
        server.close()

    def _pump(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not self._wait_flowing():
                    break
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            # One side failed or was reset: reset the other side too, as a broken path would.
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            _reset(src)
            _reset(dst)


def _reset(sock):
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


# -- tools shared by the fault tests ---------------------------------------------------------------------------

# The child the fault tests run under the lock. It logs "start", "term" (SIGTERM arrived) and "end" lines with
# CLOCK_MONOTONIC times (system-wide on Linux, so comparable with the test's time.monotonic()) to DIR/events,
# then waits for DIR/go to exist and exits with CODE. On SIGTERM it exits 0 at once: the shim must still report
# the lost lock with its own code, not the child's.
CHILD_SOURCE = r"""
import os, signal, sys, time
d, code = sys.argv[1], int(sys.argv[2])
def log(what):
    with open(os.path.join(d, "events"), "a") as f:
        f.write(f"{what} {time.monotonic()} {os.getpid()} {os.environ.get('CONSUL_LOCK_SESSION', '')}\n")
def term(signum, frame):
    log("term")
    os._exit(0)
signal.signal(signal.SIGTERM, term)
log("start")
while not os.path.exists(os.path.join(d, "go")):
    time.sleep(0.01)
log("end")
sys.exit(code)
"""


class Child:
    """The argv of a logging child (see CHILD_SOURCE) and access to what it logged."""

    def __init__(self, directory, code=0):
        self.dir = str(directory)
        os.makedirs(self.dir, exist_ok=True)
        self.argv = [sys.executable, "-c", CHILD_SOURCE, self.dir, str(code)]

    def events(self):
        """[(what, monotonic time, pid, session)] in the order logged."""
        try:
            with open(os.path.join(self.dir, "events")) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            what, t, pid, *session = line.split()
            out.append((what, float(t), int(pid), session[0] if session else ""))
        return out

    def event(self, what):
        """The first event named `what`, or None."""
        return next((e for e in self.events() if e[0] == what), None)

    def wait(self, what, timeout):
        return wait_until(lambda: self.event(what), timeout, message=f"child event {what!r} in {self.dir}")

    def go(self):
        open(os.path.join(self.dir, "go"), "w").close()


class Watched:
    """A consul-locker process whose stderr lines are collected, each with the monotonic time it was read."""

    def __init__(self, argv, env):
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines = []  # [(time, line)]
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def stderr(self):
        return "\n".join(line for _, line in self.lines)

    def lines_with(self, text, after=0.0):
        return [(t, line) for t, line in list(self.lines) if text in line and t >= after]

    def wait_line(self, text, timeout, after=0.0):
        """The first stderr line containing text and read at or after `after`: (time, line)."""
        found = wait_until(lambda: self.lines_with(text, after), timeout, message=f"stderr line with {text!r}")
        return found[0]

    def wait(self, timeout):
        """Exit code; stderr is complete when this returns."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._reader.join(5)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
