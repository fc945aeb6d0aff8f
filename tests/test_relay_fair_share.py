"""A publisher whose chunks arrive many per read still lets the other sessions run
every ``FAIR_SHARE`` chunks: the relay takes runs of chunks (``poll_chunks``)
only within one turn's share."""

from __future__ import annotations

import asyncio
import time
import types

import pytest

from _support import wait_until
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.protocol import ChunkData, Connection, Hello, OpenStream, Role
from audiosockets.relay import Relay
from audiosockets.relay import connections as relay_connections

FMT = AudioFormat(16000, 1, SampleType.INT16)
CHUNKS = 400  # about 270 KB: several reads of the relay's receive buffer


async def test_a_flooding_publisher_yields_every_fair_share(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    handled_at_yield: list[int] = []

    async def counting_sleep(delay: float, result: object = None) -> object:
        stream = relay.streams.get("mic")
        handled_at_yield.append(stream.chunks_total if stream is not None else 0)
        return await asyncio.sleep(delay, result)

    # Only the reader loop's asyncio sees the counting sleep.
    patched = types.SimpleNamespace(**{**vars(asyncio), "sleep": counting_sleep})
    monkeypatch.setattr(relay_connections, "asyncio", patched)
    assert relay.address is not None
    reader, writer = await asyncio.open_connection(relay.address.host, relay.address.port)
    conn = Connection("client")
    writer.write(conn.send(Hello(Role.PUBLISHER, "flood")))
    while conn.state.value != "open":
        conn.receive_data(await reader.read(1 << 16))
        conn.next_event()
    now = time.time_ns()
    blob = conn.send(OpenStream(1, "mic", FMT)) + b"".join(
        conn.send(ChunkData(1, seq, now, bytes(640))) for seq in range(CHUNKS)
    )
    writer.write(blob)  # one write: the relay reads many chunks at a time
    try:
        await wait_until(
            lambda: (
                relay.streams.get("mic") is not None and relay.streams["mic"].chunks_total == CHUNKS
            ),
            what="every chunk published",
        )
    finally:
        writer.close()
    steps = [b - a for a, b in zip([0, *handled_at_yield], handled_at_yield, strict=False)]
    assert max(steps) <= relay_connections.FAIR_SHARE, steps
    assert len(handled_at_yield) >= CHUNKS // relay_connections.FAIR_SHARE - 1
