"""The Consul HTTP client against a scripted HTTP server on loopback: no Consul, runs in seconds.

The fake server speaks raw HTTP/1.1 so it can also answer what no well-behaved server sends (a malformed status
line, a garbage chunk size, a reset in the middle of an answer). It records every request it received, so a test
can assert that nothing reached it (input refused before sending) or that a create was sent exactly once.
"""

import base64
import gc
import json
import os
import socket
import ssl
import struct
import subprocess
import threading
import time
import warnings
from collections import namedtuple
from urllib.parse import urlsplit

import pytest
from lib.consul_agent import wait_until

from shim import consul
from shim.errors import UsageError

pytestmark = pytest.mark.timeout(30)

Request = namedtuple("Request", "method target path headers body")


class FakeServer:
    """A one-thread-per-connection HTTP/1.1 server. `routes[(method, path)]` is a handler(conn, request) that
    writes the answer and returns True to keep the connection open. Unknown routes answer 404."""

    def __init__(self, family=socket.AF_INET, address=("127.0.0.1", 0), tls=None):
        self.tls = tls  # an ssl.SSLContext: TLS on every connection
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        if family != socket.AF_UNIX:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(address)
        self.listener.listen(16)
        self.routes = {}
        self.requests = []
        self.connections = 0
        self.closed = 0  # connections the client closed (or that we closed)
        self.port = None if family == socket.AF_UNIX else self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self.listener.close()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            if self.tls:
                conn = self.tls.wrap_socket(conn, server_side=True)
            reader = conn.makefile("rb")
            while True:
                line = reader.readline()
                if not line:
                    return
                method, target, _ = line.decode("latin-1").split(" ", 2)
                headers = {}
                while True:
                    h = reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = h.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = reader.read(int(headers.get("content-length", "0")))
                request = Request(method, target, urlsplit(target).path, headers, body)
                self.requests.append(request)
                handler = self.routes.get((method, request.path), answer(404, b"not found"))
                if not handler(conn, request):
                    return
        except OSError:
            return
        finally:
            self.closed += 1
            try:
                conn.close()
            except OSError:
                pass


def respond(conn, status, body=b"", headers=None, close=False):
    head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if close:
        head.append("Connection: close")
    conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    return not close


def answer(status, body=b"", headers=None):
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    return lambda conn, request: respond(conn, status, body, headers)


def raw(data):
    """Send `data` as is, then close."""

    def handler(conn, request):
        conn.sendall(data)
        return False

    return handler


def reset(conn):
    """Close with an RST instead of a FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


KV = [{"Key": "k", "Value": base64.b64encode(b"hello").decode(), "Flags": 0, "ModifyIndex": 7}]


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def client_for(server, verbose=False, log=None, **settings):
    settings.setdefault("addr", f"http://127.0.0.1:{server.port}")
    return consul.Client(consul.Settings(**settings), verbose=verbose, log=log)


# -- answers read right ----------------------------------------------------------------------------------


def test_a_plain_answer_is_read_and_the_connection_kept_alive(server):
    server.routes[("GET", "/v1/kv/k")] = answer(200, KV, {"X-Consul-Index": "7"})
    c = client_for(server)
    for _ in range(3):
        entries, index = c.kv_get("k")
        assert entries[0]["Value"] == b"hello" and index == 7
    assert server.connections == 1


def test_a_chunked_answer_is_read(server):
    body = json.dumps(KV).encode()

    def chunked(conn, request):
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Consul-Index: 8\r\n\r\n"
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 10]), body[i : i + 10]) for i in range(0, len(body), 10))
        conn.sendall(head + chunks + b"0\r\n\r\n")
        return True

    server.routes[("GET", "/v1/kv/k")] = chunked
    entries, index = client_for(server).kv_get("k")
    assert entries[0]["Value"] == b"hello" and index == 8


def test_an_answer_without_length_is_read_to_the_close(server):
    body = json.dumps(KV).encode()
    server.routes[("GET", "/v1/kv/k")] = raw(
        b"HTTP/1.1 200 OK\r\nX-Consul-Index: 9\r\nConnection: close\r\n\r\n" + body
    )
    c = client_for(server)
    assert c.kv_get("k")[0][0]["Value"] == b"hello"
    assert c.kv_get("k")[1] == 9  # and the next call opens a new connection
    assert server.connections == 2


def test_a_missing_key_is_an_empty_list_with_the_index(server):
    server.routes[("GET", "/v1/kv/k")] = answer(404, b"", {"X-Consul-Index": "11"})
    assert client_for(server).kv_get("k") == ([], 11)


def test_a_null_value_is_empty_bytes(server):
    server.routes[("GET", "/v1/kv/k")] = answer(200, [{"Key": "k", "Value": None}], {"X-Consul-Index": "3"})
    assert client_for(server).kv_get("k")[0][0]["Value"] == b""


def test_the_host_header_and_a_path_prefix(server):
    server.routes[("GET", "/consul/v1/kv/a/b")] = answer(200, KV, {"X-Consul-Index": "1"})
    c = client_for(server, addr=f"http://127.0.0.1:{server.port}/consul/")
    c.kv_get("a/b")
    assert server.requests[0].path == "/consul/v1/kv/a/b"
    assert server.requests[0].headers["host"] == f"127.0.0.1:{server.port}"
    assert c.address == f"http://127.0.0.1:{server.port}/consul"


def ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback address (::1)")
def test_ipv6_literal_address_and_bracketed_host_header():
    s = FakeServer(socket.AF_INET6, ("::1", 0))
    try:
        s.routes[("GET", "/v1/kv/k")] = answer(200, KV, {"X-Consul-Index": "1"})
        c = consul.Client(consul.Settings.from_env(env={"CONSUL_HTTP_ADDR": f"[::1]:{s.port}"}))
        assert c.kv_get("k")[1] == 1
        assert s.requests[0].headers["host"] == f"[::1]:{s.port}"
        assert c.address == f"http://[::1]:{s.port}"
    finally:
        s.close()


def test_unix_socket_address(tmp_path):
    path = str(tmp_path / "consul.sock")
    s = FakeServer(socket.AF_UNIX, path)
    try:
        s.routes[("GET", "/v1/kv/k")] = answer(200, KV, {"X-Consul-Index": "5"})
        env = {"CONSUL_HTTP_ADDR": f"unix://{path}", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
        c = consul.Client(consul.Settings.from_env(env=env))
        assert c.kv_get("k") == ([dict(KV[0], Value=b"hello")], 5)
        assert c.kv_get("k")[1] == 5
        assert s.connections == 1
        assert s.requests[0].headers["host"] == "localhost"
        assert c.address == f"unix://{path}"
    finally:
        s.close()


def test_unix_socket_that_is_not_there_is_unreachable_and_never_sent(tmp_path):
    c = consul.Client(consul.Settings(addr=f"unix://{tmp_path}/nothing.sock"))
    with pytest.raises(consul.Unreachable) as e:
        c.kv_get("k")
    assert e.value.transient and e.value.never_sent
    assert "No such file" in str(e.value)


def test_each_thread_has_its_own_connection(server):
    server.routes[("GET", "/v1/kv/k")] = answer(200, KV, {"X-Consul-Index": "1"})
    c = client_for(server)
    c.kv_get("k")
    t = threading.Thread(target=c.kv_get, args=("k",))
    t.start()
    t.join()
    c.kv_get("k")
    assert server.connections == 2
    c.close()
    c.kv_get("k")
    assert server.connections == 3


def test_a_finished_threads_connection_is_closed_with_it(server):
    server.routes[("GET", "/v1/kv/k")] = answer(200, KV, {"X-Consul-Index": "1"})
    c = client_for(server)
    t = threading.Thread(target=c.kv_get, args=("k",))
    t.start()
    t.join()
    del t
    gc.collect()
    wait_until(lambda: server.closed == 1, 5, message="the finished thread's connection to close")


# -- what is transient and what is final ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n",  # a malformed status line
        b"SSH-2.0-OpenSSH_9.2\r\n",  # not HTTP at all
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Consul-Index: 1\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\nX-Consul-Index: 1\r\n\r\n[{",  # the answer broke off
        b"",  # closed without a word
    ],
    ids=["bad-status-line", "not-http", "garbage-chunk-size", "short-body", "closed"],
)
def test_a_broken_answer_is_a_transient_unreachable(server, data):
    server.routes[("GET", "/v1/kv/k")] = raw(data)
    with pytest.raises(consul.Unreachable) as e:
        client_for(server).kv_get("k")
    assert e.value.transient
    assert not e.value.never_sent  # the request went out: a create would be looked up, not resent
    assert "\n" not in str(e.value)


def test_a_reset_in_the_middle_of_an_answer_is_a_transient_unreachable(server):
    def half_then_reset(conn, request):
        conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 500\r\nX-Consul-Index: 1\r\n\r\n[{"Key":')
        time.sleep(0.05)
        reset(conn)
        return False

    server.routes[("GET", "/v1/kv/k")] = half_then_reset
    with pytest.raises(consul.Unreachable) as e:
        client_for(server).kv_get("k")
    assert e.value.transient


def test_a_slow_answer_times_out_at_the_read_timeout(server):
    def slow(conn, request):
        time.sleep(2)
        return respond(conn, 200, b"[]", {"X-Consul-Index": "1"})

    server.routes[("PUT", "/v1/session/renew/s")] = slow
    t0 = time.monotonic()
    with pytest.raises(consul.Unreachable) as e:
        client_for(server).session_renew("s", timeout=(1, 0.3))
    assert time.monotonic() - t0 < 1.5
    assert e.value.transient and "timed out" in str(e.value)


def test_a_blocking_query_read_timeout_outlasts_its_wait(server):
    def after_wait(conn, request):
        time.sleep(0.4)  # what Consul does with ?wait=400ms when nothing changes
        return respond(conn, 200, json.dumps(KV).encode(), {"X-Consul-Index": "7"})

    server.routes[("GET", "/v1/kv/k")] = after_wait
    entries, index = client_for(server).kv_get("k", index=7, wait=0.4, timeout=0.1)
    assert index == 7
    assert "wait=400ms" in server.requests[0].target and "index=7" in server.requests[0].target


@pytest.mark.parametrize("status, transient", [(500, True), (502, True), (503, True), (429, True), (400, False),
                                               (405, False), (409, False)])  # fmt: skip
def test_unexpected_statuses(server, status, transient):
    server.routes[("PUT", "/v1/session/destroy/s")] = answer(status, b"something went wrong\nsecond line")
    with pytest.raises(consul.HTTPError) as e:
        client_for(server).session_destroy("s")
    assert e.value.status == status and e.value.transient is transient
    message = str(e.value)
    assert f"PUT /v1/session/destroy/s -> {status}" in message and "\n" not in message


def test_a_redirect_is_final_and_never_followed(server):
    server.routes[("GET", "/v1/kv/k")] = answer(301, b"", {"Location": f"http://127.0.0.1:{server.port}/elsewhere"})
    with pytest.raises(consul.HTTPError) as e:
        client_for(server).kv_get("k")
    assert e.value.status == 301 and not e.value.transient
    assert "GET /v1/kv/k -> 301" in str(e.value) and "redirect" in str(e.value)
    assert [r.path for r in server.requests] == ["/v1/kv/k"]


def test_403_is_permission_denied_naming_the_rule(server):
    server.routes[("PUT", "/v1/session/create")] = answer(403, b"Permission denied")
    with pytest.raises(consul.PermissionDenied) as e:
        client_for(server).session_create("n", "15s", "15s")
    assert "session_prefix" in str(e.value) and "no token" in str(e.value)
    assert e.value.code == 77 and not e.value.transient
    assert len(server.requests) == 1


def test_a_txn_refused_for_permission_is_permission_denied(server):
    errors = {"Errors": [{"OpIndex": 0, "What": "Permission denied"}], "Results": None}
    server.routes[("PUT", "/v1/txn")] = answer(409, errors)
    with pytest.raises(consul.PermissionDenied) as e:
        client_for(server, token="t0k").txn_op({"Verb": "lock", "Key": "consul-locker/x/.lock", "Session": "s"})
    assert 'key_prefix "consul-locker/x/"' in str(e.value)


def test_a_txn_refused_otherwise_is_an_error_text(server):
    server.routes[("PUT", "/v1/txn")] = answer(409, {"Errors": [{"OpIndex": 0, "What": "index is stale"}]})
    assert client_for(server).txn_op({"Verb": "cas", "Key": "k", "Index": 3}) == (None, "index is stale")


def test_malformed_json_in_a_200_is_a_bad_answer(server):
    server.routes[("GET", "/v1/kv/k")] = answer(200, b"[{not json", {"X-Consul-Index": "1"})
    with pytest.raises(consul.BadAnswer):
        client_for(server).kv_get("k")


def test_a_kv_answer_without_index_is_a_bad_answer(server):
    server.routes[("GET", "/v1/kv/k")] = answer(200, KV)
    with pytest.raises(consul.BadAnswer):
        client_for(server).kv_get("k")


def test_refused_connection_is_unreachable_and_never_sent():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(consul.Unreachable) as e:
        consul.Client(consul.Settings(addr=f"127.0.0.1:{port}")).session_renew("s")
    assert e.value.transient and e.value.never_sent
    assert "refused" in str(e.value).lower()


def test_name_resolution_is_bounded_by_the_connect_timeout(monkeypatch):
    real = socket.getaddrinfo

    def hanging(host, *args, **kwargs):
        if host == "consul.example":
            time.sleep(3)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    c = consul.Client(consul.Settings(addr="consul.example:8500"))
    t0 = time.monotonic()
    with pytest.raises(consul.Unreachable) as e:
        c.session_renew("s", timeout=(0.3, 5))
    assert time.monotonic() - t0 < 2
    assert e.value.never_sent and "resolving consul.example" in str(e.value)


# -- a session create is never sent twice ---------------------------------------------------------------------


def test_a_lost_create_answer_is_recovered_by_the_session_name(server):
    def create_then_drop(conn, request):
        time.sleep(0.05)
        reset(conn)
        return False

    name = "consul-locker x host:123 nonce"
    server.routes[("PUT", "/v1/session/create")] = create_then_drop
    listing = [{"ID": "other", "Name": "someone else"}, {"ID": "ours", "Name": name, "CreateIndex": 5}]
    server.routes[("GET", "/v1/session/list")] = answer(200, listing)
    assert client_for(server).session_create(name, "15s", "15s") == "ours"
    assert [r.path for r in server.requests] == ["/v1/session/create", "/v1/session/list"]


def test_a_create_timed_out_is_recovered_too(server):
    def create_slowly(conn, request):
        time.sleep(1)
        return False

    server.routes[("PUT", "/v1/session/create")] = create_slowly
    server.routes[("GET", "/v1/session/list")] = answer(200, [{"ID": "ours", "Name": "n1"}])
    assert client_for(server).session_create("n1", "15s", "15s", timeout=(1, 0.3)) == "ours"
    assert sum(r.path == "/v1/session/create" for r in server.requests) == 1


def test_a_lost_create_that_did_not_happen_raises_unreachable(server):
    server.routes[("PUT", "/v1/session/create")] = raw(b"")
    server.routes[("GET", "/v1/session/list")] = answer(200, [])
    with pytest.raises(consul.Unreachable):
        client_for(server).session_create("n2", "15s", "15s")
    assert sum(r.path == "/v1/session/create" for r in server.requests) == 1


def test_a_lost_create_whose_lookup_fails_raises_unreachable(server):
    server.routes[("PUT", "/v1/session/create")] = raw(b"")
    server.routes[("GET", "/v1/session/list")] = raw(b"")
    with pytest.raises(consul.Unreachable) as e:
        client_for(server).session_create("n3", "15s", "15s")
    assert "session list" in str(e.value)
    assert sum(r.path == "/v1/session/create" for r in server.requests) == 1


def test_a_create_answered_by_a_gateway_timeout_is_looked_up_before_giving_up(server):
    # A gateway's 502/504 may come after Consul made the session.
    server.routes[("PUT", "/v1/session/create")] = answer(504, b"gateway timeout")
    server.routes[("GET", "/v1/session/list")] = answer(200, [{"ID": "ours", "Name": "n4"}])
    assert client_for(server).session_create("n4", "15s", "15s") == "ours"


def test_a_create_refused_by_consul_is_not_looked_up(server):
    server.routes[("PUT", "/v1/session/create")] = answer(500, b"No cluster leader")
    with pytest.raises(consul.HTTPError) as e:
        client_for(server).session_create("n5", "15s", "15s")
    assert e.value.transient and "No cluster leader" in str(e.value)
    assert [r.path for r in server.requests] == ["/v1/session/create"]


def test_a_create_refused_before_connecting_is_not_looked_up():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(consul.Unreachable) as e:
        consul.Client(consul.Settings(addr=f"127.0.0.1:{port}")).session_create("n6", "15s", "15s")
    assert "session list" not in str(e.value)


def test_session_info(server):
    server.routes[("GET", "/v1/session/info/abc")] = answer(200, [{"ID": "abc", "Name": "n", "Node": "node1"}])
    server.routes[("GET", "/v1/session/info/gone")] = answer(200, b"null")
    server.routes[("GET", "/v1/session/info/empty")] = answer(200, [])
    server.routes[("GET", "/v1/session/info/denied")] = answer(403, b"Permission denied")
    c = client_for(server)
    assert c.session_info("abc")["Node"] == "node1"
    assert c.session_info("gone") is None and c.session_info("empty") is None
    with pytest.raises(consul.PermissionDenied):
        c.session_info("denied")


def test_session_renew_404_is_false(server):
    server.routes[("PUT", "/v1/session/renew/s")] = answer(404, b"Session id 's' not found")
    assert client_for(server).session_renew("s") is False


# -- headers: checked before sending, secrets never logged ----------------------------------------------------


@pytest.mark.parametrize("token", ["abc\r\nX-Injected: 1", "abc\ndef", "t\u00f6ken", "tok en", "tok\x00"])
def test_a_token_that_cannot_be_a_header_is_a_usage_error_and_nothing_is_sent(server, token):
    env = {"CONSUL_HTTP_ADDR": f"127.0.0.1:{server.port}", "CONSUL_HTTP_TOKEN": token}
    with pytest.raises(UsageError) as e:
        consul.Settings.from_env(env=env)
    assert e.value.code == 2 and "\n" not in str(e.value) and token not in str(e.value)
    with pytest.raises(UsageError):
        consul.Client(consul.Settings(addr=f"127.0.0.1:{server.port}", token=token))
    time.sleep(0.05)
    assert server.connections == 0


def test_a_token_file_that_is_not_utf8_or_unreadable_is_a_usage_error(tmp_path):
    bad = tmp_path / "token"
    bad.write_bytes(b"\xff\xfe token")
    with pytest.raises(UsageError) as e:
        consul.Settings.from_env(env={"CONSUL_HTTP_TOKEN_FILE": str(bad)})
    assert "UTF-8" in str(e.value)
    with pytest.raises(UsageError):
        consul.Settings.from_env(env={}, token_file=str(tmp_path / "missing"))


def test_auth_with_a_line_break_is_a_usage_error(server):
    with pytest.raises(UsageError):
        consul.Settings.from_env(env={"CONSUL_HTTP_AUTH": "user:pa\r\nss"})


def test_token_and_basic_auth_are_sent_and_never_logged(server):
    server.routes[("GET", "/v1/kv/k")] = answer(200, KV, {"X-Consul-Index": "1"})
    lines = []
    env = {
        "CONSUL_HTTP_ADDR": f"http://127.0.0.1:{server.port}",
        "CONSUL_HTTP_TOKEN": "s3cr3t-token",
        "CONSUL_HTTP_AUTH": "alice:pa ss:word",
    }
    c = consul.Client(consul.Settings.from_env(env=env), verbose=True, log=lines.append)
    c.kv_get("k")
    headers = server.requests[0].headers
    assert headers["x-consul-token"] == "s3cr3t-token"
    assert headers["authorization"] == "Basic " + base64.b64encode(b"alice:pa ss:word").decode()
    assert any(line.startswith("-> GET /v1/kv/k") for line in lines), lines
    assert not any("s3cr3t" in line or "pa ss:word" in line for line in lines), lines


def test_the_datacenter_goes_in_the_query(server):
    server.routes[("GET", "/v1/kv/k")] = answer(200, KV, {"X-Consul-Index": "1"})
    consul.Client(consul.Settings.from_env(env={"CONSUL_HTTP_ADDR": f"127.0.0.1:{server.port}"},
                                           datacenter="dc 2")).kv_get("k")  # fmt: skip
    assert "dc=dc+2" in server.requests[0].target


# -- addresses -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "addr, ssl, expected",
    [
        ("127.0.0.1:8500", False, ("http", "127.0.0.1", 8500, "", "")),
        ("http://consul.service:8501", False, ("http", "consul.service", 8501, "", "")),
        ("https://consul.service", False, ("https", "consul.service", 443, "", "")),
        ("consul.service:8501", True, ("https", "consul.service", 8501, "", "")),
        ("http://consul.service:8501", True, ("https", "consul.service", 8501, "", "")),  # as the CLI: TLS wins
        ("[::1]:8500", False, ("http", "::1", 8500, "", "")),
        ("http://[fe80::1]:8500/", False, ("http", "fe80::1", 8500, "", "")),
        ("https://gw.example:443/consul/", False, ("https", "gw.example", 443, "/consul", "")),
        ("unix:///var/run/consul/http.sock", False, ("http", "localhost", None, "", "/var/run/consul/http.sock")),
    ],
)
def test_addresses_as_the_cli_reads_them(addr, ssl, expected):
    assert tuple(consul._parse_addr(addr, ssl)) == expected


@pytest.mark.parametrize(
    "addr", ["ftp://host:21", "host:99999", "host:port", "unix://", "http://user:pw@host:8500", "http://", "h st:1"]
)
def test_unsupported_addresses_are_usage_errors(addr):
    with pytest.raises(UsageError) as e:
        consul.Settings.from_env(env={"CONSUL_HTTP_ADDR": addr})
    assert e.value.code == 2 and "\n" not in str(e.value)


# -- proxies -------------------------------------------------------------------------------------------------


def endpoint(addr):
    return consul._parse_addr(addr, False)


@pytest.mark.parametrize(
    "addr, env, proxy",
    [
        ("http://consul.example:8500", {"HTTP_PROXY": "proxy:3128"}, "http://proxy:3128"),
        ("http://consul.example:8500", {"http_proxy": "http://p:1"}, "http://p:1"),
        ("http://consul.example:8500", {"HTTP_PROXY": "http://P:1", "http_proxy": "http://p:1"}, "http://P:1"),
        ("https://consul.example:8501", {"HTTP_PROXY": "http://p:1"}, ""),
        ("https://consul.example:8501", {"HTTPS_PROXY": "https://p:1"}, "https://p:1"),
        ("http://consul.example:8500", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "ample"}, "http://p:1"),
        ("http://consul.example:8500", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "x.org, example"}, ""),
        ("http://consul.example:8500", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "consul.example"}, ""),
        ("http://consul.example:8500", {"HTTP_PROXY": "http://p:1", "no_proxy": ".example"}, ""),
        ("http://example:8500", {"HTTP_PROXY": "http://p:1", "NO_PROXY": ".example"}, "http://p:1"),
        ("http://example:8500", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "*.example"}, "http://p:1"),
        ("http://a.example:8500", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "example:8500"}, ""),
        ("http://a.example:8500", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "example:9000"}, "http://p:1"),
        ("http://10.1.2.3:8500", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "10.0.0.0/8"}, ""),
        ("http://10.1.2.3:8500", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "10.1.2.3"}, ""),
        ("http://10.1.2.3:8500", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "10.1.2.4"}, "http://p:1"),
        ("http://consul.example:8500", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "*"}, ""),
        ("http://consul.example:8500", {"HTTP_PROXY": "http://p:1", "REQUEST_METHOD": "GET"}, ""),
        # never for loopback or localhost, whatever NO_PROXY says
        ("http://127.0.0.1:8500", {"HTTP_PROXY": "http://p:1"}, ""),
        ("http://127.3.4.5:8500", {"HTTP_PROXY": "http://p:1"}, ""),
        ("http://localhost:8500", {"HTTP_PROXY": "http://p:1"}, ""),
        ("http://[::1]:8500", {"HTTP_PROXY": "http://p:1"}, ""),
        ("https://localhost:8501", {"HTTPS_PROXY": "http://p:1"}, ""),
    ],
)
def test_proxy_choice_is_go_net_http_s(addr, env, proxy):
    assert consul._proxy_for(endpoint(addr), env) == proxy


def test_a_socks_proxy_is_a_usage_error():
    env = {"CONSUL_HTTP_ADDR": "consul.example:8500", "HTTP_PROXY": "socks5://user:pw@p:1080"}
    with pytest.raises(UsageError) as e:
        consul.Settings.from_env(env=env)
    assert "pw" not in str(e.value)


def test_http_proxy_from_the_environment_carries_requests_to_a_remote_name(server):
    # The made-up name resolves nowhere: only the proxy (a fake on loopback) ever sees it.
    server.routes[("GET", "/v1/kv/k")] = answer(200, KV, {"X-Consul-Index": "4"})
    env = {"CONSUL_HTTP_ADDR": "consul.invalid:8500", "HTTP_PROXY": f"127.0.0.1:{server.port}"}
    c = consul.Client(consul.Settings.from_env(env=env))
    assert c.kv_get("k")[1] == 4
    assert server.requests[0].target == "http://consul.invalid:8500/v1/kv/k"


def test_https_proxy_gets_a_connect_for_a_remote_name(server):
    server.routes[("CONNECT", "")] = answer(403, b"no")
    env = {"CONSUL_HTTP_ADDR": "https://consul.invalid:8501", "HTTPS_PROXY": f"http://127.0.0.1:{server.port}"}
    with pytest.raises(consul.Unreachable):
        consul.Client(consul.Settings.from_env(env=env)).kv_get("k")
    assert server.requests[0].method == "CONNECT" and server.requests[0].target == "consul.invalid:8501"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_loopback_agent_is_never_reached_through_the_proxy(server, host):
    proxy = FakeServer()
    try:
        server.routes[("GET", "/v1/kv/k")] = answer(200, KV, {"X-Consul-Index": "4"})
        env = {
            "CONSUL_HTTP_ADDR": f"http://{host}:{server.port}",
            "HTTP_PROXY": f"http://127.0.0.1:{proxy.port}",
            "http_proxy": f"http://127.0.0.1:{proxy.port}",
        }
        assert consul.Client(consul.Settings.from_env(env=env)).kv_get("k")[1] == 4
        assert len(server.requests) == 1 and not proxy.requests and proxy.connections == 0
    finally:
        proxy.close()


def test_a_settings_made_by_hand_ignores_the_proxy_environment(server, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    server.routes[("GET", "/v1/kv/k")] = answer(200, KV, {"X-Consul-Index": "4"})
    assert client_for(server, addr=f"http://127.0.0.1:{server.port}").kv_get("k")[1] == 4


# -- TLS -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """A TLS server on loopback whose certificate names only consul.example; records the SNI names it was sent."""
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=consul",
                    "-addext", "subjectAltName=DNS:consul.example", "-keyout", d / "key.pem", "-out", d / "cert.pem"],
                   check=True, capture_output=True)  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(d / "cert.pem", d / "key.pem")
    sni = []
    context.sni_callback = lambda sock, name, ctx: sni.append(name)
    s = FakeServer(tls=context)
    s.sni = sni
    s.routes[("PUT", "/v1/session/destroy/s")] = answer(200, b"true")
    s.ca = str(d / "cert.pem")
    yield s
    s.close()


def tls_client(server, **env):
    return consul.Client(consul.Settings.from_env(env={"CONSUL_HTTP_ADDR": f"https://127.0.0.1:{server.port}", **env}))


def test_tls_server_name_is_sent_and_checked(tls_server):
    client = tls_client(tls_server, CONSUL_CACERT=tls_server.ca, CONSUL_TLS_SERVER_NAME="consul.example:8501")
    client.session_destroy("s")
    assert tls_server.sni[-1] == "consul.example"


@pytest.mark.parametrize("env", [{}, {"CONSUL_TLS_SERVER_NAME": "elsewhere.example"}], ids=["unknown-ca", "wrong-name"])
def test_a_certificate_that_does_not_verify_is_final(tls_server, env):
    with pytest.raises(consul.ConsulError) as e:
        tls_client(tls_server, **env).session_destroy("s")
    assert not e.value.transient and "certificate" in str(e.value)


def test_verification_off_works_and_warns_nothing(tls_server):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tls_client(tls_server, CONSUL_HTTP_SSL_VERIFY="false").session_destroy("s")


def test_missing_tls_files_are_usage_errors(tmp_path):
    for settings in (
        consul.Settings(addr="https://127.0.0.1:8501", ca_file=str(tmp_path / "nope.pem")),
        consul.Settings(addr="https://127.0.0.1:8501", client_cert=str(tmp_path / "c.pem")),
    ):
        with pytest.raises(UsageError):
            consul.Client(settings)


def test_server_name_drops_a_port():
    assert consul._server_name("consul.example:8501") == "consul.example"
    assert consul._server_name("[::1]:8501") == "::1"
    assert consul._server_name("localhost") == "localhost"


def test_the_module_still_exports_the_error_classes():
    from shim import errors

    assert consul.Unreachable is errors.Unreachable and consul.HTTPError is errors.HTTPError
    assert consul.PermissionDenied is errors.PermissionDenied and consul.BadAnswer is errors.BadAnswer
    assert consul.ConsulError is errors.ConsulError
    assert os.path.basename(consul.__file__) == "consul.py"
