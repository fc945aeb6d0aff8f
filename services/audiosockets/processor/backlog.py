"""The processor's bounded backlog between the receive loop and the handler."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..audio import Chunk

# --- the bounded backlog --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """Backlog marker: the relay closed this stream for us; tear its handler down."""

    stream: str


class ChunkBacklog:
    """FIFO of chunks bounded by count and/or seconds of audio; drops the oldest.

    ``push`` never blocks and returns the chunks it evicted to make room, so
    the caller counts them. At least the newest chunk is always kept.
    ``StreamClosed`` markers keep their place in the order, take no room and
    are never evicted.
    """

    def __init__(self, max_chunks: int | None = None, max_seconds: float | None = 10.0) -> None:
        if max_chunks is None and max_seconds is None:
            raise ValueError("a backlog needs a limit: max_chunks and/or max_seconds")
        if max_chunks is not None and max_chunks < 1:
            raise ValueError("max_chunks must be >= 1")
        if max_seconds is not None and max_seconds <= 0:
            raise ValueError("max_seconds must be > 0")
        self.max_chunks = max_chunks
        self.max_seconds = max_seconds
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

    def push(self, chunk: Chunk) -> list[Chunk]:
        """Append ``chunk``; returns the chunks evicted (oldest first) to stay within
        ``max_chunks``/``max_seconds`` (the caller counts them as dropped). Never blocks."""
        self._items.append(chunk)
        self.chunks += 1
        self.seconds += chunk.seconds
        self.depth[chunk.stream] = self.depth.get(chunk.stream, 0) + 1
        dropped = []
        while self.chunks > 1 and self._full():
            dropped.append(self._evict_oldest())
        return dropped

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
