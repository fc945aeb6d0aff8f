"""Relay-wide memory budgets: what every replay window holds together, and
what every connection has buffered of frames not yet complete.

``MemoryLedger`` is one mutable total that each ``ReplayWindow`` updates as it
appends, trims and clears, so the relay knows what its windows hold without a
scan. ``trim_windows`` enforces ``RelayConfig.max_window_memory``: the oldest
audio of the largest window goes first, down to 15/16 of the budget (so the
scan over windows runs once per sixteenth of the budget, not once per chunk).
``InputBudget`` enforces ``RelayConfig.max_input_bytes`` over the partial
frames of every connection (not the complete frames a busy relay has not read
yet: those are its own backlog, bounded per connection by backpressure).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Final

from ..errors import ErrorCode, RemoteProtocolError

if TYPE_CHECKING:
    from ..transport import Channel
    from .server import Relay
    from .sessions import SubscriberSession
    from .streams import StreamState
    from .subscriptions import Cursor


#: Memory one held chunk costs beyond its frame's bytes (CPython 3.11, 64-bit):
#: the bytes object's header (33), four list slots (32, plus over-allocation),
#: the seq int (28-36) and the duration and arrival floats (2 x 24), rounded
#: up. ``tests/test_window_memory.py`` measures it with tracemalloc.
ENTRY_OVERHEAD_BYTES: Final = 192


class MemoryLedger:
    """Bytes held, relay-wide; windows add and subtract as they change."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = 0


def trim_windows(
    streams: Iterable[StreamState],
    ledger: MemoryLedger,
    max_bytes: int,
    before_trim: Callable[[StreamState, int], None],
) -> int:
    """Trim the oldest chunks of the largest windows until ``ledger.held`` is
    at most 15/16 of ``max_bytes``; does nothing while it is within
    ``max_bytes``. ``before_trim(stream, n)`` is called before the ``n``
    oldest chunks of ``stream`` go (to count what readers lose). Returns the
    number of chunks trimmed."""
    if ledger.held <= max_bytes:
        return 0
    target = max_bytes - max_bytes // 16
    heap = [(-s.window.memory_bytes, s.id, s) for s in streams if len(s.window)]
    heapq.heapify(heap)
    trimmed = 0
    while ledger.held > target and heap:
        _, _, stream = heapq.heappop(heap)
        window = stream.window
        runner_up = -heap[0][0] if heap else 0
        # Drop from this window until it is no longer the largest or the
        # total is back under the target, whichever comes first.
        memory = window.memory_bytes
        excess = ledger.held - target
        n = 0
        freed = 0
        i = window.head
        end = len(window.seqs)
        while i < end and (n == 0 or (memory - freed >= runner_up and freed < excess)):
            freed += len(window.frames[i]) + ENTRY_OVERHEAD_BYTES
            n += 1
            i += 1
        before_trim(stream, n)
        window.drop_oldest(n)
        trimmed += n
        if len(window):
            heapq.heappush(heap, (-window.memory_bytes, stream.id, stream))
    return trimmed


def readers_lose(stream: StreamState, n: int, readers: Mapping[SubscriberSession, Cursor]) -> None:
    """The ``n`` oldest chunks of ``stream`` are about to go to keep the
    windows within the budget: each reader that had not been sent them loses
    them now, counted ``window_memory_exceeded`` (its cursor moves past them,
    so they are not counted again as ``replay_window_exceeded``; the
    session counts them once it has shown it is alive)."""
    window = stream.window
    end = window.base + n
    last_seq = window.seq_at(end - 1)
    for reader, cursor in list(readers.items()):
        start = max(cursor.next_ord, window.base)
        if start >= end:
            continue
        # Chunks at or below the cursor's resume point were never needed.
        lost = sum(1 for o in range(start, end) if window.seq_at(o) > cursor.after_seq)
        cursor.next_ord = end
        cursor.after_seq = max(cursor.after_seq, last_seq)
        if lost:
            cursor.dropped_window += lost
            reader.count_drop(stream.name, "window_memory_exceeded", lost)


class InputBudget:
    """The bytes every connection holds of frames not yet complete, relay-wide
    (``RelayConfig.max_input_bytes``): what lies after its last complete frame,
    read or not. Readers report as bytes arrive (``transport.AccountedReader``);
    when the total passes ``max_bytes`` the
    channel holding, or announcing in a frame in progress, the most is cut
    (ERROR MALFORMED_FRAME, counted ``reason="input_budget"``), then the next,
    until it fits. A healthy client holds at most a part of one small frame;
    whoever hoards is cut first. ``cuts`` counts the channels cut."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0
        self.cuts = 0
        self._by_channel: dict[Channel, int] = {}

    def hold(self, channel: Channel, nbytes: int) -> None:
        """``channel`` now holds ``nbytes`` of incomplete frames (0: none)."""
        before = self._by_channel.pop(channel, 0)
        if nbytes:
            self._by_channel[channel] = nbytes
        self.held += nbytes - before
        while self.held > self.max_bytes and self._by_channel:
            # Whoever holds or has announced the most: a hoarder's frame in
            # progress counts at its announced size, so it goes before a
            # healthy client whose turn on the loop came late.
            victim = max(
                self._by_channel,
                key=lambda c: max(c.pending_frame_length, self._by_channel[c]),
            )
            self.held -= self._by_channel.pop(victim)
            self.cuts += 1
            victim.cut(
                RemoteProtocolError(
                    f"the relay's input buffers are full ({self.max_bytes} bytes) and this "
                    "connection held the most of frames not yet complete",
                    ErrorCode.MALFORMED_FRAME,
                    "input_budget",
                )
            )


def hold_frame(
    relay: Relay, stream: StreamState, seq: int, frame: bytes, seconds: float, now: float
) -> None:
    """Hold one encoded CHUNK ``frame`` in ``stream``'s window (``seconds`` of
    audio, arrived at relay clock ``now``), trim that window to
    ``replay_seconds``/``max_window_bytes``, then keep every window together
    within ``max_window_memory`` (``trim_windows``)."""
    cfg = relay.config
    window = stream.window
    window.append(seq, frame, seconds, now)
    window.trim(cfg.replay_seconds, cfg.max_window_bytes)
    if relay.window_memory.held > cfg.max_window_memory:
        trim_windows(
            list(relay.streams.values()),
            relay.window_memory,
            cfg.max_window_memory,
            lambda s, n: readers_lose(s, n, relay.subscriptions.readers(s.name)),
        )
