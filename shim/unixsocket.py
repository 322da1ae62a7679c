"""HTTP over a unix socket for `requests`: `CONSUL_HTTP_ADDR=unix:///path/to/consul.sock`, as the consul CLI takes it.

A node agent is often handed to containers as a socket file (Consul's `addresses.http = "unix:///..."`) rather
than a TCP port. `requests` has no unix-socket transport; rather than a third dependency, this is the few lines it
takes on urllib3: a connection class whose socket is an AF_UNIX one, in a pool class that uses it, behind a
transport adapter. Everything above the socket (HTTP/1.1, keep-alive, timeouts, errors) is urllib3's own.
"""

import socket

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError


class UnixHTTPConnection(HTTPConnection):
    """An HTTP connection to a unix socket. `socket_path` is set on a subclass made for each adapter."""

    socket_path = ""

    def _new_conn(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)  # urllib3 sets the connect timeout here before connecting
            sock.connect(self.socket_path)
        except socket.timeout as e:
            sock.close()
            raise ConnectTimeoutError(self, f"connecting to {self.socket_path} timed out") from e
        except OSError as e:
            sock.close()
            raise NewConnectionError(self, f"cannot connect to {self.socket_path}: {e.strerror or e}") from e
        return sock


class UnixSocketAdapter(HTTPAdapter):
    """Mount on `http://`: every request goes to the socket at `path`, whatever host the URL names (use localhost,
    which is also what the agent sees in the Host header). Never behind a proxy."""

    def __init__(self, path, **kwargs):
        self.socket_path = path  # before HTTPAdapter.__init__, which builds the pool manager
        super().__init__(**kwargs)

    def init_poolmanager(self, connections, maxsize, block=False, **pool_kwargs):
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        connection = type("BoundUnixHTTPConnection", (UnixHTTPConnection,), {"socket_path": self.socket_path})
        pool = type("UnixHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": connection})
        self.poolmanager.pool_classes_by_scheme = {"http": pool}

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        raise ValueError("a unix socket is never reached through a proxy")
