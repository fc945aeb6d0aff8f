"""The processor's bounded backlog between the receive loop and the handler.

Backpressure while catching up, drops only for live audio the handler let fall
more than ``backlog_seconds`` behind (see ``ChunkBacklog``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..audio import Chunk

# --- the bounded backlog --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """Backlog marker: the relay closed this stream for us; tear its handler down."""

    stream: str


class ChunkBacklog:
    """FIFO of chunks bounded by count and/or seconds of audio.

    Beyond the bound, the oldest chunk is dropped only if it is *live audio
    that the handler has let fall behind*: it arrived live (at most
    ``live_lag`` seconds after its capture) and is now more than
    ``max_seconds`` behind the wall clock (with only ``max_chunks``: any
    chunk that arrived live). ``push`` returns the chunks it evicted, so the
    caller counts them. Chunks that arrived late (a replay while catching
    up: ``--start earliest``, a resume, a publisher re-sending its spool) are
    never dropped here: the backlog stays over its bound (``over_limit``) and
    the caller stops taking chunks (backpressure) until the handler makes
    room; the relay still holds that audio. At least the newest chunk is
    always kept. ``StreamClosed`` markers keep their place in the order,
    take no room and are never evicted.

    ``live_lag`` defaults to ``min(1 s, max_seconds / 2)``; ``clock`` is the wall
    clock in ns (``captured_ns`` and ``received_ns`` are wall-clock ns).
    """

    def __init__(
        self,
        max_chunks: int | None = None,
        max_seconds: float | None = 10.0,
        *,
        live_lag: float | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        if max_chunks is None and max_seconds is None:
            raise ValueError("a backlog needs a limit: max_chunks and/or max_seconds")
        if max_chunks is not None and max_chunks < 1:
            raise ValueError("max_chunks must be >= 1")
        if max_seconds is not None and max_seconds <= 0:
            raise ValueError("max_seconds must be > 0")
        self.max_chunks = max_chunks
        self.max_seconds = max_seconds
        if live_lag is None:
            live_lag = 1.0 if max_seconds is None else min(1.0, max_seconds / 2)
        #: A chunk that arrived later than this after its capture is a replay.
        self.live_lag = live_lag
        self._clock = clock
        self._items: deque[Chunk | StreamClosed] = deque()
        self.chunks = 0
        self.seconds = 0.0
        self.depth: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def _full(self) -> bool:
        if self.max_chunks is not None and self.chunks > self.max_chunks:
            return True
        return self.max_seconds is not None and self.seconds > self.max_seconds + 1e-9

    @property
    def over_limit(self) -> bool:
        """More than the bound is held (only while the caller applies backpressure)."""
        return self.chunks > 1 and self._full()

    def push(self, chunk: Chunk) -> list[Chunk]:
        """Append ``chunk``; returns the chunks evicted (oldest first, live audio fallen
        behind) to stay within the bound (the caller counts them as dropped). Never
        blocks; may leave the backlog ``over_limit`` (the caller then waits for room)."""
        self._items.append(chunk)
        self.chunks += 1
        self.seconds += chunk.seconds
        self.depth[chunk.stream] = self.depth.get(chunk.stream, 0) + 1
        return self.evict_stale()

    def evict_stale(self) -> list[Chunk]:
        """While over the bound, drop the oldest chunks that are live audio too late."""
        dropped = []
        now = self._clock()
        while self.over_limit:
            oldest = self._oldest()
            if oldest is None or self._stale_in(oldest, now) > 0:
                break
            dropped.append(self._evict_oldest())
        return dropped

    def seconds_until_stale(self) -> float | None:
        """When the oldest chunk may be dropped (0: now), or None: it never is (a replay)."""
        oldest = self._oldest()
        if oldest is None:
            return None
        wait = self._stale_in(oldest, self._clock())
        return None if wait == float("inf") else max(0.0, wait)

    def _stale_in(self, chunk: Chunk, now_ns: int) -> float:
        """Seconds until ``chunk`` counts as live audio fallen behind (inf: never)."""
        if chunk.received_ns - chunk.captured_ns > round(self.live_lag * 1e9):
            return float("inf")  # arrived as a replay: catching up, never dropped here
        if self.max_seconds is None:
            return 0.0
        return (chunk.captured_ns + round(self.max_seconds * 1e9) - now_ns) / 1e9

    def _oldest(self) -> Chunk | None:
        for item in self._items:
            if isinstance(item, Chunk):
                return item
        return None

    def mark_closed(self, stream: str) -> None:
        """Queue a ``StreamClosed`` marker for ``stream`` behind its chunks (takes no room)."""
        self._items.append(StreamClosed(stream))

    def _evict_oldest(self) -> Chunk:
        for i, item in enumerate(self._items):
            if isinstance(item, Chunk):
                del self._items[i]
                return self._account(item)
        raise AssertionError("no chunk to evict")

    def _account(self, chunk: Chunk) -> Chunk:
        self.chunks -= 1
        self.seconds = max(0.0, self.seconds - chunk.seconds) if self.chunks else 0.0
        self.depth[chunk.stream] -= 1
        return chunk

    def pop(self) -> Chunk | StreamClosed | None:
        """The oldest item (a ``Chunk`` or a ``StreamClosed`` marker), or None when empty."""
        if not self._items:
            return None
        item = self._items.popleft()
        return self._account(item) if isinstance(item, Chunk) else item


async def make_room(
    backlog: ChunkBacklog, room: asyncio.Event, drop: Callable[[list[Chunk]], None]
) -> None:
    """Backpressure: wait until ``backlog`` is within its bound again.

    Audio still worth handling (a replay being caught up, live audio not yet
    ``max_seconds`` late) waits for ``room`` (set whenever the handler takes a
    chunk); the caller stops reading meanwhile, so the relay keeps the audio. Live
    audio that becomes late while waiting goes to ``drop`` (counted there).
    """
    while backlog.over_limit:
        room.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(backlog.seconds_until_stale()):
                await room.wait()
        drop(backlog.evict_stale())


class CompletionOrder:
    """ "Done up to seq N" per stream, when chunks finish out of order.

    With several workers chunks finish in any order, but the group ACK may
    only move past a chunk once it and every chunk received before it on the
    same stream is finished (handled, or dropped and counted).
    """

    def __init__(self) -> None:
        self._pending: dict[str, deque[int]] = {}
        self._finished: dict[str, set[int]] = {}

    def received(self, stream: str, seq: int) -> None:
        """``seq`` arrived on ``stream`` (call in arrival order)."""
        self._pending.setdefault(stream, deque()).append(seq)

    def finish(self, stream: str, seq: int) -> int | None:
        """``seq`` is finished; returns the new "done up to" seq, or None if it did not move."""
        pending = self._pending.get(stream)
        if pending is None:
            return None
        finished = self._finished.setdefault(stream, set())
        finished.add(seq)
        last = None
        while pending and pending[0] in finished:
            last = pending.popleft()
            finished.discard(last)
        return last
