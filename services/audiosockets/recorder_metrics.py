"""The recorder's own metrics: capture counters and the spool gauges (names in
ARCHITECTURE.md). They live on the service's registry; the spool gauges are
computed at scrape time from what the recorder holds, so nothing on the capture
path touches a gauge.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram

from .metrics import LATENCY_BUCKETS, gauge_family

if TYPE_CHECKING:
    from prometheus_client.core import Metric


class RecorderMetrics:
    """The recorder's own metrics (names in ARCHITECTURE.md), on the service registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.frames_captured = Counter(
            "audiosockets_frames_captured",
            "Audio frames (one sample per channel) taken from the source.",
            ["stream"],
            registry=registry,
        )
        self.input_overflows = Counter(
            "audiosockets_input_overflows",
            "Times PortAudio reported that input was lost before we could copy it.",
            ["stream"],
            registry=registry,
        )
        self.capture_to_send_latency = Histogram(
            "audiosockets_capture_to_send_latency_seconds",
            "From the end of a block's capture to its hand-off to the publisher.",
            ["stream"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.capture_gaps = Counter(
            "audiosockets_capture_gaps",
            "Interruptions of capture (a device lost and reopened).",
            ["stream"],
            registry=registry,
        )
        self.capture_gap_seconds = Counter(
            "audiosockets_capture_gap_seconds",
            "Seconds of audio not captured because the device was away.",
            ["stream"],
            registry=registry,
        )

    def declare_stream(self, stream: str) -> None:
        for family in (
            self.frames_captured,
            self.input_overflows,
            self.capture_to_send_latency,
            self.capture_gaps,
            self.capture_gap_seconds,
        ):
            family.labels(stream)


def spool_gauges(stream: str, depth: int, depth_seconds: float) -> Iterable[Metric]:
    """``audiosockets_spool_depth_chunks`` and ``_seconds`` for ``stream`` (chunks,
    seconds of audio captured and not yet taken by the relay)."""
    chunks = gauge_family(
        "audiosockets_spool_depth_chunks",
        "Chunks captured but not yet taken by the relay (the spool).",
        ["stream"],
    )
    seconds = gauge_family(
        "audiosockets_spool_depth_seconds",
        "Seconds of audio captured but not yet taken by the relay.",
        ["stream"],
    )
    chunks.add_metric([stream], float(depth))
    seconds.add_metric([stream], depth_seconds)
    return [chunks, seconds]
