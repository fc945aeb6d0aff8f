"""Prometheus metrics shared by every audiosockets service.

Invariants:
- Every metric object lives in a ``Metrics`` instance bound to one
  ``CollectorRegistry``; nothing registers on the global default registry, so
  tests build a fresh registry and assert with ``get_sample_value``.
- Names start ``audiosockets_``, counters end ``_total``, units are base units
  (seconds, bytes). Labels stay low-cardinality: ``stream``, ``role``,
  ``group``, ``reason``, ``handler``, ``channel``, ``measure``, ``band``,
  ``subscriber`` (a client name, one per processor), never a sequence
  number or a client address.
- The same names are used by the relay, the recorder and the processor; each
  service serves its own endpoint, so Prometheus' ``job``/``instance`` labels
  say which stage a series comes from.
"""

from __future__ import annotations

import bisect
import platform
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Final, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import __version__

if TYPE_CHECKING:
    from .health import Health


# Histogram bucket layouts. ``histogram_quantile`` interpolates linearly
# inside the bucket a quantile falls in, so a quantile can read as high as
# the bucket's upper bound: the ratio between neighbouring bounds is the
# worst-case relative error. Bounds follow the E-series of preferred numbers
# (IEC 60063), which keep that ratio even across a decade.

#: E12: 12 bounds per decade, neighbours at most 25 % apart.
E12: Final = (1.0, 1.2, 1.5, 1.8, 2.2, 2.7, 3.3, 3.9, 4.7, 5.6, 6.8, 8.2)
#: E24: 24 bounds per decade, neighbours at most 15.4 % apart (1.3 -> 1.5).
E24: Final = (
    1.0, 1.1, 1.2, 1.3, 1.5, 1.6, 1.8, 2.0, 2.2, 2.4, 2.7, 3.0,
    3.3, 3.6, 3.9, 4.3, 4.7, 5.1, 5.6, 6.2, 6.8, 7.5, 8.2, 9.1,
)  # fmt: skip


def decades(series: tuple[float, ...], first: int, last: int) -> tuple[float, ...]:
    """``series`` scaled to each decade from 10**first up to and including 10**last.

    ``decades(E12, -3, 0)`` is 0.001, 0.0012, ... 0.82, 1.0 (seconds). Values
    are rounded to the series' two significant digits, so bucket labels read
    ``0.0012`` rather than ``0.0012000000000000001``.
    """
    bounds = [
        round(m * 10.0**exponent, 6 - exponent) for exponent in range(first, last) for m in series
    ]
    return (*bounds, float(10.0**last))


#: Capture-to-somewhere latencies (end-to-end, capture-to-send, handler
#: start): 0.1 ms (loopback) to 300 s. E12 between 1 ms and 1 s (a quantile
#: reads at most 25 % high there), then steps of about 1.5x up to 300 s, so
#: catching up after an outage (a spool replayed minutes late) reads as its
#: real lateness instead of piling into the top bucket.
LATENCY_BUCKETS: Final = (
    0.0001,
    0.0002,
    0.0005,
    *decades(E12, -3, 0),
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    45.0,
    60.0,
    90.0,
    120.0,
    180.0,
    300.0,
)

#: Time one handler call takes: E24 between 1 ms and 1 s (a quantile reads at
#: most 15.4 % high; a handler that always takes 50 ms reads 50-56 ms), then
#: 1.5 s to 60 s for handlers that hang. One series set per handler, so the
#: finer layout costs little.
PROCESSING_TIME_BUCKETS: Final = (
    0.0001,
    0.0002,
    0.0005,
    *decades(E24, -3, 0),
    1.5,
    2.0,
    3.0,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
)

#: Drop reasons, created up front so a zero is visible before the first drop.
DROP_REASONS: Final = (
    "subscriber_slow",  # relay: a subscriber fell further behind than its queue
    "replay_window_exceeded",  # relay: a resume asked for chunks older than the window
    "window_memory_exceeded",  # relay: trimmed unsent to keep all windows in max_window_memory
    "spool_full",  # recorder/publisher: outage longer than the spool
    "closed_unsent",  # publisher: closed before the relay took these
    "processor_overrun",  # processor: handler slower than real time, backlog full
    "client_queue_full",  # subscriber library: application did not iterate
    "input_overflow",  # recorder: PortAudio reported lost input
    "capture_queue_full",  # recorder: capture thread could not hand off
)

#: What the relay itself drops (per subscriber); every other reason is
#: counted where the chunk was lost, by the recorder or the processor.
RELAY_DROP_REASONS: Final = ("subscriber_slow", "replay_window_exceeded")

ROLES: Final = ("publisher", "subscriber", "observer")

# --- per-chunk metrics ---------------------------------------------------------------------
#
# prometheus_client takes a lock on every increment and observation: about 0.4 µs
# each on an idle core, several µs on a busy one, three of them per chunk on the
# relay's ingest path and again in every Subscriber. The metrics updated once per
# chunk are therefore plain attribute additions on the event loop's thread, read
# at scrape time (from the HTTP server's thread: a read of a float is atomic under
# the GIL; a scrape may see one chunk's counter before its histogram, never a torn
# value). Exposed exactly as prometheus_client's Counter and Histogram expose them.

K = TypeVar("K")
V = TypeVar("V")


def _snapshot(children: dict[K, V]) -> list[tuple[K, V]]:
    """``children``'s items, copied while another thread may add one."""
    for _ in range(3):
        try:
            return list(children.items())
        except RuntimeError:  # a child was added while we copied
            continue
    return []


class LiveCounterChild:
    """One labelled series of a ``LiveCounter``: ``inc`` is an addition, no lock."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (>= 0, as a Counter requires; ValueError otherwise)."""
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount


_Child = TypeVar("_Child")


class _LiveFamily(Collector, Generic[_Child]):
    """What the lock-free families share: one child per label set, created on
    first use; ``remove`` as prometheus_client's. Subclasses set ``_child`` (a
    factory) and ``collect``."""

    _child: Callable[[], _Child]

    def __init__(
        self, name: str, documentation: str, labelnames: list[str], registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._doc = documentation
        self._labelnames = labelnames
        self._children: dict[tuple[str, ...], _Child] = {}
        registry.register(self)

    def labels(self, *values: str) -> _Child:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
            child = self._children[values] = self._child()
        return child

    def remove(self, *values: str) -> None:
        """Forget the series of ``values`` (KeyError if there is none), as
        prometheus_client's ``remove`` does."""
        del self._children[values]


class LiveCounter(_LiveFamily[LiveCounterChild]):
    """A labelled Counter for per-chunk paths; ``labels(...).inc()`` without a lock.

    Exposes ``<name>_total`` and ``<name>_created`` per label set, as
    ``prometheus_client.Counter`` does. Only the event loop's thread may update it.
    """

    _child = LiveCounterChild

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self._name, self._doc, labels=self._labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        for values, child in _snapshot(self._children):
            family.add_metric(list(values), child.value, created=child.created)
        yield family


class LiveGaugeChild:
    """One labelled series of a ``LiveGauge``: ``set`` is an assignment, no lock."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class LiveGauge(_LiveFamily[LiveGaugeChild]):
    """A labelled Gauge for per-chunk paths (queue depths); ``labels(...).set()`` without
    a lock. Exposed as ``prometheus_client.Gauge`` is. Only the event loop's thread may
    update it."""

    _child = LiveGaugeChild

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self._name, self._doc, labels=self._labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self._name, self._doc, labels=self._labelnames)
        for values, child in _snapshot(self._children):
            family.add_metric(list(values), child.value)
        yield family


class LiveHistogramChild:
    """One labelled series of a ``LiveHistogram``: ``observe`` is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket (not cumulative); last: +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count ``value`` in the first bucket whose upper bound is >= it (``le``)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


#: A subscriber's per-stream children: chunks_received, bytes_received,
#: end_to_end_latency, queue_depth (``Metrics.receive_children``).
ReceiveChildren = tuple[LiveCounterChild, LiveCounterChild, LiveHistogramChild, LiveGaugeChild]


class LiveHistogram(Collector):
    """A labelled Histogram for per-chunk paths; ``labels(...).observe(v)`` without a lock.

    Exposes ``<name>_bucket`` (cumulative, ``le``), ``_count`` and ``_sum`` per label
    set, as ``prometheus_client.Histogram`` does. Only the event loop's thread may
    update it.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: list[str],
        buckets: Iterable[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._doc = documentation
        self._labelnames = labelnames
        self._bounds = tuple(sorted(float(b) for b in buckets))
        self._children: dict[tuple[str, ...], LiveHistogramChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> LiveHistogramChild:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
            child = self._children[values] = LiveHistogramChild(self._bounds)
        return child

    def remove(self, *values: str) -> None:
        """Forget the series of ``values`` (KeyError if there is none), as
        prometheus_client's ``remove`` does."""
        del self._children[values]

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)
        for values, child in _snapshot(self._children):
            counts = list(child.counts)
            total = 0
            buckets = []
            for bound, n in zip((*self._bounds, float("inf")), counts, strict=True):
                total += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
            family.add_metric(list(values), buckets, child.sum)
        yield family


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
        # Updated once per chunk (or per batch): lock-free (see LiveCounter).
        self.chunks_received = LiveCounter(
            "audiosockets_chunks_received",
            "Audio chunks received by this service.",
            ["stream"],
            registry=r,
        )
        self.chunks_sent = LiveCounter(
            "audiosockets_chunks_sent",
            "Audio chunks sent by this service (to each receiver once).",
            ["stream"],
            registry=r,
        )
        self.bytes_received = LiveCounter(
            "audiosockets_bytes_received",
            "Bytes of audio payload received by this service.",
            ["stream"],
            registry=r,
        )
        self.bytes_sent = LiveCounter(
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
        # The relay's deliveries broken down by subscriber (its client name):
        # summed over subscribers they equal the relay's chunks_sent and
        # chunks_dropped. A drop here is a chunk the relay held and let go
        # before this subscriber got it; chunks that never reached the relay
        # are the publisher's loss (spool_full), never counted here.
        self.subscriber_chunks_sent = Counter(
            "audiosockets_subscriber_chunks_sent",
            "Audio chunks the relay sent to each subscriber (relay only).",
            ["subscriber", "stream"],
            registry=r,
        )
        self.subscriber_chunks_dropped = Counter(
            "audiosockets_subscriber_chunks_dropped",
            "Audio chunks the relay held but dropped before each subscriber got them, "
            "by reason (relay only).",
            ["subscriber", "stream", "reason"],
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
        self.end_to_end_latency = LiveHistogram(
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
        # Set once per chunk by publishers, subscribers and processors: lock-free.
        self.queue_depth = LiveGauge(
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
        self.positions_clamped = Counter(
            "audiosockets_positions_clamped",
            "ACKs and resume points beyond what exists, clamped (relay), by reason.",
            ["reason"],
            registry=r,
        )
        for reason in ("ack_beyond_sent", "resume_beyond_stream"):
            self.positions_clamped.labels(reason)
        self.protocol_errors = Counter(
            "audiosockets_protocol_errors",
            "Connections closed because the peer broke the protocol, by error code.",
            ["reason"],
            registry=r,
        )
        self.auth_failures = Counter(
            "audiosockets_auth_failures",
            "Connections refused because neither the token nor the client certificate "
            "identifies a client (bad_token, certificate_unknown, certificate_mismatch).",
            registry=r,
        )
        self.refusals = Counter(
            "audiosockets_refusals",
            "Handshakes and requests the relay refused, by the rule that refused them "
            "(bad_token, role_not_allowed, stream_not_allowed, group_not_allowed, stream_owned, "
            "certificate_required, certificate_unknown, certificate_mismatch).",
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

        # The JetStream binding (jetstream/) only: no series on the relay binding.
        self.jetstream_pending = Gauge(
            "audiosockets_jetstream_consumer_pending_chunks",
            "Messages JetStream holds for this subscriber's consumer and has not delivered "
            "yet (consumer info num_pending: chunks, and an ended stream's end marker), "
            "refreshed every lag_interval seconds; per stream, or per pattern for a "
            "fan-out subscriber whose pattern is a glob (one consumer reads them all). "
            "Absent while unknown (disconnected, or 3 requests in a row failed).",
            ["stream"],
            registry=r,
        )
        # Observed once per chunk by the JetStream publisher: lock-free.
        self.jetstream_ack_latency = LiveHistogram(
            "audiosockets_jetstream_publish_ack_latency_seconds",
            "Time from publishing a chunk to JetStream's acknowledgement (PubAck), by stream.",
            ["stream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def receive_children(self, stream: str) -> ReceiveChildren:
        """A subscriber's per-chunk children of ``stream``: (chunks_received,
        bytes_received, end_to_end_latency, queue_depth), after declaring the
        stream's zeros. Callers cache the tuple: ``labels()`` costs a lookup."""
        self.declare_stream(stream)
        return (
            self.chunks_received.labels(stream),
            self.bytes_received.labels(stream),
            self.end_to_end_latency.labels(stream),
            self.queue_depth.labels(stream),
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
