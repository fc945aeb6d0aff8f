"""The relay: an asyncio server that fans audio out from publishers to subscribers.

Modules, from the pure state outward:
- ``window``: ``ReplayWindow``, the last ``replay_seconds`` of one stream's
  encoded CHUNK frames, addressable by ordinal.
- ``streams``: ``StreamState``, a stream's format, position and window.
- ``subscriptions``: ``Cursor`` (one subscriber's position in one stream) and
  the ``Subscriptions`` registry that owns every cursor.
- ``assignment``: ``assign_streams``, the group assignment as a pure function.
- ``groups``: ``Group``, a consumer group's state and how an assignment is applied.
- ``sessions``: one client's session by role, and the subscriber's writer.
- ``status``: the ``status`` report and the gauges computed at scrape time.
- ``inflight``: ``InFlight``, the audio written to a subscriber and not yet
  acknowledged by its host (the writer waits beyond ``max_inflight_seconds``).
- ``admission``: session caps, stream caps, cuts, their counters (``Guard``).
- ``expiry``: ``Housekeeping``: audio expires by age, abandoned streams and
  idle sessions go.
- ``access``: TLS handshakes, identities from tokens, refusals and their
  throttle, credentials reload (``AccessControl``).
- ``server``: ``Relay`` (lifecycle, connections, routing) and ``RelayConfig``.
"""

from __future__ import annotations

from .assignment import assign_streams
from .groups import Group
from .server import Clock, Relay, RelayConfig
from .sessions import (
    ObserverSession,
    PublisherSession,
    Session,
    SubscriberSession,
)
from .streams import StreamCounters, StreamState
from .subscriptions import Cursor, Subscriptions
from .window import ReplayWindow

__all__ = [
    "Clock",
    "Cursor",
    "Group",
    "ObserverSession",
    "PublisherSession",
    "Relay",
    "RelayConfig",
    "ReplayWindow",
    "Session",
    "StreamCounters",
    "StreamState",
    "SubscriberSession",
    "Subscriptions",
    "assign_streams",
]
