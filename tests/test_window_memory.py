"""Replay windows account their real memory, and the relay-wide budget trims
the oldest audio of the largest window first (issue 11, items 2 and 3)."""

from __future__ import annotations

import random
import tracemalloc

from audiosockets.protocol import encode_chunk
from audiosockets.relay import ReplayWindow
from audiosockets.relay.budget import ENTRY_OVERHEAD_BYTES, MemoryLedger, trim_windows


def test_accounted_memory_covers_what_a_flood_of_tiny_chunks_really_costs() -> None:
    n = 100_000
    ledger = MemoryLedger()
    window = ReplayWindow(ledger)
    pcm = b"\x00\x01"  # one 16-bit frame: the smallest chunk the protocol allows
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for seq in range(1_000_000, 1_000_000 + n):
            frame = encode_chunk(1, seq, 1_700_000_000_000_000_000 + seq, pcm)
            window.append(seq, frame, 1 / 16000 + seq * 1e-12, arrived=seq * 0.001 + 0.5)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert window.memory_bytes == n * (30 + ENTRY_OVERHEAD_BYTES)
    assert ledger.held == window.memory_bytes
    # Never under-counted; over-counted by at most a third.
    assert used <= window.memory_bytes <= used * 4 // 3, (used, window.memory_bytes)


def test_the_ledger_is_the_sum_of_the_windows_through_every_change() -> None:
    rng = random.Random(11)
    ledger = MemoryLedger()
    windows = [ReplayWindow(ledger) for _ in range(4)]
    seqs = [0] * 4
    for step in range(5000):
        i = rng.randrange(4)
        op = rng.random()
        w = windows[i]
        if op < 0.7:
            w.append(seqs[i], b"x" * rng.randrange(1, 300), 0.02, arrived=step)
            seqs[i] += 1
        elif op < 0.85:
            w.trim(rng.uniform(0, 2), rng.randrange(0, 20_000))
        elif op < 0.97:
            w.drop_oldest(rng.randrange(0, 5))
        else:
            w.clear()
        assert ledger.held == sum(x.memory_bytes for x in windows)
        for x in windows:
            assert x.memory_bytes == sum(
                len(x.frames[j]) + ENTRY_OVERHEAD_BYTES for j in range(x.head, len(x.seqs))
            )


class _Stream:
    """The two attributes ``trim_windows`` reads from a ``StreamState``."""

    def __init__(self, sid: int, window: ReplayWindow) -> None:
        self.id = sid
        self.name = f"s{sid}"
        self.window = window


def test_the_budget_trims_the_largest_window_oldest_first_down_to_15_16() -> None:
    ledger = MemoryLedger()
    sizes = {1: 100, 2: 40, 3: 10}  # chunks of 1000-byte frames
    streams = []
    for sid, n in sizes.items():
        w = ReplayWindow(ledger)
        for seq in range(n):
            w.append(seq, b"x" * 1000, 0.02, arrived=seq)
        streams.append(_Stream(sid, w))
    per_chunk = 1000 + ENTRY_OVERHEAD_BYTES
    budget = 120 * per_chunk
    calls: list[tuple[str, int, int]] = []

    def before(stream: _Stream, n: int) -> None:  # type: ignore[valid-type]
        calls.append((stream.name, stream.window.base, n))

    trimmed = trim_windows(streams, ledger, budget, before)  # type: ignore[arg-type]
    target = budget - budget // 16
    assert ledger.held <= target
    assert ledger.held > target - per_chunk  # no more than needed
    assert trimmed == 150 - ledger.held // per_chunk
    # Only the largest window lost audio (it stays the largest), oldest first.
    assert {name for name, _, _ in calls} == {"s1"}
    assert calls[0][1] == 0
    assert len(streams[1].window) == 40
    assert len(streams[2].window) == 10
    assert streams[0].window.first_seq() == trimmed
    # Within budget: nothing happens.
    assert trim_windows(streams, ledger, budget, before) == 0  # type: ignore[arg-type]


def test_the_budget_levels_windows_when_trimming_one_would_pass_the_next() -> None:
    ledger = MemoryLedger()
    streams = []
    for sid in (1, 2):
        w = ReplayWindow(ledger)
        for seq in range(50):
            w.append(seq, b"x" * 1000, 0.02, arrived=seq)
        streams.append(_Stream(sid, w))
    per_chunk = 1000 + ENTRY_OVERHEAD_BYTES
    budget = 64 * per_chunk
    trim_windows(streams, ledger, budget, lambda s, n: None)  # type: ignore[arg-type]
    lengths = sorted(len(s.window) for s in streams)
    assert lengths[1] - lengths[0] <= 1, lengths  # equal windows lose equally
    assert ledger.held <= budget - budget // 16
