"""A published stream's spool: the chunks kept for re-sending after a reconnect."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(slots=True)
class SpooledChunk:
    """One chunk kept in a stream's spool.

    ``seq``: the stream's sequence number; ``captured_ns``: capture time of the
    first sample, wall clock in ns; ``payload``: PCM bytes in the stream's
    format; ``seconds``: the audio's duration (frames / rate).
    """

    seq: int
    captured_ns: int
    payload: bytes
    seconds: float


#: What a popped slot holds until the list is compacted (not the chunk: its payload).
_GONE = SpooledChunk(-1, 0, b"", 0.0)


class History:
    """A stream's spool: oldest entry first, O(1) append, popleft and indexing.

    A deque indexes its middle in O(n), and sending walks from the first
    unsent entry, deep inside a long spool; a list with a moving head does not.
    """

    __slots__ = ("_head", "_items")

    def __init__(self) -> None:
        self._items: list[SpooledChunk] = []
        self._head = 0

    def __len__(self) -> int:
        """Number of chunks held (sent and unsent)."""
        return len(self._items) - self._head

    def __iter__(self) -> Iterator[SpooledChunk]:
        """Oldest chunk first."""
        return itertools.islice(self._items, self._head, None)

    def __reversed__(self) -> Iterator[SpooledChunk]:
        """Newest chunk first."""
        items = self._items
        return (items[i] for i in range(len(items) - 1, self._head - 1, -1))

    def __getitem__(self, index: int) -> SpooledChunk:
        """The chunk at ``index`` (0 oldest, -1 newest) in O(1); IndexError outside."""
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("history index out of range")
        return self._items[self._head + index]

    def append(self, entry: SpooledChunk) -> None:
        """Add ``entry`` as the newest chunk (no bound here: the stream trims)."""
        self._items.append(entry)

    def popleft(self) -> SpooledChunk:
        """Remove and return the oldest chunk; IndexError when empty."""
        if not len(self):
            raise IndexError("pop from an empty history")
        entry = self._items[self._head]
        # Let go of it now: a compaction may be 1024 chunks away, and a wide
        # stream's 1024 chunks are a gigabyte the byte bound promised to free.
        self._items[self._head] = _GONE
        self._head += 1
        if self._head > 1024 and self._head * 2 > len(self._items):
            del self._items[: self._head]
            self._head = 0
        return entry
