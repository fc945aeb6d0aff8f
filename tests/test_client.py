"""Publisher and Subscriber behaviour a user relies on, against a real relay."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from _support import wait_until
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.client import (
    ChunkSubscription,
    ChunkTooLarge,
    Publisher,
    RetryPolicy,
    SpoolingStream,
    Subscriber,
)
from audiosockets.errors import ErrorCode
from audiosockets.metrics import Metrics
from audiosockets.protocol import Connection, ErrorFrame, Hello, Limits, Welcome
from audiosockets.relay import Relay, RelayConfig

FMT = AudioFormat(16000, 1, SampleType.INT16)
FAST = RetryPolicy(initial=0.02, cap=0.2, jitter=0.02, connect_timeout=1.0)


def block(value: int) -> np.ndarray:
    return np.full(320, value, dtype=np.int16)


async def test_restarted_publisher_continues_the_relays_numbering(relay: Relay) -> None:
    sub = Subscriber(relay.url, "mic", retry=FAST, start="earliest")
    await sub.start()
    first = Publisher(relay.url, name="rec", retry=FAST)
    await first.start()
    s1 = first.stream("mic", FMT)
    for i in range(10):
        s1.send(block(i))
    assert await first.flush(5)
    await first.close()
    # A new process for the same stream: its own numbering starts at 0 again.
    second = Publisher(relay.url, name="rec", retry=FAST)
    s2 = second.stream("mic", FMT)
    for i in range(10, 15):
        s2.send(block(i))
    await second.start()
    assert await second.wait_connected(5)
    assert await second.flush(5)
    got = []
    async with asyncio.timeout(5):
        async for chunk in sub:
            got.append((chunk.seq, int(chunk.samples[0, 0])))
            if len(got) == 15:
                break
    assert got == [(i, i) for i in range(15)], (
        "the second life must continue at seq 10, not vanish as duplicates"
    )
    assert s2.next_seq == 15
    await second.close()
    await sub.close()


async def test_oversized_chunk_and_long_name_are_refused_locally(relay: Relay) -> None:
    pub = Publisher(relay.url, retry=FAST)
    stream = pub.stream("mic", FMT)
    with pytest.raises(ValueError, match="frame limit"):
        stream.send(np.zeros(700_000, dtype=np.int16))
    with pytest.raises(ValueError, match="stream name"):
        pub.stream("x" * 500, FMT)
    with pytest.raises(ValueError, match="int16"):
        stream.send(np.zeros(320, dtype=np.float32))
    assert stream.next_seq == 0, "a refused chunk takes no sequence number"


@pytest.mark.parametrize("relay_config", [RelayConfig(port=0, limits=Limits(max_frame_size=256))])
async def test_a_chunk_over_the_relays_frame_limit_ends_the_publisher_not_a_retry_loop(
    relay: Relay,
) -> None:
    """The relay announces its frame limit in WELCOME; a chunk that does not fit would
    be refused on every reconnect (163 sessions in 10 s): the publisher fails at once,
    sends nothing and never reports the chunk as taken."""
    metrics = Metrics()
    pub = Publisher(relay.url, retry=RetryPolicy(initial=0.2, cap=0.4, jitter=0.0), metrics=metrics)
    stream = pub.stream("mic", FMT)
    stream.send(block(1))  # 640 bytes: more than this relay accepts
    await pub.start()
    await asyncio.wait_for(pub.failed.wait(), 5)
    assert isinstance(pub.failure, ChunkTooLarge)
    assert pub.failure.exit_code == 2
    assert pub.failure.fits_frames == (256 - 20) // 2
    assert "at most 236 bytes of audio per chunk (118 frames)" in str(pub.failure)
    assert await pub.flush(1.0) is False  # not taken, and said so at once
    await pub.close(0.1)
    assert (
        metrics.registry.get_sample_value("audiosockets_reconnects_total", {"role": "publisher"})
        == 0
    )
    assert relay.metrics.registry.get_sample_value(
        "audiosockets_chunks_received_total", {"stream": "mic"}
    ) in (None, 0)
    assert (
        metrics.registry.get_sample_value(
            "audiosockets_chunks_dropped_total", {"stream": "mic", "reason": "closed_unsent"}
        )
        == 1
    )


async def test_a_session_the_relay_keeps_ending_backs_off() -> None:
    """A relay that ends every session at once with a retryable code (INTERNAL) must
    not see a reconnect storm."""
    sessions = 0

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sessions
        sessions += 1
        conn = Connection("relay")
        while not isinstance(conn.next_event(), Hello):
            conn.receive_data(await reader.read(4096))
        writer.write(conn.send(Welcome("flaky", 2000, 1 << 20, 0)))
        writer.write(conn.send(ErrorFrame(ErrorCode.INTERNAL, "internal relay error")))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    metrics = Metrics()
    pub = Publisher(
        f"tcp://127.0.0.1:{port}",
        retry=RetryPolicy(initial=0.2, cap=0.4, jitter=0.0),
        metrics=metrics,
    )
    pub.stream("mic", FMT).send(block(1))
    async with server:
        started = time.monotonic()
        await pub.start()
        # Each ended session is followed by the tenacity backoff: 0.2, 0.4, 0.4 s
        # (initial doubling up to the cap, no jitter), so the 4th session cannot
        # start before 1.0 s. A reconnect storm would get there in milliseconds.
        await wait_until(lambda: pub.sessions >= 4, timeout=10, what="4 ended sessions")
        elapsed = time.monotonic() - started
        await pub.close(0.1)
    assert elapsed >= 0.2 + 0.4 + 0.4 - 0.05, f"4 sessions in {elapsed:.2f} s: no backoff"
    assert sessions >= 4
    assert pub.failure is None  # retryable: still trying until closed
    assert "internal relay error" in (pub.last_error or "")


async def test_subscriber_counts_gaps_and_suppresses_duplicates(relay: Relay) -> None:
    sub = Subscriber(relay.url, "mic", retry=FAST, start="earliest")
    await sub.start()
    pub = Publisher(relay.url, retry=FAST)
    stream = pub.stream("mic", FMT)
    await pub.start()
    stream.send(block(0))
    stream.next_seq = 5  # the recorder lost 1..4 (say, a spool overflow)
    stream.send(block(5))
    async with asyncio.timeout(5):
        seqs = [(await sub.get()).seq, (await sub.get()).seq]
    assert seqs == [0, 5]
    assert sub.gaps == 4
    gaps = sub.metrics.registry.get_sample_value(
        "audiosockets_sequence_gaps_total", {"stream": "mic"}
    )
    assert gaps == 4
    await pub.close()
    await sub.close()


async def test_publisher_spool_drops_oldest_unsent_and_counts(relay: Relay) -> None:
    metrics = Metrics()
    # Nothing listens on port 1: every chunk stays unsent.
    pub = Publisher("tcp://127.0.0.1:1", history_seconds=0.1, retry=FAST, metrics=metrics)
    stream = pub.stream("mic", FMT)
    for i in range(10):  # 10 x 20 ms = 200 ms into a 100 ms spool
        stream.send(block(i))
    assert stream.dropped == 5
    assert [e.seq for e in stream.history] == [5, 6, 7, 8, 9]
    value = metrics.registry.get_sample_value(
        "audiosockets_chunks_dropped_total", {"stream": "mic", "reason": "spool_full"}
    )
    assert value == 5
    assert abs(stream.spooled_seconds - 0.1) < 1e-9
    # The read-only view the recorder saves on close: the same unsent chunks, a copy.
    assert [e.seq for e in stream.unsent_chunks()] == [5, 6, 7, 8, 9]
    assert stream.unsent == 5
    stream.unsent_chunks().clear()
    assert len(stream.history) == 5


def test_client_classes_provide_the_typed_seams() -> None:
    pub = Publisher("tcp://127.0.0.1:1", retry=FAST)
    stream = pub.stream("mic", FMT)
    assert isinstance(stream, SpoolingStream)
    stream.send(block(1))
    assert (stream.unsent, stream.spooled_seconds) == (1, pytest.approx(0.02))
    sub = Subscriber("tcp://127.0.0.1:1", "mic", retry=FAST)
    assert isinstance(sub, ChunkSubscription)
    assert set(sub.assigned) == set()
    with pytest.raises(AttributeError):
        sub.assigned = {"x"}  # type: ignore[misc]


async def test_status_report_lists_publishers_and_subscribers(relay: Relay) -> None:
    from audiosockets.client import fetch_status

    pub = Publisher(relay.url, name="rec-1", retry=FAST)
    pub.stream("mic", FMT)
    await pub.start()
    sub = Subscriber(relay.url, "mic", group="g", name="proc-1", retry=FAST)
    await sub.start()
    await wait_until(
        lambda: "mic" in relay.groups.get("g", type("G", (), {"assignment": {}})()).assignment
    )
    report = await fetch_status(relay.url)
    assert [p["name"] for p in report["publishers"]] == ["rec-1"]
    assert report["subscribers"][0]["group"] == "g"
    assert report["groups"]["g"]["assignment"] == {"mic": "proc-1"}
    assert report["streams"][0]["publisher"] == "rec-1"
    await pub.close()
    await sub.close()


def test_history_indexes_and_pops_like_a_deque() -> None:
    from audiosockets.client import History, SpooledChunk

    h = History()
    for seq in range(3000):
        h.append(SpooledChunk(seq, 0, b"", 0.02))
    for _ in range(2000):  # past the compaction threshold
        h.popleft()
    assert len(h) == 1000
    assert h[0].seq == 2000
    assert h[-1].seq == 2999
    assert [e.seq for e in h][:3] == [2000, 2001, 2002]
    assert [e.seq for e in reversed(h)][:2] == [2999, 2998]
    with pytest.raises(IndexError):
        h[1000]


async def test_a_long_spool_is_sent_in_order(relay: Relay) -> None:
    """Tens of thousands of spooled chunks (a long outage at small blocks) go out
    in order once the relay is there; nothing is skipped or sent twice."""
    sub = Subscriber(relay.url, "mic", retry=FAST, start="earliest", queue_chunks=20000)
    await sub.start()
    pub = Publisher(relay.url, retry=FAST, history_seconds=1000)
    stream = pub.stream("mic", FMT)
    for i in range(20000):
        stream.send(block(i % 30000))
    assert stream.spooled_seconds == pytest.approx(400.0)
    await pub.start()
    assert await pub.flush(30)
    assert stream.spooled_seconds == 0.0
    seqs = []
    async with asyncio.timeout(30):
        while len(seqs) < 20000:
            seqs.append((await sub.get()).seq)
    assert seqs == list(range(20000))
    await pub.close()
    await sub.close()
