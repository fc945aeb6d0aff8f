"""One stream's state on the relay: its format, position and replay window."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from ..audio import AudioFormat
from ..metrics import LiveCounterChild, LiveHistogramChild
from .window import ReplayWindow

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ..metrics import Metrics
    from .budget import MemoryLedger
    from .sessions import PublisherSession
    from .subscriptions import Cursor


log = logging.getLogger("audiosockets.relay")


class StreamCounters(NamedTuple):
    """One stream's metric children, looked up once: publishing runs once per
    chunk and ``labels()`` is a dict lookup."""

    received: LiveCounterChild
    received_bytes: LiveCounterChild
    latency: LiveHistogramChild


@dataclass(eq=False)
class StreamState:
    """A stream the relay knows. Streams outlive their publisher's connection,
    so a reconnecting publisher or subscriber finds the window where it left it.

    ``id`` is the relay-wide stream id used on subscriber connections,
    ``last_seq`` the newest sequence number published (-1: none yet),
    ``last_captured_ns`` its capture time (Unix nanoseconds), ``last_arrival``
    the relay clock when it arrived, ``chunks_total`` the chunks accepted since
    the relay started, ``owner`` the identity that first published it
    (credentials name; "" without per-client credentials): no other identity may
    publish it while the relay holds it. Who reads the stream is kept
    in the relay's ``Subscriptions``, not here.
    """

    id: int
    name: str
    format: AudioFormat
    counters: StreamCounters
    window: ReplayWindow = field(default_factory=ReplayWindow)
    last_seq: int = -1
    last_captured_ns: int = 0
    last_arrival: float = 0.0  # relay clock when the newest chunk arrived
    publisher: PublisherSession | None = None
    chunks_total: int = 0
    abandoned_at: float | None = None  # relay clock since when no publisher and no audio
    owner: str = ""

    @classmethod
    def create(
        cls, stream_id: int, name: str, fmt: AudioFormat, metrics: Metrics, ledger: MemoryLedger
    ) -> StreamState:
        """A new stream with its metric series declared (zeros) and an empty
        window whose memory counts in ``ledger`` (the relay-wide budget)."""
        metrics.declare_stream(name)
        counters = StreamCounters(
            metrics.chunks_received.labels(name),
            metrics.bytes_received.labels(name),
            metrics.end_to_end_latency.labels(name),
        )
        return cls(stream_id, name, fmt, counters, window=ReplayWindow(ledger))

    def change_format(self, fmt: AudioFormat, readers: Iterable[Cursor]) -> None:
        """The publisher re-opened the stream with another format: the window
        is emptied (its audio cannot be mixed with the new) and every reader is
        sent OPEN_STREAM again before the next chunk.

        The old audio goes as a trim, not a silent clear: the window remembers
        the numbers it dropped, so a reader not yet sent them (its cursor stays
        behind the window) and a subscriber resuming into them later are each
        charged ``replay_window_exceeded`` once, as for any other trim."""
        log.warning(
            "stream %r changed format %s -> %s; replay window cleared", self.name, self.format, fmt
        )
        self.format = fmt
        self.window.drop_oldest(len(self.window))
        for cursor in readers:
            cursor.declared = False

    def rate(self, now: float, span: float = 5.0) -> float:
        """Chunks per second that arrived in the last ``span`` seconds before
        ``now`` (both on the relay clock)."""
        w = self.window
        if not len(w):
            return 0.0
        n = w.end - w.ordinal_arrived_at(now - span)
        return n / span
