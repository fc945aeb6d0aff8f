"""The relay-wide input budget (``max_input_bytes``) charges only bytes of frames
not yet complete: complete frames a starved relay has not read yet are healthy
clients' audio, held back by backpressure, never a reason to cut them; a
half-sent-frame hoarder beside them is still cut, and first."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from _support import wait_until
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.errors import ErrorCode
from audiosockets.metrics import Metrics
from audiosockets.protocol import (
    CHUNK_HEAD,
    HEADER,
    MAGIC,
    PROTOCOL_VERSION,
    ErrorFrame,
    FrameType,
    Limits,
    OpenStream,
    Role,
    StreamAccepted,
)
from audiosockets.relay import Relay, RelayConfig
from audiosockets.transport import Channel
from test_relay_limits import Raw, counter

FMT = AudioFormat(16000, 1, SampleType.INT16)
BLOCK = b"\x00\x01" * 320  # 20 ms at 16 kHz: a 668-byte CHUNK frame
HEALTHY = 12
CHUNKS = 50  # per healthy publisher: 33 KB, 1 s of audio, written at once
BUDGET = 128 << 10
#: A hoarder announces a 2-s CHUNK (64,020 bytes of payload, within the 64 KiB
#: frame limit) and sends 50,000 bytes of it: three together pass the budget,
#: two do not, even with every healthy publisher mid-frame beside them.
ANNOUNCED = CHUNK_HEAD.size + 2 * 16000 * 2
HOARDED = 50_000
#: The relay's loop does not run for this long (a starved host, as in the soak).
STALL = 0.5


def _stall(seconds: float) -> None:
    time.sleep(seconds)  # the stall under test: the loop cannot run meanwhile


def _unread(channel: Channel) -> int:
    return int(getattr(channel.reader, "pending", 0))


async def _publisher(relay: Relay, name: str) -> Raw:
    raw = await Raw.session(relay, Role.PUBLISHER)
    raw.send(OpenStream(1, name, FMT))
    assert isinstance(await raw.next(), StreamAccepted)
    return raw


async def test_complete_frames_a_starved_relay_has_not_read_are_not_cut() -> None:
    config = RelayConfig(
        host="127.0.0.1",
        port=0,
        heartbeat_interval=60.0,
        frame_timeout=60.0,  # only the budget ends a hoarder here
        limits=Limits(max_frame_size=64 << 10),
        max_input_bytes=BUDGET,
    )
    relay = Relay(config, metrics=Metrics())
    await relay.start()
    raws: list[Raw] = []
    try:
        healthy = [await _publisher(relay, f"pub-{i}") for i in range(HEALTHY)]
        hoarders = [await _publisher(relay, f"hoard-{i}") for i in range(3)]
        raws += healthy + hoarders
        # Everything goes into the sockets now, with no await in between, and
        # the loop then stalls: the relay reads all of it with no task having run.
        now = time.time_ns()
        for raw in healthy:
            raw.writer.write(
                b"".join(raw.conn.chunk_frame(1, s, now, BLOCK) for s in range(CHUNKS))
            )
        head = HEADER.pack(MAGIC, PROTOCOL_VERSION, FrameType.CHUNK, ANNOUNCED)
        body = CHUNK_HEAD.pack(1, 0, now) + b"\x00" * (HOARDED - len(head) - CHUNK_HEAD.size)
        for raw in hoarders:
            raw.writer.write(head + body)
        loop = asyncio.get_running_loop()
        seen: list[tuple[int, int]] = []  # (bytes received and not read, cuts)

        def look() -> None:
            unread = sum(_unread(s.channel) for s in relay.sessions)
            seen.append((unread, relay.input_budget.cuts))

        def stall_then_look() -> None:
            _stall(STALL)
            # Runs first in the next iteration: after the selector's reads of
            # this one (queued behind this callback), before any task.
            loop.call_soon(look)

        loop.call_soon(stall_then_look)

        def received(name: str) -> float:
            return counter(relay, "audiosockets_chunks_received_total", stream=name)

        await wait_until(
            lambda: all(received(f"pub-{i}") == CHUNKS for i in range(HEALTHY)),
            what="every healthy chunk to arrive",
        )
        unread, cuts = seen[0]
        assert unread > BUDGET  # the complete frames did pile up past the budget, unread
        assert cuts == 1  # and the hoarder was cut as its bytes arrived, before any task ran
        answers: list[Any] = []
        for raw in hoarders:
            try:
                answers.append(await raw.next(timeout=0.5))
            except TimeoutError:
                answers.append(None)  # not cut: it still holds its frame
        cut = [a for a in answers if isinstance(a, ErrorFrame)]
        assert len(cut) == 1, answers
        assert cut[0].code is ErrorCode.MALFORMED_FRAME
        assert "not yet complete" in cut[0].message
        assert relay.input_budget.cuts == 1
        assert counter(relay, "audiosockets_protocol_errors_total", reason="input_budget") == 1
        # Every healthy session goes on: it was told nothing, and answers now.
        for i, raw in enumerate(healthy):
            raw.send(OpenStream(2, f"probe-{i}", FMT))
        for raw in healthy:
            assert isinstance(await raw.next(), StreamAccepted)
    finally:
        for raw in raws:
            raw.close()
        await relay.stop()
