"""Planned handovers in a JetStream group (in process): a member joining takes
half the streams, a member leaving hands its streams on; the streams are
never on two members at once, and together the members see every chunk."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import numpy as np
from nats_harness import NatsServer

from _support import wait_until
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.connect import connect_publisher
from audiosockets.jetstream import JetStreamSubscriber

FMT = AudioFormat(16000, 1, SampleType.INT16)
STREAMS = [f"h-{i}" for i in range(4)]


async def test_join_and_leave_hand_streams_over(nats_server: NatsServer) -> None:
    url = nats_server.url
    seen: dict[str, set[int]] = defaultdict(set)
    closed: list[tuple[str, str]] = []

    def member(name: str) -> JetStreamSubscriber:
        return JetStreamSubscriber(
            url,
            "h-*",
            group="g",
            name=name,
            start="earliest",
            on_stream_closed=lambda s: closed.append((name, s)),
        )

    async def consume(sub: JetStreamSubscriber) -> None:
        async for chunk in sub:
            seen[chunk.stream].add(chunk.seq)

    pub = connect_publisher(url, name="rec")
    streams = [pub.stream(s, FMT) for s in STREAMS]
    sent = 0

    async def publish(rounds: int) -> None:
        nonlocal sent
        for _ in range(rounds):
            for s in streams:
                s.send(np.full(320, sent % 3000, dtype=np.int16))
            sent += 1
            await asyncio.sleep(0.01)  # pacing the producer, not waiting for anything

    m0, m1 = member("m0"), member("m1")
    tasks: list[asyncio.Task[None]] = []
    try:
        await pub.start()
        await m0.start()
        tasks.append(asyncio.create_task(consume(m0)))
        await publish(30)
        await wait_until(lambda: m0.assigned == set(STREAMS), timeout=30, what="m0 owns all")
        await m1.start()
        tasks.append(asyncio.create_task(consume(m1)))
        await publish(30)
        await wait_until(
            lambda: len(m0.assigned) == 2 and len(m1.assigned) == 2, timeout=30, what="2 + 2"
        )
        assert not m0.assigned & m1.assigned
        moved = sorted(s for n, s in closed if n == "m0")
        assert moved == sorted(m1.assigned)  # m0 was told which streams it lost
        await publish(30)
        tasks[0].cancel()
        await m0.close()  # leaves: its streams move to m1 after its acknowledged point
        await publish(30)
        await wait_until(lambda: m1.assigned == set(STREAMS), timeout=30, what="m1 owns all")
        assert await pub.flush(10)
        await wait_until(
            lambda: all(len(seen[s]) == sent for s in STREAMS), timeout=30, what="every chunk"
        )
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await m0.close()
        await m1.close()
        await pub.close()
    for s in STREAMS:
        assert seen[s] == set(range(sent)), s
