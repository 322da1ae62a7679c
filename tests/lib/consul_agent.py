"""Start real Consul agents on free loopback ports, for the tests and the benchmarks.

`consul` comes from PATH, or else from scripts/install-consul.sh (Debian bullseye's package, unpacked into
.cache/). Each agent gets its own data directory and its own ports, so several can run side by side.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def consul_binary():
    found = shutil.which("consul")
    if found:
        return found
    out = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "install-consul.sh")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    return out.strip().splitlines()[-1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout=10.0, interval=0.02, message="condition"):
    """Poll predicate until it returns a truthy value; raise AssertionError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class Agent:
    """One Consul agent process. `dev=True`: an in-memory single-server dev agent (the default)."""

    def __init__(self, name="dev", dev=True, extra_args=(), config=None, ports=None, log_dir=None):
        self.name = name
        self.dev = dev
        self.extra_args = list(extra_args)
        self.config = config or {}
        self.ports = ports or {k: free_port() for k in ("http", "server", "serf_lan", "serf_wan")}
        self.http_port = self.ports["http"]
        self.addr = f"http://127.0.0.1:{self.http_port}"
        self.data_dir = tempfile.mkdtemp(prefix=f"consul-{name}-")
        self.log_path = os.path.join(log_dir or self.data_dir, f"consul-{name}.log")
        self.proc = None
        self.token = ""

    def command(self):
        cfg = dict(self.config)
        cfg.setdefault("ports", {})
        cfg["ports"].update(
            {
                "http": self.ports["http"],
                "server": self.ports["server"],
                "serf_lan": self.ports["serf_lan"],
                "serf_wan": self.ports["serf_wan"],
                "dns": -1,
                "grpc": -1,
            }
        )
        cfg.setdefault("bind_addr", "127.0.0.1")
        cfg.setdefault("client_addr", "127.0.0.1")
        cfg.setdefault("node_name", self.name)
        cfg.setdefault("log_level", "INFO")
        cfg.setdefault("disable_update_check", True)
        if not self.dev:
            cfg.setdefault("data_dir", self.data_dir)
        cfg_path = os.path.join(self.data_dir, "config.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        cmd = [consul_binary(), "agent", f"-config-file={cfg_path}"]
        if self.dev:
            cmd.append("-dev")
        return cmd + self.extra_args

    def start(self, wait_leader=True, timeout=30.0):
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT)
        if wait_leader:
            self.wait_leader(timeout)
        return self

    def wait_leader(self, timeout=30.0):
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"consul agent {self.name} exited: see {self.log_path}:\n{self.log_tail()}")
            try:
                leader = self.api("GET", "/v1/status/leader")
                if not leader:
                    return False
                # A leader exists; make sure the KV store answers writes and sessions can be made: a fresh agent
                # answers 500 "Missing node registration" to a session create until its node is in the catalog.
                self.api("PUT", "/v1/kv/_consul_locker_ready", b"1")
                sid = self.api("PUT", "/v1/session/create", {"Name": "readiness probe", "TTL": "10s"})["ID"]
                self.api("PUT", f"/v1/session/destroy/{sid}")
                return True
            except (OSError, urllib.error.URLError, ValueError):
                return False

        wait_until(ready, timeout, 0.05, f"consul agent {self.name} to elect a leader")

    def log_tail(self, n=30):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def api(self, method, path, body=None, token=None, timeout=10.0):
        """Minimal HTTP call for fixtures: returns parsed JSON (or text); raises urllib errors on 4xx/5xx."""
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        req = urllib.request.Request(self.addr + path, data=data, method=method)
        tok = token if token is not None else self.token
        if tok:
            req.add_header("X-Consul-Token", tok)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read().decode()
        try:
            return json.loads(text) if text else None
        except ValueError:
            return text

    def sessions(self):
        return self.api("GET", "/v1/session/list") or []

    def kv(self, key):
        """The KV entry of key as a dict, or None."""
        try:
            entries = self.api("GET", "/v1/kv/" + urllib.request.quote(key))
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise
        return entries[0] if entries else None

    def pause(self):
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self):
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.send_signal(sig)
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
