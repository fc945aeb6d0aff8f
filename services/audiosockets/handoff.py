"""The bounded hand-off between a Subscriber's socket reader and the application.

One read from the socket holds many CHUNK frames when the relay is ahead of the
application. ``asyncio.Queue`` would cost a future, a wake-up and a task switch per
chunk on both sides; here the reader appends every chunk decoded from one read and
wakes the consumer once, and the consumer takes chunks without suspending while any
are held.

Bound: at most ``limit`` chunks are held. The reader checks ``full()`` before
decoding the next frame and, when full, waits in ``wait_for_space()`` without
reading: the frames stay in the socket, the relay's per-subscriber queue fills,
and the relay drops and counts them (``subscriber_slow``). Both sides run on one
event loop; nothing here is thread-safe.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    """A bounded FIFO with one wake-up per batch: ``put`` a batch, ``publish``, ``get``."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a hand-off holds at least one item")
        self.limit = limit
        self._items: deque[T] = deque()
        self._nonempty = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()

    def __len__(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        return len(self._items) >= self.limit

    @property
    def room(self) -> int:
        """Items that may be ``put`` before the hand-off is full (0 when full)."""
        return max(0, self.limit - len(self._items))

    def put(self, item: T) -> None:
        """Append one item of a batch; the consumer is woken by ``publish``.

        Raises OverflowError when full: the reader must check ``full()`` first.
        """
        if len(self._items) >= self.limit:
            raise OverflowError(f"hand-off full ({self.limit} items)")
        self._items.append(item)

    def put_marker(self, item: T) -> None:
        """Append a marker that must keep its place after the items already put
        (an end of stream, a failure), even when the hand-off is full: markers
        are rare (one per stream end), so the bound holds within that count."""
        self._items.append(item)

    def publish(self) -> None:
        """The batch is complete: wake the consumer if it waits (once per batch)."""
        if self._items:
            self._nonempty.set()

    async def wait_for_space(self) -> None:
        """Return once the consumer has taken at least one item from a full hand-off."""
        while len(self._items) >= self.limit:
            self._space.clear()
            await self._space.wait()

    async def get(self) -> T:
        """The oldest item; waits (without a timeout) while there is none."""
        while not self._items:
            self._nonempty.clear()
            await self._nonempty.wait()
        item = self._items.popleft()
        if not self._space.is_set():
            self._space.set()
        return item
