"""Who reads which stream, and where: one registry owns every cursor.

A cursor is one subscriber's position in one stream. The registry indexes
cursors both by subscriber (what its writer delivers) and by stream (whom a
new chunk wakes); both indexes change together in one method, so they cannot
disagree and a removed cursor is gone from both at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from .streams import StreamState

if TYPE_CHECKING:
    from .sessions import SubscriberSession

_NONE: Mapping[SubscriberSession, Cursor] = MappingProxyType({})


@dataclass(eq=False)
class Cursor:
    """Where one subscriber stands in one stream.

    Ordinals are the replay window's (see ``ReplayWindow``); ``after_seq`` is
    the resume point: no chunk with a sequence number at or below it is sent.
    ``assigned_at`` is the relay clock reading (seconds) when the cursor was
    made: chunks that arrived before it are replay and never count as
    ``subscriber_slow``. ``end_after`` is set when the publisher closed the
    stream at that sequence number. ``sent``, ``dropped_slow`` and
    ``dropped_window`` count chunks.
    """

    stream: StreamState
    next_ord: int  # ordinal of the next chunk to send
    after_seq: int  # never send a chunk with seq <= this (resume point)
    assigned_at: float  # chunks that arrived before this are replay: never "slow"
    declared: bool = False  # OPEN_STREAM sent on this connection
    end_after: int | None = None  # the publisher closed the stream at this seq
    sent: int = 0
    dropped_slow: int = 0
    dropped_window: int = 0

    @property
    def lag(self) -> int:
        """Chunks held in the window that this subscriber has not been sent."""
        return self.stream.window.end - self.next_ord


class Subscriptions:
    """Every cursor on the relay, by subscriber and by stream name."""

    def __init__(self) -> None:
        self._by_session: dict[SubscriberSession, dict[str, Cursor]] = {}
        self._by_stream: dict[str, dict[SubscriberSession, Cursor]] = {}

    def add(self, session: SubscriberSession, cursor: Cursor) -> None:
        """Record ``cursor`` as ``session``'s position in ``cursor.stream``,
        replacing any cursor it had there."""
        name = cursor.stream.name
        self._by_session.setdefault(session, {})[name] = cursor
        self._by_stream.setdefault(name, {})[session] = cursor

    def remove(self, session: SubscriberSession, stream: str) -> Cursor | None:
        """Forget ``session``'s cursor in ``stream``; returns it (None: it had none)."""
        cursors = self._by_session.get(session)
        cursor = cursors.pop(stream, None) if cursors is not None else None
        if cursor is None:
            return None
        if not cursors:
            del self._by_session[session]
        readers = self._by_stream[stream]
        del readers[session]
        if not readers:
            del self._by_stream[stream]
        return cursor

    def remove_session(self, session: SubscriberSession) -> list[Cursor]:
        """Forget every cursor of ``session``; returns them."""
        return [
            cursor
            for name in list(self._by_session.get(session, ()))
            if (cursor := self.remove(session, name)) is not None
        ]

    def get(self, session: SubscriberSession, stream: str) -> Cursor | None:
        """``session``'s cursor in ``stream``, None when it does not read it."""
        cursors = self._by_session.get(session)
        return cursors.get(stream) if cursors is not None else None

    def of_session(self, session: SubscriberSession) -> list[Cursor]:
        """A snapshot of ``session``'s cursors, in the order they were added."""
        return list(self._by_session.get(session, {}).values())

    def streams_of(self, session: SubscriberSession) -> list[str]:
        """Names of the streams ``session`` reads, sorted."""
        return sorted(self._by_session.get(session, ()))

    def readers(self, stream: str) -> Mapping[SubscriberSession, Cursor]:
        """A live read-only view of who reads ``stream`` and where; copy it
        before changing subscriptions while iterating."""
        readers = self._by_stream.get(stream)
        return MappingProxyType(readers) if readers is not None else _NONE

    def session_lag(self, session: SubscriberSession) -> int:
        """Chunks held for ``session`` and not yet sent, over all its streams."""
        return sum(c.lag for c in list(self._by_session.get(session, {}).values()))

    def stream_lag(self, stream: str) -> int:
        """Chunks of ``stream`` held and not yet sent, summed over its readers."""
        # A copy: the metrics endpoint calls this from its own thread.
        return sum(c.lag for c in list(self._by_stream.get(stream, {}).values()))
