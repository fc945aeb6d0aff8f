"""Client library: ``Publisher`` and ``Subscriber``, reconnecting and resuming.

Modules:
- ``session``: ``ReconnectingClient`` (connect, reconnect with tenacity backoff)
  and ``RetryPolicy``; the wire session, shared by both roles.
- ``history``: ``History`` and ``SpooledChunk``, a published stream's spool.
- ``publisher``: ``Publisher`` and ``PublishedStream``.
- ``subscriber``: ``Subscriber`` (resume positions, duplicate suppression,
  gap counting, the bounded hand-off queue).
- ``status``: ``fetch_status``, a one-shot OBSERVER session.
- ``interfaces``: ``SpoolingStream`` and ``ChunkSubscription``, the typed seams
  other services use instead of reaching into these classes.

Invariants:
- ``PublishedStream.send`` never blocks and never raises for network trouble.
- Subscribers apply backpressure, not loss: when the application stops
  iterating, the reader stops reading, and the relay (which owns the bounded
  queue) drops and counts. The heartbeat still runs, so the session survives.
- Reconnects use tenacity: exponential backoff with jitter and a cap; every
  retry is logged and counted in ``audiosockets_reconnects_total``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .history import History, SpooledChunk
from .interfaces import ChunkSubscription, SpoolingStream
from .publisher import ChunkTooLarge, PublishedStream, Publisher
from .session import (
    ReconnectingClient,
    RetryPolicy,
    check_wire_name,
    check_wire_names,
    refusal,
)
from .status import fetch_status
from .subscriber import StartName, Subscriber

if TYPE_CHECKING:  # mypy holds the concrete classes to the seams

    def _seams(
        stream: PublishedStream, sub: Subscriber
    ) -> tuple[SpoolingStream, ChunkSubscription]:
        return stream, sub


__all__ = [
    "ChunkSubscription",
    "ChunkTooLarge",
    "History",
    "PublishedStream",
    "Publisher",
    "ReconnectingClient",
    "RetryPolicy",
    "SpooledChunk",
    "SpoolingStream",
    "StartName",
    "Subscriber",
    "check_wire_name",
    "check_wire_names",
    "fetch_status",
    "refusal",
]
