"""One stream's state on the relay: its format, position and replay window."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from prometheus_client import Counter, Histogram

from ..audio import AudioFormat
from .window import ReplayWindow

if TYPE_CHECKING:
    from .sessions import PublisherSession


class StreamCounters(NamedTuple):
    """One stream's metric children, looked up once: ``labels()`` costs a lock
    and a dict lookup, and publishing runs once per chunk."""

    received: Counter
    received_bytes: Counter
    latency: Histogram


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

    def rate(self, now: float, span: float = 5.0) -> float:
        """Chunks per second that arrived in the last ``span`` seconds before
        ``now`` (both on the relay clock)."""
        w = self.window
        if not len(w):
            return 0.0
        n = w.end - w.ordinal_arrived_at(now - span)
        return n / span
