"""A thin Consul HTTP client: sessions, KV reads (blocking queries), transactions. Typed errors, no retries.

The transport is a minimal HTTP/1.1 client on a socket (one keep-alive connection per thread), not `requests`
(~60 ms and ~8 MiB to import) nor http.client (~17 ms: it pulls in the email parser and ssl): start-up time is
most of an uncontended run. Retry policy is the caller's (shim.lock),
because only the caller knows its deadlines.
"""

import base64
import json
import os
import socket
import threading
from urllib.parse import quote, unquote, urlencode, urlsplit

from shim import sigpipe
from shim.exitcodes import PERMISSION, UNAVAILABLE, ShimError
from shim.log import line as say

DEFAULT_ADDR = "http://127.0.0.1:8500"
# How long a plain (non-blocking) request may take before we call the agent unreachable.
DEFAULT_REQUEST_TIMEOUT = 10.0


class ConsulError(ShimError):
    code = UNAVAILABLE


class Unreachable(ConsulError):
    """No HTTP answer at all: refused, reset, timed out, DNS, TLS handshake."""


class HTTPError(ConsulError):
    def __init__(self, message, status, body):
        super().__init__(message)
        self.status = status
        self.body = body


class PermissionDenied(HTTPError):
    code = PERMISSION


class _Dropped(OSError):
    """The peer closed a kept-alive connection before answering."""


class _Connection:
    """One HTTP/1.1 keep-alive connection: Content-Length and chunked bodies, nothing more than Consul needs."""

    def __init__(self, host, port, ssl_context=None, server_name=""):
        self.host, self.port, self.ssl_context, self.server_name = host, port, ssl_context, server_name
        self.sock = self.reader = None

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = self.reader = None

    def _open(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_hostname=self.server_name or self.host)
        self.sock, self.reader = sock, sock.makefile("rb")

    def request(self, method, target, body, headers, timeout):
        """Return (status, {lower-case header: value}, body bytes). A kept-alive connection that the agent had
        closed while idle is retried once on a fresh one (the request never reached it)."""
        head = f"{method} {target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        payload = body or b""
        head += f"Content-Length: {len(payload)}\r\n\r\n"
        message = head.encode("latin-1") + payload
        for attempt in (1, 2):
            reused = self.sock is not None
            if not reused:
                self._open(timeout)
            self.sock.settimeout(timeout)
            try:
                sigpipe.call(self.sock.sendall, message)
                return self._response()
            except (_Dropped, BrokenPipeError, ConnectionResetError):
                self.close()
                if not reused or attempt == 2:
                    raise _Dropped("connection closed before an answer") from None
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")

    def _line(self):
        line = self.reader.readline(65537)
        if not line:
            raise _Dropped("connection closed")
        return line

    def _response(self):
        parts = self._line().split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise _Dropped(f"not an HTTP answer: {parts!r}")
        status = int(parts[1])
        headers = {}
        while True:
            line = self._line()
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    while self._line() not in (b"\r\n", b"\n"):  # trailers
                        pass
                    break
                chunks.append(self._read(size))
                self._line()
            data = b"".join(chunks)
        else:
            data = self._read(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, data

    def _read(self, n):
        data = self.reader.read(n)
        if len(data) != n:
            raise _Dropped("connection closed mid-answer")
        return data


class _Raw:
    """A request body sent as bytes, not JSON (KV values)."""

    def __init__(self, data):
        self.data = data


def _truthy(value):
    return str(value).strip().lower() in ("1", "t", "true", "yes", "on")


class Settings:
    """Connection settings with the names and precedence of the consul CLI (flags override env).

    A plain class, not a dataclass: `dataclasses` imports `inspect`, ~7 ms of start-up."""

    def __init__(self, addr=DEFAULT_ADDR, token="", datacenter="", ssl=False, ca_file="", ca_path="",
                 client_cert="", client_key="", verify=True, server_name=""):  # fmt: skip
        self.addr, self.token, self.datacenter, self.ssl = addr, token, datacenter, ssl
        self.ca_file, self.ca_path, self.client_cert, self.client_key = ca_file, ca_path, client_cert, client_key
        self.verify, self.server_name = verify, server_name

    @classmethod
    def from_env(cls, env=None, addr=None, token=None, token_file=None, datacenter=None):
        env = os.environ if env is None else env
        tok = token or ""
        if not tok and token_file:
            tok = _read_token(token_file)
        if not tok:
            tok = env.get("CONSUL_HTTP_TOKEN", "")
        if not tok and env.get("CONSUL_HTTP_TOKEN_FILE"):
            tok = _read_token(env["CONSUL_HTTP_TOKEN_FILE"])
        return cls(
            addr=addr or env.get("CONSUL_HTTP_ADDR") or DEFAULT_ADDR,
            token=tok,
            datacenter=datacenter or "",
            ssl=_truthy(env.get("CONSUL_HTTP_SSL", "")),
            ca_file=env.get("CONSUL_CACERT", ""),
            ca_path=env.get("CONSUL_CAPATH", ""),
            client_cert=env.get("CONSUL_CLIENT_CERT", ""),
            client_key=env.get("CONSUL_CLIENT_KEY", ""),
            verify=not ("CONSUL_HTTP_SSL_VERIFY" in env and not _truthy(env["CONSUL_HTTP_SSL_VERIFY"])),
            server_name=env.get("CONSUL_TLS_SERVER_NAME", ""),
        )


def _read_token(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as e:
        raise ShimError(f"cannot read token file {path}: {e.strerror}", code=2) from None


def _split_addr(settings):
    """Return (scheme, host, port) from CONSUL_HTTP_ADDR-style text."""
    addr = settings.addr.strip()
    if "://" not in addr:
        addr = ("https://" if settings.ssl else "http://") + addr
    parts = urlsplit(addr)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ShimError(f"unsupported Consul address {settings.addr!r} (use host:port or http(s)://host:port)", 2)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ShimError(f"bad port in Consul address {settings.addr!r}", 2) from None
    return parts.scheme, parts.hostname, port


def _needed_permission(method, path, body):
    """The ACL rule a denied request needs, in Consul's policy language (for the one-line error)."""
    if path.startswith("/v1/session/"):
        return 'session write on this agent\'s node (session_prefix "" { policy = "write" })'
    if path.startswith("/v1/kv/"):
        keys = [unquote(path[len("/v1/kv/") :])]
        access = "read" if method == "GET" else "write"
    elif path == "/v1/txn" and isinstance(body, list):
        keys = sorted({op["KV"]["Key"] for op in body if "KV" in op})
        access = "write"
    else:
        return "a permission this request needs"
    # The rule is for the key's folder: a semaphore (--limit N) writes contender keys beside .lock.
    rules = {f'key_prefix "{k.rsplit("/", 1)[0] + "/" if "/" in k else k}" {{ policy = "{access}" }}' for k in keys}
    return f"key {access} on {', '.join(keys)} ({'; '.join(sorted(rules))})"


def _raise_if_certificate_refused(error, address):
    """A certificate that does not verify (or that the agent refuses) is a set-up error, not a transient one:
    raise a final ConsulError (exit 69 at once) instead of an Unreachable that would be retried."""
    import ssl

    if isinstance(error, ssl.SSLError) and "CERTIFICATE" in str(error.reason or "").upper():
        detail = getattr(error, "verify_message", "") or error.reason
        raise ConsulError(
            f"TLS with Consul at {address} failed, certificate refused ({detail}) -- check CONSUL_CACERT, "
            "CONSUL_CAPATH, CONSUL_TLS_SERVER_NAME, CONSUL_CLIENT_CERT/KEY (or CONSUL_HTTP_SSL_VERIFY=false)"
        ) from None


class Client:
    def __init__(self, settings, verbose=False, log=None):
        self.settings = settings
        self.scheme, self.host, self.port = _split_addr(settings)
        self.address = f"{self.scheme}://{self.host}:{self.port}"
        self.verbose = verbose
        self._log = log or say
        self._local = threading.local()
        self._ssl_context = self._make_ssl_context() if self.scheme == "https" else None

    # -- transport ---------------------------------------------------------------------------------------
    def _make_ssl_context(self):
        import ssl  # only on the TLS path: it costs start-up time

        s = self.settings
        try:
            ctx = ssl.create_default_context(cafile=s.ca_file or None, capath=s.ca_path or None)
            if s.client_cert:
                ctx.load_cert_chain(s.client_cert, s.client_key or None)
        except (OSError, ssl.SSLError) as e:
            raise ShimError(f"TLS set-up failed: {e}", 2) from None
        if not s.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _Connection(self.host, self.port, self._ssl_context, self.settings.server_name)
        return conn

    def close(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _redact(self, text):
        tok = self.settings.token
        return text.replace(tok, "<redacted>") if tok else text

    def request(self, method, path, params=None, body=None, timeout=DEFAULT_REQUEST_TIMEOUT):
        """Send one request; return (status, headers, parsed JSON or text). Raise on transport or 4xx/5xx."""
        params = dict(params or {})
        if self.settings.datacenter:
            params["dc"] = self.settings.datacenter
        url = path + ("?" + urlencode(params) if params else "")
        data = body.data if isinstance(body, _Raw) else None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.settings.token:
            headers["X-Consul-Token"] = self.settings.token
        if self.verbose:
            self._log(self._redact(f"-> {method} {url}" + (f" {data.decode()}" if data else "")))
        conn = self._connection()
        try:
            status, resp_headers, raw = conn.request(method, url, data, headers, timeout)
        except _Dropped as e:
            self.close()
            raise Unreachable(f"Consul at {self.address} dropped the connection ({e})") from None
        except OSError as e:
            self.close()
            if self._ssl_context is not None:
                _raise_if_certificate_refused(e, self.address)
            reason = "timed out" if isinstance(e, socket.timeout) else (getattr(e, "strerror", None) or e)
            raise Unreachable(f"Consul at {self.address} is unreachable: {reason}") from None
        text = raw.decode("utf-8", "replace")
        if self.verbose:
            self._log(self._redact(f"<- {status} {text.strip()[:2000]}"))
        if status == 403:
            raise self._denied(method, path, body, text)
        if status >= 400 and not (status == 404 or (status == 409 and path == "/v1/txn")):
            raise HTTPError(f"Consul at {self.address}: {method} {path} -> {status} {text.strip()}", status, text)
        payload = json.loads(text) if text and "json" in resp_headers.get("content-type", "") else text
        return status, resp_headers, payload

    def _denied(self, method, path, body, text):
        if not self.settings.token:
            given = "no token given (anonymous)"
        elif "ACL not found" in text:
            given = "the token given is unknown to Consul"
        else:
            given = "the token given"
        return PermissionDenied(
            f"Consul ACL denied {method} {path} ({text.strip()}): {given}; it needs "
            f"{_needed_permission(method, path, body)} -- set it with --token, --token-file or CONSUL_HTTP_TOKEN",
            403,
            text,
        )

    # -- sessions ----------------------------------------------------------------------------------------
    def session_create(self, name, ttl, lock_delay, behavior="release", timeout=DEFAULT_REQUEST_TIMEOUT):
        body = {"Name": name, "TTL": ttl, "LockDelay": lock_delay, "Behavior": behavior, "Checks": []}
        _, _, payload = self.request("PUT", "/v1/session/create", body=body, timeout=timeout)
        return payload["ID"]

    def session_renew(self, session, timeout=DEFAULT_REQUEST_TIMEOUT):
        """True while the session exists; False when Consul answers 404 (destroyed or expired)."""
        status, _, _ = self.request("PUT", f"/v1/session/renew/{session}", timeout=timeout)
        return status == 200

    def session_destroy(self, session, timeout=DEFAULT_REQUEST_TIMEOUT):
        self.request("PUT", f"/v1/session/destroy/{session}", timeout=timeout)

    # -- KV ----------------------------------------------------------------------------------------------
    def kv_release(self, key, session, flags, value=b"", timeout=DEFAULT_REQUEST_TIMEOUT):
        """PUT ?release=: frees the key only if `session` holds it. Returns Consul's true/false."""
        params = {"release": session, "flags": str(flags)}
        _, _, payload = self.request("PUT", "/v1/kv/" + quote(key, safe="/"), params, body=_Raw(value), timeout=timeout)
        return payload is True

    def kv_get(self, key, index=None, wait=None, recurse=False, consistent=False, timeout=None):
        """Read a key (or a prefix with recurse). With index and wait, a blocking query.

        Returns (entries, index): entries is a list of dicts with Value decoded to bytes (empty when absent).
        """
        params = {}
        if recurse:
            params["recurse"] = ""
        if consistent:
            params["consistent"] = ""
        if index is not None:
            params["index"] = str(index)
        if wait is not None:
            params["wait"] = f"{max(1, int(wait * 1000))}ms"
        if timeout is None:
            # Consul adds up to wait/16 of jitter to a blocking query.
            timeout = DEFAULT_REQUEST_TIMEOUT + (wait or 0) * 1.1
        status, headers, payload = self.request("GET", "/v1/kv/" + quote(key, safe="/"), params, timeout=timeout)
        new_index = int(headers.get("x-consul-index") or 0)
        entries = payload if status == 200 and isinstance(payload, list) else []
        for e in entries:
            e["Value"] = base64.b64decode(e["Value"]) if e.get("Value") else b""
        return entries, new_index

    def txn(self, ops, timeout=DEFAULT_REQUEST_TIMEOUT):
        """Run a KV transaction. Returns (ok, results or errors). Keys in a txn body need no URL encoding."""
        status, _, payload = self.request("PUT", "/v1/txn", body=ops, timeout=timeout)
        if status == 200:
            return True, payload.get("Results") or []
        errors = (payload or {}).get("Errors") or []
        denied = [e for e in errors if "Permission denied" in str(e.get("What", ""))]
        if denied:  # an ACL refusal comes as 409 with per-operation errors, not as a 403
            raise self._denied("PUT", "/v1/txn", ops, denied[0]["What"])
        return False, errors

    def kv_op(self, verb, key, value=b"", flags=0, session=None, index=None, timeout=DEFAULT_REQUEST_TIMEOUT):
        """One KV operation as a transaction: returns (entry, None) on success, (None, error text) otherwise."""
        op = {"Verb": verb, "Key": key, "Flags": flags}
        if verb in ("set", "cas", "lock", "unlock"):
            op["Value"] = base64.b64encode(value).decode()
        if session is not None:
            op["Session"] = session
        if index is not None:
            op["Index"] = index
        ok, out = self.txn([{"KV": op}], timeout=timeout)
        if ok:
            return (out[0].get("KV") if out else None) or {}, None
        return None, "; ".join(str(e.get("What", e)) for e in out) or "transaction refused"
