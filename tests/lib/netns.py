"""A Consul cluster of separate "machines" on one host: one network namespace per node, joined by bridges that live
in a namespace of the test's own, so that node faults (a cut cable, a frozen or killed agent) can be made for real.

    net = Net(log_dir)                        # the hub namespace and its two bridges
    cluster = Cluster(net, data_dir).start()  # 3 servers, 3 client agents, a resource namespace
    cluster.leader()                          # the server that leads Raft now
    net.cut(node) / net.heal(node)            # the node's cable to the Consul network goes down / up
    cluster.api(node, "GET", "/v1/session/list")
    net.close()                               # every process in every namespace killed, every namespace deleted

Layout. Everything lives in namespaces named `cltest-<pid of the test process>-<random>-<role>`; the root
namespace's network is never touched. One private /24 (10.A.B.0/24, chosen at random, existing only inside these
namespaces) is split in two halves, each a bridge in the hub namespace:
  * the Consul network (.0/25): every agent binds there; a partition is the hub side of a node's veth set down,
    so the node's packets are dropped silently, as with a pulled cable (no RST, no "network unreachable");
  * the data network (.128/25): the client nodes and the fenced resource. It stays up during partitions, because
    the case a lock must get right is the node that lost Consul but can still reach the thing the lock protects.
The hub has an address on both halves, so the test can reach every agent's HTTP API from there: `api()` runs the
request in a short-lived thread that switched its own network namespace (setns), the rest of the test process
stays in the root namespace.

No traffic goes anywhere but to these addresses: no default route exists in any namespace, and forwarding is off.
"""

import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

from lib.consul_agent import consul_binary, wait_until

CLONE_NEWNET = 0x40000000
NS_PREFIX = "cltest"
HTTP_PORT = 8500
_STALE = re.compile(rf"^{NS_PREFIX}-(\d+)-[0-9a-f]+-")


def unavailable_reason():
    """Why namespaces cannot be made here, or None. Tries the real thing: a throwaway namespace with a veth."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if not shutil.which("ip"):
        return "the `ip` command (iproute2) is not installed"
    name = f"{NS_PREFIX}-{os.getpid()}-{secrets.token_hex(3)}-probe"
    try:
        _ip("netns", "add", name)
    except subprocess.CalledProcessError as e:
        return f"cannot create a network namespace: {e.stderr.strip()}"
    try:
        _ip("-n", name, "link", "add", "a0", "type", "veth", "peer", "name", "a1")
        _ip("-n", name, "link", "add", "b0", "type", "bridge")
    except subprocess.CalledProcessError as e:
        return f"cannot create a veth pair or a bridge in a namespace: {e.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ns_pids(ns):
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split()]


def _kill_ns_processes(ns):
    """SIGKILL every process whose network namespace is ns (ours or strays, e.g. a child that outlived its shim)."""
    for _ in range(50):
        pids = _ns_pids(ns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _stale(name):
    m = _STALE.match(name)
    return bool(m) and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1)))


def sweep_stale():
    """Delete what runs of this test left behind when their process died (crashed, SIGKILLed, timed out hard):
    namespaces with every process in them, and data directories. Those of a run still alive (another pytest on
    this machine) are left alone. Returns the names removed."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if _stale(name):
            _kill_ns_processes(name)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        if _stale(name):
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
            removed.append(os.path.join(tmp, name))
    return removed


_libc = None


def in_netns(ns, fn, *args, timeout=30.0):
    """Run fn(*args) in a fresh thread that entered network namespace ns; return its result or raise its error.
    Only that thread changes namespace (setns applies to the calling thread), and it ends with the call."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    box = {}

    def run():
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: B036 - handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name=f"in-netns-{ns}", daemon=True)
    deadline = time.monotonic() + min(timeout, 10.0)
    while True:
        try:
            t.start()
            break
        except RuntimeError:
            # "can't start new thread": the machine ran out of PIDs for a moment (other tests fork hard); the
            # call is worth a few tries, the run is not worth failing for it.
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"call in namespace {ns} did not return within {timeout}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy: these are namespace IPs


def _http(url, method, body, timeout):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    with _opener.open(req, timeout=timeout) as resp:
        text = resp.read().decode()
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


class Net:
    """The hub namespace, its two bridges, and every namespace attached to them. close() undoes all of it."""

    def __init__(self):
        self.tag = f"{NS_PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        # 10.A.B.0/24, A and B random: the addresses exist only inside our namespaces, the choice only keeps two
        # runs' logs apart.
        self.net24 = f"10.{secrets.randbelow(200) + 20}.{secrets.randbelow(250) + 1}"
        self.namespaces = []
        self._hub_ports = {}  # (role, network) -> name of the hub-side veth
        self.hub = self._add_ns("hub")
        for bridge, host in (("brctl", 1), ("brdata", 129)):
            _ip("-n", self.hub, "link", "add", bridge, "type", "bridge")
            _ip("-n", self.hub, "addr", "add", f"{self.net24}.{host}/25", "dev", bridge)
            _ip("-n", self.hub, "link", "set", bridge, "up")

    def ns(self, role):
        return f"{self.tag}-{role}"

    def _add_ns(self, role):
        name = self.ns(role)
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def add_node(self, role, ctl_host, data_host=None):
        """A namespace for one machine: eth0 on the Consul network (.ctl_host), eth1 on the data network
        (.128+data_host) if asked. Returns (namespace, ctl address, data address or None)."""
        name = self._add_ns(role)
        ctl = self._attach(name, role, "ctl", "eth0", ctl_host) if ctl_host is not None else None
        data = self._attach(name, role, "data", "eth1", 128 + data_host) if data_host is not None else None
        return name, ctl, data

    def _attach(self, name, role, network, ifname, host):
        port = f"{role[:8]}{network[0]}"  # unique in the hub: roles are short and distinct
        _ip("-n", name, "link", "add", ifname, "type", "veth", "peer", "name", port, "netns", self.hub)
        _ip("-n", self.hub, "link", "set", port, "master", f"br{network}", "up")
        addr = f"{self.net24}.{host}"
        _ip("-n", name, "addr", "add", f"{addr}/25", "dev", ifname)
        _ip("-n", name, "link", "set", ifname, "up")
        self._hub_ports[(role, network)] = port
        return addr

    def cut(self, role, network="ctl"):
        """The node's cable to that network is pulled: the hub side of its veth goes down, packets are dropped."""
        _ip("-n", self.hub, "link", "set", self._hub_ports[(role, network)], "down")

    def heal(self, role, network="ctl"):
        _ip("-n", self.hub, "link", "set", self._hub_ports[(role, network)], "up")

    def popen(self, ns, argv, **kw):
        """Start argv inside namespace ns. `ip netns exec` execs the command, so the Popen's pid is argv's own."""
        return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)

    def call(self, fn, *args, timeout=30.0):
        """fn(*args) run from the hub namespace, which reaches every address of both networks."""
        return in_netns(self.hub, fn, *args, timeout=timeout)

    def close(self):
        """Kill every process in our namespaces, then delete the namespaces (the hub last: it holds the bridges and
        the hub-side veths, which go with it). Safe to call twice, and after a half-made setup."""
        for name in reversed(self.namespaces):
            _kill_ns_processes(name)
            _ip("netns", "del", name, check=False)
        self.namespaces = []


class Agent:
    """One Consul agent in its own namespace. Servers restart with the same data directory (same node ID)."""

    def __init__(self, net, role, config, data_root, log_dir, ctl, data=None):
        self.net, self.role, self.config = net, role, config
        self.ns = net.ns(role)
        self.ctl, self.data = ctl, data
        self.server = bool(config.get("server"))
        self.data_dir = os.path.join(data_root, role)
        os.makedirs(self.data_dir, exist_ok=True)
        self.log_path = os.path.join(log_dir, f"consul-{role}.log")
        self.proc = None
        self.paused = False

    def start(self):
        cfg = dict(self.config, data_dir=self.data_dir)
        path = os.path.join(self.data_dir, "config.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        log = open(self.log_path, "ab")
        try:
            self.proc = self.net.popen(
                self.ns,
                [consul_binary(), "agent", f"-config-file={path}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        self.paused = False
        return self

    @property
    def url(self):
        return f"http://{self.ctl}:{HTTP_PORT}"

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def pause(self):
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self):
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def kill(self):
        if self.running():
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
        self.paused = False

    def log_tail(self, n=20):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


class Cluster:
    """3 Consul servers and 3 client agents, each in its own namespace, and a namespace for the fenced resource.

    Client agents serve HTTP on 127.0.0.1 inside their namespace (what consul-locker on that node uses) and on the
    node's Consul address (what the test's probes use)."""

    def __init__(self, net, data_root, log_dir, servers=3, clients=3):
        self.net, self.data_root, self.log_dir = net, data_root, log_dir
        server_ips = [f"{net.net24}.{10 + i}" for i in range(1, servers + 1)]
        self.servers, self.clients = [], []
        for i, ip in enumerate(server_ips, 1):
            role = f"s{i}"
            net.add_node(role, 10 + i)
            config = self._config(role, ip)
            config.update(server=True, bootstrap_expect=servers, retry_join=[s for s in server_ips if s != ip])
            self.servers.append(Agent(net, role, config, data_root, log_dir, ip))
        for i in range(1, clients + 1):
            role = f"c{i}"
            _, ip, data = net.add_node(role, 20 + i, 20 + i)
            config = self._config(role, ip)
            config.update(server=False, retry_join=server_ips)
            self.clients.append(Agent(net, role, config, data_root, log_dir, ip, data))
        self.resource_ns, _, self.resource_ip = net.add_node("res", None, 10)

    @staticmethod
    def _config(role, ip):
        # What Consul 1.8.7 accepts (checked with `consul validate`). raft_multiplier 1: the production timing of
        # elections and leader leases instead of the relaxed default (5). No DNS, no gRPC: nothing uses them.
        return {
            "node_name": role,
            "datacenter": "dc1",
            "bind_addr": ip,
            "advertise_addr": ip,
            "client_addr": f"127.0.0.1 {ip}",
            "ports": {"http": HTTP_PORT, "dns": -1, "grpc": -1},
            "retry_interval": "1s",
            "raft_protocol": 3,
            "performance": {"raft_multiplier": 1},
            "disable_update_check": True,
            "log_level": "INFO",
        }

    @property
    def agents(self):
        return self.servers + self.clients

    def agent(self, role):
        return next(a for a in self.agents if a.role == role)

    def start(self, timeout=60.0):
        for a in self.agents:
            a.start()
        deadline = time.monotonic() + timeout
        for a in self.servers:
            self.wait_ready(a, max(1.0, deadline - time.monotonic()))
        for a in self.clients:
            self.wait_ready(a, max(1.0, deadline - time.monotonic()))
        return self

    # -- probes, from the hub namespace -------------------------------------------------------------------------
    def api(self, agent, method, path, body=None, timeout=5.0):
        return self.net.call(_http, agent.url + path, method, body, timeout, timeout=timeout + 5)

    def try_api(self, agent, method, path, body=None, timeout=5.0):
        """api(), or None when the agent does not answer or answers an error."""
        try:
            return self.api(agent, method, path, body, timeout)
        except (OSError, urllib.error.URLError, ValueError, TimeoutError):
            return None

    def wait_ready(self, agent, timeout=60.0):
        """The agent answers, knows a leader, and can make sessions (a fresh agent answers 500 to a session create
        until its node is in the catalog)."""

        def ready():
            if not agent.running():
                raise RuntimeError(f"consul agent {agent.role} exited:\n{agent.log_tail()}")
            if not self.try_api(agent, "GET", "/v1/status/leader"):
                return False
            sid = self.try_api(agent, "PUT", "/v1/session/create", {"Name": "netns readiness", "TTL": "10s"}) or {}
            if not isinstance(sid, dict) or "ID" not in sid:
                return False
            self.try_api(agent, "PUT", f"/v1/session/destroy/{sid['ID']}")
            return True

        wait_until(ready, timeout, 0.2, f"consul agent {agent.role} to be ready")

    def leader(self, via=None):
        """The server that leads Raft, as the first answering server (or `via`) sees it; None while there is none."""
        for a in [via] if via else self.servers:
            if not a.running() or a.paused:
                continue
            addr = self.try_api(a, "GET", "/v1/status/leader", timeout=2.0)
            if isinstance(addr, str) and addr:
                ip = addr.rsplit(":", 1)[0]
                return next((s for s in self.servers if s.ctl == ip), None)
        return None

    def agreed_leader(self, exclude=()):
        """A leader that every running, reachable server names (and not one of `exclude`), else None."""
        seen = set()
        for a in self.servers:
            if not a.running() or a in exclude:
                continue
            leader = self.leader(via=a)
            if leader is None or leader in exclude:
                return None
            seen.add(leader.role)
        return self.agent(seen.pop()) if len(seen) == 1 else None

    def health(self):
        """What still keeps the cluster from being whole, or "" when it is: one leader that every server names,
        every server a Raft voter (autopilot re-adds a server that was gone as a non-voter, and promotes it only
        once it has been stable a while: until then, losing one more server loses the quorum), every agent
        alive in the gossip pool and every client agent able to reach a server."""
        leader = self.agreed_leader()
        if leader is None:
            return "no agreed leader"
        config = self.try_api(leader, "GET", "/v1/operator/raft/configuration") or {}
        voters = [s["Node"] for s in config.get("Servers", []) if s.get("Voter")]
        if len(voters) != len(self.servers):
            return f"raft voters {sorted(voters)}"
        members = self.try_api(leader, "GET", "/v1/agent/members") or []
        alive = {m["Name"] for m in members if m.get("Status") == 1}
        missing = sorted(a.role for a in self.agents if a.role not in alive)
        if missing:
            return f"not alive in the gossip pool: {missing}"
        for a in self.clients:
            if not self.try_api(a, "GET", "/v1/status/leader", timeout=2.0):
                return f"{a.role} reaches no server"
        return ""

    def close(self):
        for a in self.agents:
            if a.proc is not None:
                a.kill()
