"""Counting what the relay delivered to, and lost for, each subscriber.

Every chunk the relay held and did not deliver is counted once per subscriber
that missed it, with a reason from ``RELAY_DROP_REASONS`` (see grafana/README.md,
"lost in the relay"): in the per-stream ``audiosockets_chunks_dropped_total`` and
in the per-subscriber ``audiosockets_subscriber_chunks_dropped_total``, so an
alert can name the subscriber that is losing audio.
"""

from __future__ import annotations

from ..metrics import RELAY_DROP_REASONS, Metrics


class DeliveryCounters:
    """The relay's delivery counters, by stream and by subscriber (client name)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def count_drop(self, stream: str, reason: str, n: int, subscriber: str) -> None:
        """Count ``n`` chunks of ``stream`` the relay held and lost for
        ``subscriber`` (its client name) for ``reason`` (``RELAY_DROP_REASONS``)."""
        self.metrics.chunks_dropped.labels(stream, reason).inc(n)
        self.metrics.subscriber_chunks_dropped.labels(subscriber, stream, reason).inc(n)

    def count_sent(self, stream: str, chunks: int, nbytes: int, subscriber: str) -> None:
        """Count ``chunks`` chunks (``nbytes`` bytes of frames) of ``stream``
        written to ``subscriber``."""
        self.metrics.chunks_sent.labels(stream).inc(chunks)
        self.metrics.bytes_sent.labels(stream).inc(nbytes)
        self.metrics.subscriber_chunks_sent.labels(subscriber, stream).inc(chunks)

    def declare_subscriber(self, subscriber: str, stream: str) -> None:
        """Zeros for a subscriber's delivery counters before its first chunk."""
        self.metrics.subscriber_chunks_sent.labels(subscriber, stream)
        for reason in RELAY_DROP_REASONS:
            self.metrics.subscriber_chunks_dropped.labels(subscriber, stream, reason)
