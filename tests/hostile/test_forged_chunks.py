"""Issue 11, item 5 against a relay process with the healthy stream beside it:
forged sequence numbers and capture times are refused, each counted once,
and poison no counter; the healthy stream loses nothing. (The pure rules,
forged ACKs and resume points, and a failed OPEN_STREAM: ``tests/test_plausible.py``.)"""

from __future__ import annotations

import asyncio
import time

from audiosockets.audio import AudioFormat, SampleType
from audiosockets.errors import ErrorCode
from audiosockets.protocol import OpenStream, encode_chunk

from .harness import HEALTHY_STREAM, MiB, healthy_stream, raw_session, relay_process

MONO16 = AudioFormat(16000, 1, SampleType.INT16)
EACH = 25  # sessions per kind of forgery


async def _forge(url: str, name: str, chunks: list[tuple[int, int]]) -> tuple[int, str] | None:
    session = await raw_session(url, "publisher", name)
    session.send(OpenStream(1, name, MONO16))
    for seq, captured in chunks:
        session.writer.write(encode_chunk(1, seq, captured, b"\0\0"))
    answer = await session.farewell(timeout=30)
    session.close()
    return answer


async def test_forged_chunks_are_refused_and_poison_nothing() -> None:
    now = time.time_ns()
    kinds = {
        "seq_top": [(2**64 - 1, now)],  # the 36-byte CHUNK
        "seq_jump": [(0, now), (2**63, now)],
        "future": [(0, 2**63 - 1)],
        "past": [(0, -(2**63))],
    }
    with relay_process() as relay, healthy_stream(relay.url) as healthy:
        rss0 = relay.rss_bytes()
        answers = await asyncio.gather(
            *(
                _forge(relay.url, f"{kind}-{i}", chunks)
                for kind, chunks in kinds.items()
                for i in range(EACH)
            )
        )
        text = relay.scrape()
        grown = relay.rss_bytes() - rss0
        report = healthy.stop()
        assert relay.alive()
    assert {a[0] if a else None for a in answers} <= {ErrorCode.MALFORMED_FRAME, None}
    assert relay.sample("audiosockets_protocol_errors_total", text, reason="seq_jump") == 2 * EACH
    assert (
        relay.sample("audiosockets_protocol_errors_total", text, reason="capture_time") == 2 * EACH
    )
    assert relay.total("audiosockets_protocol_errors_total", text) == 4 * EACH
    # Only the seq_jump sessions' first chunk (seq 0) was real and stored.
    healthy_in = relay.sample("audiosockets_chunks_received_total", text, stream=HEALTHY_STREAM)
    assert relay.total("audiosockets_chunks_received_total", text) - healthy_in == EACH
    assert relay.total("audiosockets_sequence_gaps_total", text) == 0
    # The latency histogram saw real chunks only: well under a minute each.
    latency_sum = relay.total("audiosockets_end_to_end_latency_seconds_sum", text)
    assert latency_sum < 60 * (report.sent + EACH)
    assert grown <= 64 * MiB
    report.assert_lossless()
