"""Issue 11, items 2 and 3: empty chunks are refused, tiny chunks cost what
they cost, and all windows together stay within ``max_window_memory``.

Each case runs against a relay in its own process with a healthy 16 kHz
stream beside it: the relay stays up, the healthy stream loses nothing, the
relay's RSS grows by at most the budget, and each refusal or drop is counted
exactly.
"""

from __future__ import annotations

import asyncio
import time

from audiosockets.audio import AudioFormat, SampleType
from audiosockets.errors import ErrorCode
from audiosockets.protocol import (
    ChunkData,
    NeedData,
    OpenStream,
    StartPosition,
    Subscribe,
    encode_chunk,
)

from .harness import MiB, RawSession, healthy_stream, raw_session, relay_process, wait_for

MONO16 = AudioFormat(16000, 1, SampleType.INT16)
STEREO48 = AudioFormat(48000, 2, SampleType.INT16)


async def _flood_empty(url: str, i: int, chunks: int) -> tuple[int, str] | None:
    session = await raw_session(url, "publisher", f"empty-{i}")
    session.send(OpenStream(1, f"empty-{i}", MONO16))
    batch = encode_chunk(1, 0, 0, b"")  # bypasses the codec's own refusal
    for start in range(0, chunks, 10_000):
        session.writer.write(b"".join(batch for _ in range(min(10_000, chunks - start))))
        try:
            await session.writer.drain()
        except ConnectionError:
            break
    answer = await session.farewell()
    session.close()
    return answer


async def test_empty_chunks_are_a_protocol_error_and_cost_nothing() -> None:
    sessions, per_session = 50, 20_000  # 1,000,000 empty chunks in all
    with relay_process() as relay, healthy_stream(relay.url) as healthy:
        rss0 = relay.rss_bytes()
        answers = await asyncio.gather(
            *(_flood_empty(relay.url, i, per_session) for i in range(sessions))
        )
        grown = relay.rss_bytes() - rss0
        report = healthy.stop()
        assert relay.alive()
        text = relay.scrape()
        logged = [line for line in relay.log_text().splitlines() if "empty chunk" in line]
    # One log line per reason per 10 s, however many sessions earned one.
    assert 1 <= len(logged) <= 2, logged
    # A client still writing when the relay closes may get a reset instead of
    # the ERROR frame (None); the relay's count is exact either way.
    assert {a[0] if a else None for a in answers} <= {ErrorCode.BAD_FORMAT, None}
    assert any(answers)
    assert all("at least one frame" in a[1] for a in answers if a)
    assert (
        relay.sample("audiosockets_protocol_errors_total", text, reason="empty_chunk") == sessions
    )
    assert relay.total("audiosockets_chunks_received_total", text, stream="empty-0") == 0
    assert grown <= 64 * MiB, f"relay RSS grew {grown / MiB:.1f} MiB"
    report.assert_lossless()


async def test_a_million_one_frame_chunks_are_accounted_as_the_memory_they_take() -> None:
    n = 1_000_000
    budget = 32 * MiB
    with (
        relay_process(max_window_memory=budget) as relay,
        healthy_stream(relay.url) as healthy,
    ):
        rss0 = relay.rss_bytes()
        session = await raw_session(relay.url, "publisher", "tiny")
        session.send(OpenStream(1, "tiny", MONO16))
        pcm = b"\x01\x00"
        now = time.time_ns()
        for start in range(0, n, 20_000):
            session.writer.write(
                b"".join(encode_chunk(1, seq, now, pcm) for seq in range(start, start + 20_000))
            )
            await session.writer.drain()
        await wait_for(
            lambda: relay.sample("audiosockets_chunks_received_total", stream="tiny") == n,
            timeout=120,
            what="the relay to take every tiny chunk",
        )
        text = relay.scrape()
        grown = relay.rss_bytes() - rss0
        session.close()
        report = healthy.stop()
        assert relay.alive()
    held = relay.sample("audiosockets_window_memory_bytes", text)
    tiny = relay.sample("audiosockets_replay_window_bytes", text, stream="tiny")
    # Without per-chunk overhead the window would claim 30 bytes a chunk.
    assert tiny > 0
    assert held <= budget
    assert relay.sample("audiosockets_replay_window_seconds", text, stream="tiny") < 30
    assert grown <= 64 * MiB, f"relay RSS grew {grown / MiB:.1f} MiB"
    report.assert_lossless()


async def test_windows_together_stay_within_max_window_memory() -> None:
    streams, chunk_seconds, per_stream = 4, 0.5, 40 * MiB
    budget = 32 * MiB
    frames = int(STEREO48.rate * chunk_seconds)
    pcm = b"\x01\x02\x03\x04" * frames  # 192 KB of 48 kHz stereo int16
    chunks = per_stream // len(pcm)
    names = [f"big-{i}" for i in range(streams)]
    with (
        relay_process(max_window_memory=budget, replay_seconds=3600.0) as relay,
        healthy_stream(relay.url) as healthy,
    ):
        rss0 = relay.rss_bytes()
        # A subscriber to the big streams that never reads: the budget trims
        # audio it was never sent, and each such chunk is counted for it.
        stalled = await raw_session(relay.url, "subscriber", "stalled")
        stalled.send(Subscribe("big-*", "", StartPosition.LIVE, ()))

        async def publish(i: int) -> RawSession:
            session = await raw_session(relay.url, "publisher", f"big-{i}")
            session.send(OpenStream(1, f"big-{i}", STEREO48))
            for seq in range(chunks):
                session.writer.write(encode_chunk(1, seq, time.time_ns(), pcm))
                await session.writer.drain()
            return session  # open until the relay has it all: an abort would drop the tail

        publishers = await asyncio.gather(*(publish(i) for i in range(streams)))
        await wait_for(
            lambda: (
                sum(relay.sample("audiosockets_chunks_received_total", stream=s) for s in names)
                == streams * chunks
            ),
            timeout=120,
            what="the relay to take every big chunk",
        )
        for publisher in publishers:
            publisher.close()
        held = relay.sample("audiosockets_window_memory_bytes")
        grown = relay.rss_bytes() - rss0
        # Now the stalled subscriber reads: what it gets plus what the relay
        # counted lost for it must be every chunk the relay took, exactly.
        STALLED_COUNTS.clear()
        got = asyncio.ensure_future(count_chunks(stalled))

        def accounted() -> bool:
            text = relay.scrape()
            lost = sum(
                relay.total("audiosockets_chunks_dropped_total", text, stream=s) for s in names
            )
            return sum(STALLED_COUNTS.values()) + lost == streams * chunks

        await wait_for(accounted, timeout=120, what="the stalled subscriber's chunks to add up")
        text = relay.scrape()
        got.cancel()
        report = healthy.stop()
        assert relay.alive()
        stalled.close()
    received = sum(
        relay.sample("audiosockets_chunks_received_total", text, stream=s) for s in names
    )
    sent = sum(relay.sample("audiosockets_chunks_sent_total", text, stream=s) for s in names)
    dropped = sum(relay.total("audiosockets_chunks_dropped_total", text, stream=s) for s in names)
    trimmed = sum(
        relay.sample(
            "audiosockets_chunks_dropped_total", text, stream=s, reason="window_memory_exceeded"
        )
        for s in names
    )
    assert received == streams * chunks
    # What the subscriber got is what the relay says it sent; the rest is counted.
    assert sum(STALLED_COUNTS.values()) == sent
    assert sent + dropped == received, (sent, dropped, received)
    assert trimmed > 0
    assert held <= budget
    assert grown <= budget + 64 * MiB, f"relay RSS grew {grown / MiB:.1f} MiB"
    report.assert_lossless()
    print(
        f"windows: {received:g} chunks in, {sent:g} sent, {trimmed:g} window_memory_exceeded, "
        f"{dropped - trimmed:g} other drops; window memory {held / MiB:.1f} MiB; "
        f"RSS +{grown / MiB:.1f} MiB"
    )


#: CHUNKs the stalled subscriber received, by the relay's stream id.
STALLED_COUNTS: dict[int, int] = {}


async def count_chunks(session: RawSession) -> None:
    """Read every frame; count the CHUNKs per stream id in ``STALLED_COUNTS``."""
    conn = session.conn
    while True:
        event = conn.next_event()
        if isinstance(event, NeedData):
            data = await session.reader.read(1 << 16)
            if not data:
                return
            conn.receive_data(data)
        elif isinstance(event, ChunkData):
            STALLED_COUNTS[event.stream_id] = STALLED_COUNTS.get(event.stream_id, 0) + 1
