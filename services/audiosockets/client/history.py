"""A published stream's spool: the chunks kept for re-sending after a reconnect."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(slots=True)
class SpooledChunk:
    seq: int
    captured_ns: int
    payload: bytes
    seconds: float


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
        return len(self._items) - self._head

    def __iter__(self) -> Iterator[SpooledChunk]:
        return itertools.islice(self._items, self._head, None)

    def __reversed__(self) -> Iterator[SpooledChunk]:
        items = self._items
        return (items[i] for i in range(len(items) - 1, self._head - 1, -1))

    def __getitem__(self, index: int) -> SpooledChunk:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("history index out of range")
        return self._items[self._head + index]

    def append(self, entry: SpooledChunk) -> None:
        self._items.append(entry)

    def popleft(self) -> SpooledChunk:
        if not len(self):
            raise IndexError("pop from an empty history")
        entry = self._items[self._head]
        self._head += 1
        if self._head > 1024 and self._head * 2 > len(self._items):
            del self._items[: self._head]
            self._head = 0
        return entry
