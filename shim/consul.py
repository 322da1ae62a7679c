"""consul-locker's Consul HTTP client: sessions, KV reads (blocking queries), transactions. Typed errors, no retries.

What it does, and why this way:
- HTTP goes through `requests` (with urllib3 under it), the library the design names: one `requests.Session` per
  thread, so the renewer, the watcher and the main thread each keep their own keep-alive connection and never
  wait on each other's blocking query.
- Connection settings have the consul CLI's names and meanings (flags over environment): CONSUL_HTTP_ADDR as
  `host:port`, `http(s)://host:port[/path-prefix]`, `[::1]:port` or `unix:///path`; CONSUL_HTTP_TOKEN(_FILE);
  CONSUL_HTTP_AUTH (basic auth); CONSUL_HTTP_SSL, CONSUL_CACERT, CONSUL_CAPATH, CONSUL_CLIENT_CERT/KEY,
  CONSUL_HTTP_SSL_VERIFY, CONSUL_TLS_SERVER_NAME; HTTP_PROXY/HTTPS_PROXY/NO_PROXY as Go's net/http reads them,
  and, as there, never for `localhost`, a loopback address or a unix socket: a container whose proxy variables
  are set for the internet must still reach its local agent. Everything is read and checked once, when the
  client is built (the session does not look at the environment: `trust_env` is off), so bad input is exit 2
  before anything is sent, and a call does no more work than requests needs to send one prepared request.
- TLS through requests' `verify`/`cert`: CONSUL_CACERT (a file) or CONSUL_CAPATH (a hashed directory), else the
  system's CA store as the CLI uses it; CONSUL_TLS_SERVER_NAME is the name sent (SNI) and checked, set on urllib3's
  connections by our transport adapter; CONSUL_HTTP_SSL_VERIFY=false turns checking off.
- Header values (token, basic auth) are checked before anything is sent: a CR/LF or a non-ASCII character is a
  usage error, never a request with an injected header.
- No retries, no redirects: urllib3 is told to retry nothing and requests to follow nothing. Only the caller
  (shim.lock) knows its deadlines, so it owns the retry policy; it tells transient errors (`.transient`) from
  final ones. Transient: no answer (refused, reset, dropped, timed out, not HTTP), 5xx, 429, a malformed body.
  Final: a redirect or any other unexpected status (it names the method, path and status), a certificate that
  does not verify. 403, and a transaction refused with "Permission denied", are PermissionDenied naming the ACL
  rule the request needs.
- A session create is the one call that must never be sent twice: when its answer is lost after it may have
  reached Consul, the session is looked up by its name (unique to the process) and adopted, so none leaks.
- Name resolution is bounded by the connect timeout (getaddrinfo itself cannot be interrupted, so it runs in a
  helper thread that we stop waiting for): a hanging DNS server must not hold the lock's fencing deadline.
"""

import base64
import http.client
import ipaddress
import json
import os
import socket
import ssl
import threading
import time
import weakref
from collections import namedtuple
from urllib.parse import quote, unquote, urlencode, urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from requests.utils import requote_uri
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util import connection as urllib3_connection

from shim import __version__
from shim.errors import BadAnswer, ConsulError, HTTPError, PermissionDenied, Unreachable, UsageError

__all__ = ["DEFAULT_ADDR", "DEFAULT_REQUEST_TIMEOUT", "Settings", "Client", "ConsulError", "Unreachable",
           "HTTPError", "PermissionDenied", "BadAnswer"]  # fmt: skip

DEFAULT_ADDR = "http://127.0.0.1:8500"
# How long a plain (non-blocking) request may take before we call the agent unreachable.
DEFAULT_REQUEST_TIMEOUT = 10.0
# Consul adds up to wait/16 of random jitter to a blocking query's wait; the read timeout must outlast both.
BLOCKING_JITTER = 1 / 16

_PROXY_VARS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "REQUEST_METHOD")

Endpoint = namedtuple("Endpoint", "scheme host port prefix socket_path")


# -- settings ------------------------------------------------------------------------------------------------


def _truthy(value):
    return str(value).strip().lower() in ("1", "t", "true", "yes", "on")


class Settings:
    """Connection settings with the names and precedence of the consul CLI (flags override env).

    `Settings(addr=...)` is explicit: it reads nothing from the environment. `Settings.from_env()` reads what the
    CLI reads, checks it (UsageError: exit 2, one line) and leaves the rest to the Client."""

    def __init__(self, addr=DEFAULT_ADDR, token="", datacenter="", ssl=False, ca_file="", ca_path="",
                 client_cert="", client_key="", verify=True, server_name="", auth="", proxy_env=None):  # fmt: skip
        self.addr, self.token, self.datacenter, self.ssl = addr, token, datacenter, ssl
        self.ca_file, self.ca_path, self.client_cert, self.client_key = ca_file, ca_path, client_cert, client_key
        self.verify, self.server_name = verify, server_name
        self.auth = auth  # CONSUL_HTTP_AUTH: "user:password" or "user"
        self.proxy_env = dict(proxy_env or {})  # the proxy variables of the environment, by their exact names

    @classmethod
    def from_env(cls, env=None, addr=None, token=None, token_file=None, datacenter=None):
        env = os.environ if env is None else env
        tok, source = token or "", "--token"
        if not tok and token_file:
            tok, source = _read_token(token_file), f"--token-file {token_file}"
        if not tok:
            tok, source = env.get("CONSUL_HTTP_TOKEN", ""), "CONSUL_HTTP_TOKEN"
        if not tok and env.get("CONSUL_HTTP_TOKEN_FILE"):
            path = env["CONSUL_HTTP_TOKEN_FILE"]
            tok, source = _read_token(path), f"CONSUL_HTTP_TOKEN_FILE {path}"
        _check_header_value(tok, f"the Consul token ({source})", space=False)
        settings = cls(
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
            auth=env.get("CONSUL_HTTP_AUTH", ""),
            proxy_env={k: env[k] for k in _PROXY_VARS if env.get(k)},
        )
        settings.check()
        return settings

    def check(self):
        """Parse and check everything that goes on the wire; return (endpoint, proxy URL or ""). Raise UsageError."""
        _check_header_value(self.token, "the Consul token", space=False)
        _check_header_value(self.auth, "CONSUL_HTTP_AUTH", space=True)
        endpoint = _parse_addr(self.addr, self.ssl)
        proxy = "" if endpoint.socket_path else _proxy_for(endpoint, self.proxy_env)
        return endpoint, proxy


def _read_token(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as e:
        raise UsageError(f"cannot read token file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UsageError(f"token file {path} is not UTF-8 text") from None


def _check_header_value(value, what, space):
    """A value that goes into a request header must be visible ASCII (and a space where `space`): a CR or LF would
    inject a header, and anything else outside ASCII has no single meaning on the wire. The value itself is never
    repeated in the message (it is a secret)."""
    low = 0x20 if space else 0x21
    for ch in value:
        if not low <= ord(ch) <= 0x7E:
            if ch in "\r\n":
                kind = "a line break"
            elif ord(ch) > 0x7E:
                kind = "a non-ASCII character"
            else:
                kind = "a space or a control character"
            raise UsageError(f"{what} contains {kind}, which cannot be sent in an HTTP header")


def _parse_addr(addr, ssl):
    """CONSUL_HTTP_ADDR as the consul CLI reads it. `scheme://` is optional (CONSUL_HTTP_SSL picks https then, and,
    as in the CLI, also turns an explicit http:// into https); a path after an http(s) address is a prefix put
    before every API path (Consul behind a reverse proxy), kept as the CLI keeps it; `unix://PATH` is a socket."""
    text = addr.strip()
    if text.startswith("unix://"):
        path = text[len("unix://") :]
        if not path:
            raise UsageError(f"unsupported Consul address {addr!r}: unix:// needs a socket path")
        return Endpoint("http", "localhost", None, "", path)
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "http", text
    if scheme not in ("http", "https"):
        raise UsageError(f"unsupported Consul address {addr!r} (use host:port, http(s)://host:port or unix:///path)")
    if ssl:
        scheme = "https"
    try:
        parts = urlsplit(f"{scheme}://{rest}")
        host, port = parts.hostname, parts.port
    except ValueError:
        raise UsageError(f"bad port in Consul address {addr!r}") from None
    if not host or parts.query or parts.fragment or "@" in parts.netloc:
        raise UsageError(
            f"unsupported Consul address {addr!r} (use host:port or http(s)://host:port[/prefix]; credentials go in "
            "CONSUL_HTTP_AUTH)"
        )
    if any(not 0x21 <= ord(ch) <= 0x7E for ch in parts.netloc + parts.path):
        raise UsageError(f"unsupported Consul address {addr!r}: it contains a space, a control or non-ASCII character")
    return Endpoint(scheme, host, port or (443 if scheme == "https" else 80), parts.path.rstrip("/"), "")


def _proxy_for(endpoint, env):
    """The proxy URL Go's net/http (http.ProxyFromEnvironment) would use for this endpoint, or "".

    HTTPS_PROXY for https, HTTP_PROXY for http (upper case first); never for localhost or a loopback address;
    NO_PROXY: `*`, IP addresses, CIDR ranges, and domain names (which match their subdomains; a leading dot
    matches only subdomains), each optionally with a port. HTTP_PROXY is not used under CGI (REQUEST_METHOD set),
    as in Go, so a request's `Proxy:` header cannot choose our proxy."""
    host = endpoint.host.lower()
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        ip = None
    if host == "localhost" or (ip is not None and ip.is_loopback):
        return ""
    if endpoint.scheme == "https":
        proxy = env.get("HTTPS_PROXY") or env.get("https_proxy") or ""
    else:
        proxy = "" if env.get("REQUEST_METHOD") else env.get("HTTP_PROXY") or env.get("http_proxy") or ""
    if not proxy or _no_proxy_matches(env.get("NO_PROXY") or env.get("no_proxy") or "", host, endpoint.port, ip):
        return ""
    if "://" not in proxy:
        proxy = "http://" + proxy
    scheme = proxy.partition("://")[0].lower()
    if scheme not in ("http", "https"):
        raise UsageError(f"proxy {_redact_url(proxy)!r}: only http:// and https:// proxies are supported")
    try:
        parsed = urlsplit(proxy)
        parsed.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        parsed = None
    if parsed is None or not parsed.hostname:
        raise UsageError(f"proxy {_redact_url(proxy)!r} is not a valid URL")
    return proxy


def _no_proxy_matches(no_proxy, host, port, ip):
    for entry in no_proxy.split(","):
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        if "/" in entry:
            try:
                if ip is not None and ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        name, want_port = entry, ""
        if entry.startswith("[") and "]" in entry:  # [v6]:port
            name, _, rest = entry[1:].partition("]")
            want_port = rest.lstrip(":")
        elif entry.count(":") == 1:
            name, _, want_port = entry.partition(":")
        if want_port and want_port != str(port):
            continue
        if _is_ip_literal(name):  # an address matches only that address
            if ip is not None and ip == ipaddress.ip_address(name.partition("%")[0]):
                return True
            continue
        if name.startswith("*."):
            name = name[1:]
        if host.endswith(name if name.startswith(".") else "." + name) or host == name:
            return True
    return False


def _redact_url(url):
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":<redacted>@", 1)
    return url


# -- transport -----------------------------------------------------------------------------------------------


def _resolve(conn, host, port, timeout):
    """getaddrinfo in a helper thread, waited on for at most `timeout` seconds (it cannot be interrupted)."""
    found = {}
    done = threading.Event()

    def work():
        try:
            found["addresses"] = socket.getaddrinfo(
                host, port, urllib3_connection.allowed_gai_family(), socket.SOCK_STREAM
            )
        except OSError as e:
            found["error"] = e
        done.set()

    threading.Thread(target=work, name=f"resolve {host}", daemon=True).start()
    if not done.wait(timeout):
        raise ConnectTimeoutError(conn, f"resolving {host} took more than {timeout:g}s")
    if "error" in found:
        e = found["error"]
        raise NewConnectionError(conn, f"cannot resolve {host}: {e.strerror or e}") from e
    return found["addresses"]


class _BoundedResolution:
    """For urllib3's connection classes: a host name is resolved within the connect timeout, then its addresses
    are tried in turn with what is left of it (an IP literal goes straight to urllib3)."""

    def _new_conn(self):
        host, timeout = self._dns_host, self.timeout
        if not isinstance(timeout, (int, float)) or _is_ip_literal(host):
            return super()._new_conn()
        deadline = time.monotonic() + timeout
        error = None
        for family, _, _, _, sockaddr in _resolve(self, host, self.port, timeout):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                for option in self.socket_options or ():
                    sock.setsockopt(*option)
                sock.settimeout(left)
                sock.connect(sockaddr)
                return sock
            except OSError as e:
                sock.close()
                error = e
                if isinstance(e, socket.timeout):
                    break
        if error is None or isinstance(error, socket.timeout):
            raise ConnectTimeoutError(self, f"connecting to {host} timed out (connect timeout={timeout:g}s)")
        raise NewConnectionError(self, f"Failed to establish a new connection: {error}") from error


def _is_ip_literal(host):
    try:
        ipaddress.ip_address(host.partition("%")[0])
        return True
    except ValueError:
        return False


class _OneWrite:
    """For urllib3's connection classes: a request's head and its body go out in one write. urllib3 writes them
    with two send() calls; Consul can do nothing before the body is in, and a thread that loses the CPU (or the
    GIL) between the two writes holds the request up, the grant on the hand-off's path included."""

    _body = b""

    def request(self, method, url, body=None, headers=None, **kwargs):
        # requests has set Content-Length: with body=None urllib3 adds no framing of its own.
        if isinstance(body, bytes) and headers is not None and "Content-Length" in headers:
            self._body, body = body, None
        try:
            super().request(method, url, body, headers, **kwargs)
        finally:
            self._body = b""

    def send(self, data):
        # Taken before sending: a send() made while connecting (a proxy's CONNECT) goes out alone.
        body, self._body = self._body, b""
        super().send(data + body if body else data)


class _HTTPConnection(_OneWrite, _BoundedResolution, HTTPConnection):
    pass


class _HTTPSConnection(_OneWrite, _BoundedResolution, HTTPSConnection):
    pass


class _HTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _Adapter(HTTPAdapter):
    """requests' adapter with our connection classes (bounded name resolution) and CONSUL_TLS_SERVER_NAME: the
    name sent in SNI and checked against the agent's certificate when it is not the host we connect to."""

    def __init__(self, server_name=""):
        self.server_name = server_name
        super().__init__(pool_connections=1, pool_maxsize=1, max_retries=0)

    def _ours(self, manager):
        manager.pool_classes_by_scheme = {"http": _HTTPConnectionPool, "https": _HTTPSConnectionPool}
        return manager

    def init_poolmanager(self, connections, maxsize, block=False, **pool_kwargs):
        if self.server_name:
            pool_kwargs["server_hostname"] = self.server_name
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self._ours(self.poolmanager)

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        if proxy in self.proxy_manager:
            return self.proxy_manager[proxy]
        if self.server_name:
            proxy_kwargs["server_hostname"] = self.server_name
        return self._ours(super().proxy_manager_for(proxy, **proxy_kwargs))


def _chain(error):
    """The exceptions requests and urllib3 wrap around the one that happened, outermost first."""
    seen = []
    while isinstance(error, BaseException) and all(error is not s for s in seen):
        seen.append(error)
        nested = getattr(error, "reason", None)
        if not isinstance(nested, BaseException) and error.args and isinstance(error.args[0], BaseException):
            nested = error.args[0]
        error = nested if isinstance(nested, BaseException) else error.__cause__ or error.__context__
    return seen


def _never_sent(error):
    """True when the request cannot have reached Consul: no connection was ever made."""
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return True
    return any(isinstance(e, (NewConnectionError, ConnectTimeoutError)) for e in _chain(error))


def _describe(error):
    """One short phrase for a transport error."""
    for e in _chain(error):
        if isinstance(e, NewConnectionError):  # (a subclass of ConnectTimeoutError in urllib3 2): nothing was sent
            cause = e.__cause__
            message = str(e).split(": ", 1)[-1]  # without urllib3's "<connection object>: "
            if isinstance(cause, OSError) and cause.strerror and not message.startswith("cannot resolve"):
                return cause.strerror
            return message
        if isinstance(e, ConnectTimeoutError):
            return f"timed out connecting ({e.args[-1] if e.args else ''})".replace(" ()", "")
        if isinstance(e, (requests.exceptions.ReadTimeout, socket.timeout)):
            return "timed out waiting for an answer"
        if isinstance(e, http.client.RemoteDisconnected):
            return "it closed the connection without answering"
        if isinstance(e, http.client.BadStatusLine):
            return f"not an HTTP answer ({str(e)[:80]!r})"
        if isinstance(e, ssl.SSLError):
            return f"TLS failed: {e.reason or e}"
        if isinstance(e, requests.exceptions.ChunkedEncodingError):
            return "the answer broke off or was malformed (chunked encoding)"
        if isinstance(e, OSError) and e.errno:
            return _describe_os(e)
    inner = _chain(error)[-1]
    return str(inner)[:200] or type(inner).__name__


def _describe_os(e):
    return (getattr(e, "strerror", None) or str(e)) if e is not None else "unknown error"


def _certificate_refused(error, address):
    """A certificate that does not verify (or that the agent refuses) is a set-up error, not a transient one:
    a final ConsulError (exit 69 at once) instead of an Unreachable that would be retried. None otherwise."""
    for e in _chain(error):
        if isinstance(e, ssl.SSLError) and "CERTIFICATE" in str(e.reason or e).upper():
            detail = getattr(e, "verify_message", "") or e.reason
            return ConsulError(
                f"TLS with Consul at {address} failed, certificate refused ({detail}) -- check CONSUL_CACERT, "
                "CONSUL_CAPATH, CONSUL_TLS_SERVER_NAME, CONSUL_CLIENT_CERT/KEY (or CONSUL_HTTP_SSL_VERIFY=false)"
            )
    return None


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


def _server_name(name):
    """CONSUL_TLS_SERVER_NAME without a port, as the CLI takes it (`host`, `host:port`, `[v6]:port`)."""
    if name.startswith("["):
        return name[1:].partition("]")[0]
    return name.partition(":")[0] if name.count(":") == 1 else name


def _one_line(text, limit=300):
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- client --------------------------------------------------------------------------------------------------


def _say(text):
    from shim.log import say  # looked up when first needed: importing this module needs nothing of shim.log

    say(text)


class Client:
    """Talks to one Consul agent. Safe to share between threads (each thread gets its own requests.Session)."""

    def __init__(self, settings, verbose=False, log=None):
        self.settings = settings
        endpoint, proxy = settings.check()
        self.endpoint = endpoint
        self.verbose = verbose
        self._log = log or _say
        if endpoint.socket_path:
            self.address = f"unix://{endpoint.socket_path}"
            self._base = "http://localhost"
        else:
            host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
            self.address = f"{endpoint.scheme}://{host}:{endpoint.port}{endpoint.prefix}"
            self._base = requote_uri(self.address)  # as requests would send the prefix
        self._proxies = {endpoint.scheme: proxy} if proxy else {}
        if proxy and verbose:
            self._log(f"using proxy {_redact_url(proxy)} for Consul at {self.address}")
        self._headers = {"User-Agent": f"consul-locker/{__version__}"}
        self._secrets = [s for s in (settings.token, settings.auth.partition(":")[2]) if s]
        if settings.token:
            self._headers["X-Consul-Token"] = settings.token
        if settings.auth:
            self._headers["Authorization"] = "Basic " + base64.b64encode(settings.auth.encode()).decode()
        self._verify, self._cert = True, None
        if endpoint.scheme == "https":
            self._verify, self._cert = _tls_settings(settings)
        self._local = threading.local()
        # Every thread's session, for close(); weak, so a finished thread's session (and socket) goes with it.
        self._sessions = weakref.WeakSet()
        self._sessions_lock = threading.Lock()

    # -- transport ---------------------------------------------------------------------------------------
    def _adapter(self):
        """This thread's adapter, from this thread's requests.Session (made on first use)."""
        adapter = getattr(self._local, "adapter", None)
        if adapter is None:
            session = requests.Session()
            session.trust_env = False  # everything the environment says was read once, in Settings
            if self.endpoint.socket_path:
                from shim.unixsocket import UnixSocketAdapter

                adapter = UnixSocketAdapter(self.endpoint.socket_path, pool_connections=1, pool_maxsize=1)
            else:
                adapter = _Adapter(_server_name(self.settings.server_name))
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            with self._sessions_lock:
                self._sessions.add(session)
            self._local.session, self._local.adapter = session, adapter
        return adapter

    def close(self):
        """Close every connection this client opened, in every thread (a thread that calls again reconnects)."""
        with self._sessions_lock:
            sessions, self._sessions = list(self._sessions), weakref.WeakSet()
        for session in sessions:
            session.close()
        self._local = threading.local()

    def _redact(self, text):
        for secret in self._secrets:
            text = text.replace(secret, "<redacted>")
        return text

    def request(self, method, path, params=None, body=None, data=None, timeout=DEFAULT_REQUEST_TIMEOUT,
                expect=(200,)):  # fmt: skip
        """Send one request; return (status, headers, body bytes) for a status in `expect`, raise otherwise.

        `path` is already URL-encoded. `body` is sent as JSON, `data` as raw bytes."""
        params = dict(params or {})
        if self.settings.datacenter:
            params["dc"] = self.settings.datacenter
        target = path + ("?" + urlencode(params) if params else "")
        if body is not None:
            data = json.dumps(body).encode()
        if self.verbose:
            shown = f" {data.decode('utf-8', 'replace')}" if data else ""
            self._log(self._redact(f"-> {method} {target}{shown}"))
        prepared = requests.PreparedRequest()
        prepared.prepare_method(method)
        # The base URL and the header values were checked once, in __init__, and `target` is encoded already:
        # requests' prepare_url and prepare_headers would parse, re-quote and re-check them on every call.
        prepared.url = self._base + target
        prepared.headers = CaseInsensitiveDict(self._headers)
        prepared.prepare_body(data, None)
        adapter = self._adapter()
        try:
            response = adapter.send(
                prepared, timeout=timeout, verify=self._verify, cert=self._cert, proxies=self._proxies
            )
            status, headers, content = response.status_code, response.headers, response.content
        except requests.RequestException as e:
            raise self._transport_error(method, path, e) from None
        if self.verbose:
            self._log(self._redact(f"<- {status} {_one_line(content.decode('utf-8', 'replace'), 2000)}"))
        if status in expect:
            return status, headers, content
        text = content.decode("utf-8", "replace")
        if status == 403:
            raise self._denied(method, path, body, text)
        what = f"Consul at {self.address}: {method} {path} -> {status}"
        if 300 <= status < 400:
            where = headers.get("Location", "")
            raise HTTPError(f"{what} (a redirect{' to ' + where if where else ''}; consul-locker follows none: "
                            "check CONSUL_HTTP_ADDR)", status, text)  # fmt: skip
        raise HTTPError(f"{what} {_one_line(text)}".rstrip(), status, text)

    def _transport_error(self, method, path, error):
        if self.verbose:
            self._log(self._redact(f"<- {method} {path} failed: {type(error).__name__}: {error}"))
        refused = _certificate_refused(error, self.address)
        if refused:
            return refused
        e = Unreachable(f"Consul at {self.address} is unreachable: {self._redact(_describe(error))}")
        e.never_sent = _never_sent(error)
        return e

    def _json(self, method, path, content):
        try:
            return json.loads(content) if content else None
        except ValueError:
            raise BadAnswer(
                f"Consul at {self.address}: {method} {path} answered with malformed JSON: "
                f"{_one_line(content.decode('utf-8', 'replace'), 120)!r}"
            ) from None

    def _denied(self, method, path, body, text):
        if not self.settings.token:
            given = "no token given (anonymous)"
        elif "ACL not found" in text:
            given = "the token given is unknown to Consul"
        else:
            given = "the token given"
        return PermissionDenied(
            f"Consul ACL denied {method} {path} ({_one_line(text)}): {given}; it needs "
            f"{_needed_permission(method, path, body)} -- set it with --token, --token-file or CONSUL_HTTP_TOKEN",
            403,
            text,
        )

    # -- sessions ----------------------------------------------------------------------------------------
    def session_create(self, name, ttl, lock_delay, behavior="release", timeout=DEFAULT_REQUEST_TIMEOUT):
        """Create a session; return its ID. Never sent twice: when the answer is lost after the request may have
        reached Consul, the session is looked up by `name` (which the caller makes unique) and adopted."""
        body = {"Name": name, "TTL": ttl, "LockDelay": lock_delay, "Behavior": behavior, "Checks": []}
        path = "/v1/session/create"
        try:
            _, _, content = self.request("PUT", path, body=body, timeout=timeout)
            payload = self._json("PUT", path, content)
            if not isinstance(payload, dict) or not isinstance(payload.get("ID"), str):
                raise BadAnswer(f"Consul at {self.address}: PUT {path} answered without a session ID")
            return payload["ID"]
        except (Unreachable, HTTPError, BadAnswer) as lost:
            # Consul's own error statuses mean it made nothing; a gateway's 502/504 may come after it did.
            if isinstance(lost, HTTPError) and lost.status not in (502, 504):
                raise
            if not lost.transient or getattr(lost, "never_sent", False):
                raise
            try:
                found = self._find_session(name, timeout)
            except ConsulError as e:
                raise Unreachable(f"{lost} (and the session list could not be read to find the session: {e})") from None
            if found is None:
                raise
            if self.verbose:
                self._log(f"the answer to the session create was lost; adopting session {found} found by its name")
            return found

    def _find_session(self, name, timeout):
        _, _, content = self.request("GET", "/v1/session/list", timeout=timeout)
        sessions = self._json("GET", "/v1/session/list", content) or []
        if not isinstance(sessions, list):
            raise BadAnswer(f"Consul at {self.address}: GET /v1/session/list did not answer a list")
        ours = sorted((s for s in sessions if isinstance(s, dict) and s.get("Name") == name),
                      key=lambda s: s.get("CreateIndex", 0))  # fmt: skip
        if not ours:
            return None
        for extra in ours[:-1]:  # cannot happen (a create is never resent), but never leave one behind
            try:
                self.session_destroy(extra["ID"], timeout=timeout)
            except ConsulError:
                pass
        return ours[-1]["ID"]

    def session_renew(self, session, timeout=DEFAULT_REQUEST_TIMEOUT):
        """True while the session exists; False when Consul answers 404 (destroyed or expired)."""
        status, _, _ = self.request("PUT", f"/v1/session/renew/{quote(session, safe='')}", timeout=timeout,
                                    expect=(200, 404))  # fmt: skip
        return status == 200

    def session_destroy(self, session, timeout=DEFAULT_REQUEST_TIMEOUT):
        self.request("PUT", f"/v1/session/destroy/{quote(session, safe='')}", timeout=timeout)

    def session_info(self, session, timeout=DEFAULT_REQUEST_TIMEOUT):
        """The session's dict (ID, Name, Node, ...) or None when it does not exist."""
        path = f"/v1/session/info/{quote(session, safe='')}"
        status, _, content = self.request("GET", path, timeout=timeout, expect=(200, 404))
        payload = self._json("GET", path, content) if status == 200 else None
        if payload is not None and not isinstance(payload, list):
            raise BadAnswer(f"Consul at {self.address}: GET {path} did not answer a list")
        return payload[0] if payload else None

    # -- KV ----------------------------------------------------------------------------------------------
    def kv_release(self, key, session, flags, value=b"", timeout=DEFAULT_REQUEST_TIMEOUT):
        """PUT ?release=: frees the key only if `session` holds it. Returns Consul's true/false."""
        path = "/v1/kv/" + quote(key, safe="/")
        params = {"release": session, "flags": str(flags)}
        _, _, content = self.request("PUT", path, params, data=value, timeout=timeout)
        return self._json("PUT", path, content) is True

    def kv_get(self, key, index=None, wait=None, recurse=False, consistent=False, timeout=None):
        """Read a key (or a prefix with recurse). With index and wait, a blocking query.

        Returns (entries, index): entries is a list of dicts with Value decoded to bytes (b"" when null); a key
        that does not exist is ([], index). `timeout` may be seconds or (connect, read); the read timeout is made
        to outlast `wait` and Consul's jitter on it.
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
            timeout = DEFAULT_REQUEST_TIMEOUT
        if wait is not None:
            connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
            timeout = (connect, max(read, wait * (1 + BLOCKING_JITTER) + DEFAULT_REQUEST_TIMEOUT))
        path = "/v1/kv/" + quote(key, safe="/")
        status, headers, content = self.request("GET", path, params, timeout=timeout, expect=(200, 404))
        try:
            new_index = int(headers["X-Consul-Index"])
        except (KeyError, ValueError):
            raise BadAnswer(f"Consul at {self.address}: GET {path} answered without a valid X-Consul-Index") from None
        if status == 404:
            return [], new_index
        entries = self._json("GET", path, content)
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise BadAnswer(f"Consul at {self.address}: GET {path} did not answer a list of entries")
        try:
            for e in entries:
                e["Value"] = base64.b64decode(e["Value"], validate=True) if e.get("Value") else b""
        except (ValueError, TypeError):
            raise BadAnswer(f"Consul at {self.address}: GET {path} answered a value that is not base64") from None
        return entries, new_index

    def txn(self, ops, timeout=DEFAULT_REQUEST_TIMEOUT):
        """Run a KV transaction. Returns (True, results) or (False, errors). Keys in a txn body need no encoding."""
        status, _, content = self.request("PUT", "/v1/txn", body=ops, timeout=timeout, expect=(200, 409))
        payload = self._json("PUT", "/v1/txn", content)
        if not isinstance(payload, dict):
            raise BadAnswer(f"Consul at {self.address}: PUT /v1/txn did not answer an object")
        if status == 200:
            return True, payload.get("Results") or []
        errors = payload.get("Errors") or []
        denied = [e for e in errors if "Permission denied" in str(e.get("What", ""))]
        if denied:  # an ACL refusal comes as 409 with per-operation errors, not as a 403
            raise self._denied("PUT", "/v1/txn", ops, denied[0]["What"])
        return False, errors

    def txn_op(self, op, timeout=DEFAULT_REQUEST_TIMEOUT):
        """One KV operation (a txn "KV" object, Value already base64) as a transaction: (entry, None) when done,
        (None, Consul's reasons) when refused."""
        ok, out = self.txn([{"KV": op}], timeout=timeout)
        if ok:
            return (out[0].get("KV") if out else None) or {}, None
        return None, "; ".join(str(e.get("What", e)) for e in out) or "transaction refused"


def _tls_settings(settings):
    """requests' `verify` and `cert` for the agent, checked now so a bad file is exit 2 before anything is sent.

    With no CONSUL_CACERT/CONSUL_CAPATH, the system's CA store is used, as the consul CLI uses it (requests would
    otherwise use its own bundle). CONSUL_HTTP_SSL_VERIFY=false turns verification off."""
    import warnings

    from urllib3.exceptions import InsecureRequestWarning

    s = settings
    cert = (s.client_cert, s.client_key) if s.client_cert and s.client_key else s.client_cert or None
    try:
        context = ssl.create_default_context(cafile=s.ca_file or None, capath=s.ca_path or None)
        if s.client_cert:
            context.load_cert_chain(s.client_cert, s.client_key or None)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"TLS set-up failed: {e}") from None
    if not s.verify:
        warnings.filterwarnings("ignore", category=InsecureRequestWarning)
        return False, cert
    if s.ca_file or s.ca_path:
        return s.ca_file or s.ca_path, cert
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.capath):
        if candidate and os.path.exists(candidate):
            return candidate, cert
    return True, cert
