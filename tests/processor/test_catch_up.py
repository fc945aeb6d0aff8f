"""Catching up applies backpressure; only live audio fallen behind is dropped (issue 13, item 4).

Two streams had been recording for a while; a processor started later with ``--start
earliest`` and a fast handler dropped hundreds of chunks as ``processor_overrun`` while
the relay still held all of that audio (and in a group those drops are acknowledged,
so gone for good).
"""

from __future__ import annotations

import asyncio
import io
import time

import handlers_for_tests as hft
import numpy as np
import pytest

from _support import wait_until
from audiosockets.audio import AudioFormat, Chunk, SampleType
from audiosockets.client import Publisher, RetryPolicy, Subscriber
from audiosockets.metrics import Metrics
from audiosockets.processor import ChunkBacklog, Processor
from audiosockets.relay import Relay

FMT = AudioFormat(16000, 1, SampleType.INT16)
BLOCK = 320  # 20 ms
BLOCK_NS = 20_000_000
FAST_RETRY = RetryPolicy(initial=0.02, cap=0.2, jitter=0.02, connect_timeout=1.0)


@pytest.fixture(autouse=True)
def _reset_handlers() -> None:
    hft.reset()


def value(m: Metrics, name: str, **labels: str) -> float:
    v = m.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


async def test_a_processor_started_later_from_earliest_drops_nothing(relay: Relay) -> None:
    n = 300  # 6 s of audio per stream: three times the processor's 2 s backlog, per stream
    streams = ("late-a", "late-b")
    pub = Publisher(relay.url, name="rec", retry=FAST_RETRY)
    await pub.start()
    handles = {name: pub.stream(name, FMT) for name in streams}
    rng = np.random.default_rng(3)
    start_ns = time.time_ns() - n * BLOCK_NS  # recorded over the last 6 s
    for i in range(n):
        for handle in handles.values():
            block = rng.integers(-9000, 9000, BLOCK, dtype=np.int16)
            handle.send(block, captured_ns=start_ns + i * BLOCK_NS)
    assert await pub.flush(5)

    m = Metrics()
    sub = Subscriber(
        relay.url, "late-*", name="late", start="earliest", metrics=m, retry=FAST_RETRY
    )
    proc = Processor(
        "handlers_for_tests:record", metrics=m, events=io.StringIO(), backlog_seconds=2.0
    )
    async with sub:
        run = asyncio.create_task(proc.run(sub))
        await wait_until(lambda: proc.stats.processed == 2 * n, timeout=30, what="all chunks")
        proc.request_stop()
        await run
    await pub.close(0.5)

    for name in streams:
        assert (
            value(m, "audiosockets_chunks_dropped_total", stream=name, reason="processor_overrun")
            == 0
        )
        assert value(m, "audiosockets_sequence_gaps_total", stream=name) == 0
        for reason in ("subscriber_slow", "replay_window_exceeded"):
            assert (
                value(
                    relay.metrics, "audiosockets_chunks_dropped_total", stream=name, reason=reason
                )
                == 0
            )
    assert sorted(hft.SEEN) == sorted(list(range(n)) * 2)
    assert proc.stats.dropped == 0


# --- the policy, with a fake clock ----------------------------------------------------------

NOW = 1_800_000_000_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> int:
        return self.now


def chunk(seq: int, captured_ns: int, received_ns: int, stream: str = "s") -> Chunk:
    return Chunk(stream, seq, captured_ns, FMT, bytes(BLOCK * 2), received_ns)


def test_replayed_chunks_are_never_dropped_the_backlog_asks_for_backpressure() -> None:
    clock = FakeClock()
    backlog = ChunkBacklog(max_seconds=0.1, clock=clock)  # five 20 ms chunks
    ten_s_ago = NOW - 10_000_000_000
    dropped = [
        backlog.push(chunk(i, ten_s_ago + i * BLOCK_NS, NOW)) for i in range(8)
    ]  # arrived 10 s after capture: a replay
    assert dropped == [[]] * 8
    assert backlog.over_limit
    assert backlog.seconds_until_stale() is None  # never: the caller must wait for room
    assert [backlog.pop().seq for _ in range(3)] == [0, 1, 2]  # type: ignore[union-attr]
    assert not backlog.over_limit


def test_live_chunks_are_dropped_only_once_they_are_backlog_seconds_late() -> None:
    """Two live streams: 100 ms of backlog audio spans only 50 ms of capture time, so a
    full backlog is not yet late: backpressure first, drops once the audio is late."""
    clock = FakeClock()
    backlog = ChunkBacklog(max_seconds=0.1, clock=clock)
    for i in range(4):
        for stream in ("a", "b"):
            captured = NOW + i * BLOCK_NS
            clock.now = captured + 1_000_000  # received 1 ms after capture: live
            assert backlog.push(chunk(i, captured, clock.now, stream)) == []
    assert backlog.over_limit  # 160 ms held, the oldest only 61 ms late
    assert backlog.seconds_until_stale() == pytest.approx(0.039)
    clock.now = NOW + 100_000_001
    dropped = backlog.evict_stale()
    assert [(c.stream, c.seq) for c in dropped] == [("a", 0), ("b", 0)]  # oldest first
    assert backlog.over_limit  # a1 is 80 ms late: kept, still waiting for room
    assert backlog.seconds_until_stale() == pytest.approx(0.02)


def test_a_live_chunk_not_yet_late_waits_and_says_for_how_long() -> None:
    clock = FakeClock()
    backlog = ChunkBacklog(max_chunks=2, max_seconds=1.0, clock=clock)
    for i in range(3):
        assert backlog.push(chunk(i, NOW + i * BLOCK_NS, NOW + i * BLOCK_NS)) == []
    clock.now = NOW + 2 * BLOCK_NS
    assert backlog.over_limit
    assert backlog.seconds_until_stale() == pytest.approx(1.0 - 0.04)
    clock.now = NOW + 1_000_000_001
    assert [c.seq for c in backlog.evict_stale()] == [0]
