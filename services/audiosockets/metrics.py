"""Prometheus metrics shared by every audiosockets service.

Invariants:
- Every metric object lives in a ``Metrics`` instance bound to one
  ``CollectorRegistry``; nothing registers on the global default registry, so
  tests build a fresh registry and assert with ``get_sample_value``.
- Names start ``audiosockets_``, counters end ``_total``, units are base units
  (seconds, bytes). Labels stay low-cardinality: ``stream``, ``role``,
  ``group``, ``reason``, ``handler``, ``channel``, ``measure``, ``band``,
  never a sequence number or a client address.
- The same names are used by the relay, the recorder and the processor; each
  service serves its own endpoint, so Prometheus' ``job``/``instance`` labels
  say which stage a series comes from.
"""

from __future__ import annotations

import platform
import ssl
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__

if TYPE_CHECKING:
    from .health import Health

#: Latency buckets for audio: 0.1 ms (loopback) up to 5 s (a stalled consumer).
LATENCY_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

#: Drop reasons, created up front so a zero is visible before the first drop.
DROP_REASONS: Final = (
    "subscriber_slow",  # relay: a subscriber fell further behind than its queue
    "replay_window_exceeded",  # relay: a resume asked for chunks older than the window
    "spool_full",  # recorder/publisher: outage longer than the spool
    "closed_unsent",  # publisher: closed before the relay took these
    "processor_overrun",  # processor: handler slower than real time, backlog full
    "client_queue_full",  # subscriber library: application did not iterate
    "input_overflow",  # recorder: PortAudio reported lost input
    "capture_queue_full",  # recorder: capture thread could not hand off
)

ROLES: Final = ("publisher", "subscriber", "observer")


class Metrics:
    """All metric objects of one service, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.build_info = Gauge(
            "audiosockets_build_info",
            "Always 1; labels carry the version and Python implementation.",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.chunks_received = Counter(
            "audiosockets_chunks_received",
            "Audio chunks received by this service.",
            ["stream"],
            registry=r,
        )
        self.chunks_sent = Counter(
            "audiosockets_chunks_sent",
            "Audio chunks sent by this service (to each receiver once).",
            ["stream"],
            registry=r,
        )
        self.bytes_received = Counter(
            "audiosockets_bytes_received",
            "Bytes of audio payload received by this service.",
            ["stream"],
            registry=r,
        )
        self.bytes_sent = Counter(
            "audiosockets_bytes_sent",
            "Bytes of audio payload sent by this service.",
            ["stream"],
            registry=r,
        )
        self.chunks_dropped = Counter(
            "audiosockets_chunks_dropped",
            "Audio chunks dropped, by reason. Never silent: every loss is here.",
            ["stream", "reason"],
            registry=r,
        )
        self.duplicates_suppressed = Counter(
            "audiosockets_duplicates_suppressed",
            "Chunks discarded because their sequence number was already seen.",
            ["stream"],
            registry=r,
        )
        self.sequence_gaps = Counter(
            "audiosockets_sequence_gaps",
            "Chunks missing in the sequence as seen by this service.",
            ["stream"],
            registry=r,
        )
        self.end_to_end_latency = Histogram(
            "audiosockets_end_to_end_latency_seconds",
            "Time from capture (chunk timestamp) to delivery at this service.",
            ["stream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.connected_clients = Gauge(
            "audiosockets_connected_clients",
            "Clients connected to the relay, by role.",
            ["role"],
            registry=r,
        )
        for role in ROLES:
            self.connected_clients.labels(role)
        self.queue_depth = Gauge(
            "audiosockets_queue_depth_chunks",
            "Chunks waiting to be delivered or processed, by stream.",
            ["stream"],
            registry=r,
        )
        self.reconnects = Counter(
            "audiosockets_reconnects",
            "Connection attempts after the first one (each retry counts).",
            ["role"],
            registry=r,
        )
        self.connected = Gauge(
            "audiosockets_connected",
            "1 while this client holds a live session with the relay.",
            ["role"],
            registry=r,
        )
        self.protocol_errors = Counter(
            "audiosockets_protocol_errors",
            "Connections closed because the peer broke the protocol, by error code.",
            ["reason"],
            registry=r,
        )
        self.auth_failures = Counter(
            "audiosockets_auth_failures",
            "Connections refused because the token was missing or wrong.",
            registry=r,
        )
        self.refusals = Counter(
            "audiosockets_refusals",
            "Handshakes and requests the relay refused, by the rule that refused them "
            "(bad_token, role_not_allowed, stream_not_allowed, group_not_allowed, stream_owned).",
            ["reason"],
            registry=r,
        )
        self.tls_handshake_failures = Counter(
            "audiosockets_tls_handshake_failures",
            "Connections cut in or right after the TLS handshake, by reason (not_tls: "
            "plain TCP or HTTP on the TLS port; client_certificate_missing/untrusted).",
            ["reason"],
            registry=r,
        )

    # Label children are created on first use of a stream so the zero shows
    # up in the first scrape after the stream appears.
    def declare_stream(self, stream: str, reasons: Iterable[str] = DROP_REASONS) -> None:
        self.chunks_received.labels(stream)
        self.chunks_sent.labels(stream)
        self.bytes_received.labels(stream)
        self.bytes_sent.labels(stream)
        self.duplicates_suppressed.labels(stream)
        self.sequence_gaps.labels(stream)
        for reason in reasons:
            self.chunks_dropped.labels(stream, reason)


class CallbackCollector(Collector):
    """Gauges computed at scrape time from live service state.

    ``read`` runs on the HTTP server's thread; it must only take snapshots
    (``list(...)`` of dicts), never mutate.
    """

    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self._read = read
        self._lock = threading.Lock()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            for _ in range(3):
                try:
                    return list(self._read())
                except RuntimeError:  # a dict changed size while we copied it
                    continue
            return []

    def describe(self) -> Iterable[Metric]:
        return []


def gauge_family(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def serve_metrics(
    port: int,
    registry: CollectorRegistry,
    addr: str = "127.0.0.1",
    *,
    health: Health | None = None,
    tls: ssl.SSLContext | None = None,
) -> int:
    """Serve ``registry`` over HTTP on ``addr``:``port`` from daemon threads.

    ``addr``: a host name or an IPv4/IPv6 address (no brackets; ``::`` is
    dual-stack) — services pass ``--metrics-host``, by default their listen
    host. ``tls``: serve HTTPS (``metrics_http.MetricsEndpoint.context``).
    With ``health``, the same port also answers ``/healthz`` (event loop alive)
    and ``/readyz`` (service ready); see ``health.py``. Connections are bounded
    and time out (``metrics_http``). Returns the bound port (useful with
    ``port=0`` in tests); ``port < 0`` means disabled and returns 0. The CLI
    maps ``--metrics-port 0`` to disabled before calling this. A taken port
    raises ``AddressInUse``; an address this host cannot bind ``ConfigError``.
    """
    import errno

    from .errors import AddressInUse, ConfigError
    from .health import serve_http

    if port < 0:
        return 0
    where = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
    try:
        return serve_http(port, registry, health, addr, tls=tls)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUse(f"cannot serve metrics on {where}: {reason}") from exc
        raise ConfigError(f"cannot serve metrics on {where}: {reason}") from exc
