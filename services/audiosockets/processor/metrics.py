"""The processor's Prometheus metric objects (names in ARCHITECTURE.md)."""

from __future__ import annotations

import threading
import weakref
from typing import ClassVar

from prometheus_client import Counter, Gauge, Histogram

from ..handlers import COUNTERS, GAUGES, MetricOp
from ..metrics import LATENCY_BUCKETS, PROCESSING_TIME_BUCKETS, Metrics

# --- metrics --------------------------------------------------------------------


class ProcessorMetrics:
    """The processor's own metric objects, on the registry of a core ``Metrics``.

    One instance per registry (``ProcessorMetrics.of(metrics)``) so that several
    processors in one process (the demo) share the series.
    """

    _by_metrics: ClassVar[weakref.WeakKeyDictionary[Metrics, ProcessorMetrics]] = (
        weakref.WeakKeyDictionary()
    )
    _lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def of(cls, metrics: Metrics) -> ProcessorMetrics:
        """The ``ProcessorMetrics`` on ``metrics``' registry, created on first use (thread-safe)."""
        with cls._lock:
            pm = cls._by_metrics.get(metrics)
            if pm is None:
                pm = cls._by_metrics[metrics] = cls(metrics)
            return pm

    def __init__(self, metrics: Metrics) -> None:
        self.core = metrics
        r = metrics.registry
        self.chunks_processed = Counter(
            "audiosockets_chunks_processed",
            "Chunks a handler finished without raising.",
            ["stream", "handler"],
            registry=r,
        )
        self.processing_time = Histogram(
            "audiosockets_processing_time_seconds",
            "Time one handler call took (successful or not).",
            ["handler"],
            buckets=PROCESSING_TIME_BUCKETS,
            registry=r,
        )
        self.handler_start_latency = Histogram(
            "audiosockets_handler_start_latency_seconds",
            "Time from capture of a chunk to the start of its handler call.",
            ["stream", "handler"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.handler_errors = Counter(
            "audiosockets_handler_errors",
            "Handler calls that raised (the next chunk is processed anyway).",
            ["handler"],
            registry=r,
        )
        self.handler_failing = Gauge(
            "audiosockets_handler_failing",
            "1 while the handler has failed many times in a row.",
            ["handler"],
            registry=r,
        )
        self.assigned_streams = Gauge(
            "audiosockets_assigned_streams",
            "Streams this processor has received chunks from.",
            ["handler"],
            registry=r,
        )
        self.level_dbfs = Gauge(
            "audiosockets_level_dbfs",
            "Level of the latest chunk in dBFS (full-scale sine: rms -3.01, peak 0).",
            ["stream", "channel", "measure"],
            registry=r,
        )
        self.clipped_samples = Counter(
            "audiosockets_clipped_samples",
            "Samples at or beyond full scale.",
            ["stream", "channel"],
            registry=r,
        )
        self.seconds_since_sound = Gauge(
            "audiosockets_seconds_since_sound",
            "Capture-time seconds since the last chunk above the silence threshold.",
            ["stream"],
            registry=r,
        )
        self.vad_active = Gauge(
            "audiosockets_vad_active",
            "1 while voice/sound activity is detected.",
            ["stream"],
            registry=r,
        )
        self.vad_segments = Counter(
            "audiosockets_vad_segments",
            "Activity segments started.",
            ["stream"],
            registry=r,
        )
        self.band_energy_dbfs = Gauge(
            "audiosockets_band_energy_dbfs",
            "Energy per octave band of the latest chunk in dBFS.",
            ["stream", "band"],
            registry=r,
        )
        self.archive_segments = Counter(
            "audiosockets_archive_segments",
            "WAV segments completed (renamed to their final name).",
            ["stream"],
            registry=r,
        )
        self.archive_bytes = Counter(
            "audiosockets_archive_bytes",
            "Audio payload bytes written to WAV segments.",
            ["stream"],
            registry=r,
        )
        self.archive_evictions = Counter(
            "audiosockets_archive_evictions",
            "WAV segments completed early because --max-open-segments files were open "
            "(the least recently written goes; its stream continues in a new segment).",
            ["stream"],
            registry=r,
        )
        self._gauges: dict[str, Gauge] = {name: getattr(self, name) for name in GAUGES}
        self._counters: dict[str, Counter] = {name: getattr(self, name) for name in COUNTERS}

    def apply(self, ops: list[MetricOp]) -> None:
        """Apply handler metric updates: ``set`` a gauge or ``inc`` a counter by name and labels.

        Raises ``KeyError`` for a metric not in ``GAUGES``/``COUNTERS``; call on the event loop."""
        for op in ops:
            if op.op == "set":
                self._gauges[op.metric].labels(*op.labels).set(op.value)
            else:
                self._counters[op.metric].labels(*op.labels).inc(op.value)
