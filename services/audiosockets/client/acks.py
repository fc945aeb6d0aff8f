"""A group member's ACKs to the relay, coalesced per turn of the event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

from ..protocol import Ack
from ..transport import Channel


class GroupAcks:
    """The latest position a group member finished per stream (``acked``: stream
    name -> seq), and its ACK frames.

    The first ACK of a turn of the event loop leaves at once; the ones after it
    in the same turn are coalesced, the latest per stream, into one write at the
    end of the turn (a batch of chunks costs two writes, not one per chunk).
    ``channel`` gives the current session (None between sessions: nothing is
    sent; the next SUBSCRIBE carries ``acked``); ``ids`` maps a stream name to
    that session's stream id.
    """

    def __init__(self, channel: Callable[[], Channel | None], ids: dict[str, int]) -> None:
        self.acked: dict[str, int] = {}
        self._channel = channel
        self._ids = ids
        self._due: set[str] = set()  # streams whose latest ACK has not been sent
        self._scheduled = False

    def ack(self, stream: str, seq: int, *, send: bool) -> None:
        """Record ``seq`` for ``stream`` (lower or repeated values are ignored)
        and, when ``send``, ACK it to the relay."""
        if seq <= self.acked.get(stream, -1):
            return
        self.acked[stream] = seq
        if not send:
            return
        if self._scheduled:
            self._due.add(stream)
            return
        self._scheduled = True
        asyncio.get_running_loop().call_soon(self.send_due)
        self._write([stream])

    def send_due(self) -> None:
        """Send the ACKs coalesced so far (before a GOODBYE, or at the turn's end)."""
        self._scheduled = False
        due, self._due = self._due, set()
        self._write(due)

    def _write(self, streams: Iterable[str]) -> None:
        channel = self._channel()
        if channel is None or channel.closed:
            return
        frames = []
        for stream in streams:
            stream_id = self._ids.get(stream)
            if stream_id is not None:
                frames.append(channel.conn.send(Ack(stream_id, self.acked[stream])))
        with contextlib.suppress(Exception):
            channel.writelines(frames)
