"""Reaching Consul as the consul CLI does, on real agents: a unix socket, basic auth and a path prefix through a
reverse proxy, proxy variables that must not capture a loopback agent, and a session create whose answer is lost.
"""

import base64
import http.client
import http.server
import os
import shutil
import socket
import struct
import tempfile
import threading
import uuid

import pytest
from lib.consul_agent import Agent
from lib.locker import Runner, assert_no_session, locker_env, sessions_named

from shim import consul as consul_api

pytestmark = pytest.mark.timeout(60)


class RecordingProxy:
    """A reverse proxy on loopback in front of an agent: records each request's method, path and headers, strips
    an optional path prefix (Consul behind a gateway), and can lose the answer to chosen requests (it forwards
    the request, lets Consul act on it, then resets the client's connection instead of answering)."""

    def __init__(self, agent, prefix=""):
        self.agent, self.prefix = agent, prefix
        self.requests = []
        self.lose_answer_to = set()  # (method, path) pairs
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.requests.append((self.command, self.path, dict(self.headers)))
                if not self.path.startswith(proxy.prefix + "/"):
                    return self.reply(404, {}, b"no such prefix")
                path = self.path[len(proxy.prefix) :]
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.agent.http_port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "authorization")}
                    upstream.request(self.command, path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                if (self.command, path.partition("?")[0]) in proxy.lose_answer_to:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                keep = ("X-Consul-Index", "Content-Type")
                self.reply(answer.status, {k: answer.headers[k] for k in keep if answer.headers.get(k)}, data)

            def reply(self, status, headers, data):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_DELETE = do_POST = forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.addr = f"http://127.0.0.1:{self.server.server_address[1]}{prefix}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recording(consul):
    proxy = RecordingProxy(consul)
    yield proxy
    proxy.close()


# -- unix socket ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unix_agent(tmp_path_factory):
    # A short path: a unix socket's path has a small length limit, tmp_path's can exceed it.
    sock_dir = tempfile.mkdtemp(prefix="cl-sock-")
    sock = os.path.join(sock_dir, "http.sock")
    # TCP too, for the test's own look at the agent (sessions_named); consul-locker uses only the socket.
    agent = Agent("unix", config={"addresses": {"http": f"127.0.0.1 unix://{sock}"}},
                  log_dir=str(tmp_path_factory.mktemp("unix")))  # fmt: skip
    agent.socket = sock
    agent.start()
    yield agent
    agent.cleanup()
    shutil.rmtree(sock_dir, ignore_errors=True)


def test_consul_locker_runs_a_command_through_a_unix_socket_agent(unix_agent, name):
    env = locker_env(unix_agent, CONSUL_HTTP_ADDR=f"unix://{unix_agent.socket}", HTTP_PROXY="http://127.0.0.1:9")
    r = Runner(unix_agent).run(
        "-v", name, "sh", "-c", 'test "$CONSUL_LOCK_HELD" = true && test -n "$CONSUL_LOCK_SESSION"', env=env
    )
    assert r.returncode == 0, r.stderr
    assert "-> PUT /v1/session/create" in r.stderr
    assert_no_session(unix_agent, name)


def test_the_client_holds_a_session_through_a_unix_socket(unix_agent, name):
    c = consul_api.Client(consul_api.Settings.from_env(env={"CONSUL_HTTP_ADDR": f"unix://{unix_agent.socket}"}))
    sid = c.session_create(f"{name} {uuid.uuid4()}", "15s", "0s")
    try:
        assert c.session_info(sid)["Node"] == "unix"
        assert c.session_renew(sid)
    finally:
        c.session_destroy(sid)
    assert c.session_info(sid) is None and not c.session_renew(sid)


# -- basic auth and a path prefix through a reverse proxy ----------------------------------------------------


def test_basic_auth_reaches_the_gateway_and_is_never_logged(consul, recording, locker, name):
    env = locker_env(consul, CONSUL_HTTP_ADDR=recording.addr, CONSUL_HTTP_AUTH="alice:open sesame")
    r = locker.run("-v", name, "sh", "-c", "exit 3", env=env)
    assert r.returncode == 3, r.stderr
    assert recording.requests, "nothing went through the proxy"
    expected = "Basic " + base64.b64encode(b"alice:open sesame").decode()
    assert all(headers.get("Authorization") == expected for _, _, headers in recording.requests)
    assert "open sesame" not in r.stderr
    assert_no_session(consul, name)


def test_a_path_prefix_in_the_address_is_kept(consul, locker, name):
    gateway = RecordingProxy(consul, prefix="/consul")
    try:
        r = locker.run(name, "sh", "-c", "exit 4", env=locker_env(consul, CONSUL_HTTP_ADDR=gateway.addr + "/"))
        assert r.returncode == 4, r.stderr
        assert all(path.startswith("/consul/v1/") for _, path, _ in gateway.requests), gateway.requests
    finally:
        gateway.close()
    assert_no_session(consul, name)


# -- proxy variables never capture a loopback agent ----------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_dead_http_proxy_does_not_capture_a_loopback_agent(consul, locker, name, host):
    dead = f"http://127.0.0.1:{free_dead_port()}"
    env = locker_env(
        consul,
        CONSUL_HTTP_ADDR=f"http://{host}:{consul.http_port}",
        HTTP_PROXY=dead,
        http_proxy=dead,
        HTTPS_PROXY=dead,
        NO_PROXY="",
    )
    r = locker.run(name, "sh", "-c", "exit 5", env=env)
    assert r.returncode == 5, r.stderr
    assert_no_session(consul, name)


def free_dead_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once this socket is closed


# -- a session create whose answer is lost is adopted, not resent ---------------------------------------------


def test_a_session_create_whose_answer_is_lost_is_adopted(consul, recording, name):
    recording.lose_answer_to.add(("PUT", "/v1/session/create"))
    client = consul_api.Client(consul_api.Settings(addr=recording.addr))
    session_name = f"{name} host:{os.getpid()} {uuid.uuid4().hex}"
    sid = client.session_create(session_name, "15s", "0s")
    try:
        made = sessions_named(consul, session_name)
        assert [s["ID"] for s in made] == [sid]
        creates = [r for r in recording.requests if r[1].startswith("/v1/session/create")]
        assert len(creates) == 1
    finally:
        consul_api.Client(consul_api.Settings(addr=consul.addr)).session_destroy(sid)
