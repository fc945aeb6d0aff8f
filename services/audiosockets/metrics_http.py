"""The HTTP server behind every service's metrics port: bounded, timed out, TLS-able.

``/metrics`` (and ``/healthz``, ``/readyz``, see ``health.py``) is served from
daemon threads, never from the event loop. What a scraper, a probe or an idle
port scan can cost is bounded:

* at most ``max_connections`` connections are served at once, one thread each;
  a connection beyond that is closed at once and counted in
  ``audiosockets_http_connections_refused_total{reason="too_many_connections"}``
  (500 idle connections used to hold 503 threads);
* every read and write on a connection (and its TLS handshake) waits at most
  ``idle_timeout`` seconds, so an idle or stalled connection gives its thread
  back (counted as ``reason="idle_timeout"``);
* the server binds ``host`` in its own address family: an IPv4 or IPv6
  address or a name; ``::`` is dual-stack (IPv4 clients too) where the OS
  allows it;
* with ``tls`` (``tls.server_context``: certificate, key, optionally a client
  CA) the port speaks HTTPS only (``reason="tls_handshake"`` when a handshake
  fails).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client.core import CounterMetricFamily, Metric

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

#: Connections served at once, one thread each (Prometheus holds one per target).
MAX_CONNECTIONS: Final = 16
#: Seconds a connection may stay silent (or stall a write) before it is closed.
IDLE_TIMEOUT_SECONDS: Final = 10.0

REFUSAL_REASONS: Final = ("too_many_connections", "idle_timeout", "tls_handshake")


@dataclass(frozen=True, slots=True)
class MetricsEndpoint:
    """Where and how a service serves its metrics: ``--metrics-host`` and the
    ``--metrics-tls-cert/--metrics-tls-key/--metrics-tls-client-ca`` files.

    ``host`` None means the service's default (the relay's listen host; a
    client's loopback). ``context()`` builds the TLS context (None: plain
    HTTP); unusable files raise ConfigError.
    """

    host: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    def context(self) -> ssl.SSLContext | None:
        from .errors import ConfigError
        from .tls import server_context

        if self.tls_cert is None:
            if self.tls_key is not None or self.tls_client_ca is not None:
                raise ConfigError(
                    "--metrics-tls-key and --metrics-tls-client-ca need --metrics-tls-cert"
                )
            return None
        ctx = server_context(cert=self.tls_cert, key=self.tls_key, client_ca=self.tls_client_ca)
        if self.tls_client_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED  # plain HTTP has no ERROR frame to explain
        return ctx


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes and probes come every few seconds: no access log."""


class BoundedWSGIServer(WSGIServer):
    """A WSGI server with a bound on connections and an idle timeout on each."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        family: socket.AddressFamily,
        dual_stack: bool,
        tls: ssl.SSLContext | None,
        max_connections: int,
        idle_timeout: float,
    ) -> None:
        self.address_family = family
        self.dual_stack = dual_stack
        self.tls = tls
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self.refused = dict.fromkeys(REFUSAL_REASONS, 0)
        self.active = 0
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        if self.dual_stack:
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def count(self, reason: str) -> None:
        with self._lock:
            self.refused[reason] += 1

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.count("too_many_connections")
            self.shutdown_request(request)
            return
        with self._lock:
            self.active += 1
        threading.Thread(
            target=self._serve_one, args=(request, client_address), daemon=True
        ).start()

    def _serve_one(self, request: socket.socket, client_address: Any) -> None:
        conn: socket.socket = request
        try:
            conn.settimeout(self.idle_timeout)
            if self.tls is not None:
                try:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                except (OSError, ValueError):
                    self.count("tls_handshake")
                    return
            self.finish_request(conn, client_address)
        except TimeoutError:
            self.count("idle_timeout")
        except (OSError, ValueError):
            pass  # the client went away mid-request: nothing to answer
        finally:
            self.shutdown_request(conn)
            with self._lock:
                self.active -= 1
            self._slots.release()

    def refusals(self) -> Iterable[Metric]:
        """The refused-connection counter, read at scrape time."""
        family = CounterMetricFamily(
            "audiosockets_http_connections_refused",
            "Metrics-port connections closed unserved, by reason.",
            labels=["reason"],
        )
        with self._lock:
            for reason, n in self.refused.items():
                family.add_metric([reason], n)
        return [family]


def bind_address(host: str, port: int) -> tuple[socket.AddressFamily, tuple[str, int], bool]:
    """Resolve ``host`` for listening: its family, the socket address, and whether
    it is the IPv6 wildcard (then dual-stack). Raises OSError when it cannot resolve."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    dual = family == socket.AF_INET6 and sockaddr[0] == "::" and socket.has_dualstack_ipv6()
    return family, (str(sockaddr[0]), int(sockaddr[1])), dual


def serve_wsgi(
    app: WSGIApplication,
    port: int,
    *,
    host: str,
    tls: ssl.SSLContext | None = None,
    max_connections: int = MAX_CONNECTIONS,
    idle_timeout: float = IDLE_TIMEOUT_SECONDS,
    register: Callable[[BoundedWSGIServer], None] | None = None,
) -> BoundedWSGIServer:
    """Serve ``app`` on ``host``:``port`` from a daemon thread; returns the server
    (``server_address[1]`` is the bound port). ``register`` is called with the
    server before it serves (to publish its counters). Raises OSError when the
    address cannot be resolved or bound."""
    family, address, dual = bind_address(host, port)
    server = BoundedWSGIServer(
        address,
        family=family,
        dual_stack=dual,
        tls=tls,
        max_connections=max_connections,
        idle_timeout=idle_timeout,
    )
    server.set_app(app)
    if register is not None:
        register(server)
    threading.Thread(
        target=server.serve_forever, name=f"audiosockets-http:{port}", daemon=True
    ).start()
    return server
