"""A group Subscriber consuming a batch of chunks ACKs them in a few frames, not one per
chunk, and the relay still learns the latest position of every stream."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from _support import wait_until
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.client import Publisher, RetryPolicy, Subscriber
from audiosockets.metrics import Metrics
from audiosockets.relay import Relay

FMT = AudioFormat(16000, 1, SampleType.INT16)
FAST_RETRY = RetryPolicy(initial=0.02, cap=0.2, jitter=0.02, connect_timeout=1.0)
CHUNKS = 200


async def test_acks_are_coalesced_and_the_last_one_arrives(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    acks: list[tuple[int, int]] = []
    relay_ack = relay.ack

    def counting_ack(session: object, stream_id: int, seq: int) -> None:
        acks.append((stream_id, seq))
        relay_ack(session, stream_id, seq)  # type: ignore[arg-type]

    monkeypatch.setattr(relay, "ack", counting_ack)
    pub = Publisher(relay.url, name="rec", retry=FAST_RETRY, metrics=Metrics())
    sub = Subscriber(
        relay.url, "*", group="g", name="a", start="earliest", retry=FAST_RETRY, metrics=Metrics()
    )
    await pub.start()
    await sub.start()
    try:
        assert await sub.wait_connected(5)
        await wait_until(lambda: "g" in relay.groups, what="the group to exist")
        stream = pub.stream("mic", FMT)
        for _ in range(CHUNKS):
            stream.send(np.zeros((320, 1), dtype=np.int16))
        await wait_until(lambda: relay.streams.get("mic") is not None)
        await wait_until(lambda: relay.streams["mic"].last_seq == CHUNKS - 1)
        seen = []
        async with asyncio.timeout(10):
            async for chunk in sub:
                seen.append(chunk.seq)
                if chunk.seq == CHUNKS - 1:
                    break
        assert seen == list(range(CHUNKS))
        sub.ack("mic", CHUNKS - 1)  # the last one (iteration ACKs the one before)
        await wait_until(
            lambda: relay.groups["g"].acked.get("mic") == CHUNKS - 1, what="the last ACK"
        )
        # Chunks arrive in batches of many per read: far fewer ACK frames than chunks.
        assert len(acks) < CHUNKS / 4, len(acks)
        assert [seq for _id, seq in acks] == sorted(seq for _id, seq in acks)
    finally:
        await sub.close()
        await pub.close(timeout=0.5)
