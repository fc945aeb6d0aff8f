"""(e) Edge to central: a recorder publishes to the NATS leaf node on its PC
(JetStream domain ``edge1``); the central hub's stream sources the edge stream.
The leaf's link to the hub is cut for 5 s of audio and restored: the central
stream holds every chunk, in order, sample for sample."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from nats_harness import LinkCutter, NatsServer, free_port
from test_groups import FMT, block_of

from _support import wait_until
from audiosockets.connect import connect_publisher, connect_subscriber
from audiosockets.jetstream.admin import init_stream
from audiosockets.jetstream.mapping import NatsSettings


@pytest.mark.slow
async def test_leaf_link_cut_for_5_s_central_stream_complete(
    servers: list[NatsServer], tmp_path: Path
) -> None:
    hub = NatsServer("hub", tmp_path, leaf_port=free_port(), domain="hub")
    servers.append(hub)
    hub.start()
    assert hub.leaf_port is not None
    link = LinkCutter(hub.leaf_port)
    await link.start()
    edge = NatsServer(
        "edge1", tmp_path, domain="edge1", leaf_remotes=[f"nats://127.0.0.1:{link.port}"]
    )
    servers.append(edge)
    edge.start()
    # The central stream: no subjects of its own, it sources the edge's stream.
    said = await init_stream(hub.url, NatsSettings(), sources=("edge1",))
    assert "sourcing edge1" in said
    pub = connect_publisher(edge.url, name="edge-rec")
    stream = pub.stream("site1-mic", FMT)
    central = connect_subscriber(hub.url, "site1-*", name="central", start="earliest")
    got: list[np.ndarray] = []
    seqs: list[int] = []

    async def collect() -> None:
        async for chunk in central:
            seqs.append(chunk.seq)
            got.append(chunk.samples[:, 0].copy())

    sent = 0

    async def publish(rounds: int) -> None:
        nonlocal sent
        for _ in range(rounds):
            stream.send(
                block_of(0, sent), captured_ns=1_700_000_000_000_000_000 + sent * 20_000_000
            )
            sent += 1
            await asyncio.sleep(0.02)  # pacing the producer at real time, not waiting

    reader = asyncio.create_task(collect())
    try:
        async with pub, central:
            await publish(50)
            await wait_until(lambda: len(seqs) >= 20, timeout=30, what="chunks at the hub")
            link.cut()
            await publish(250)  # 5 s of audio while the hub is unreachable
            before_restore = len(seqs)
            assert pub.streams["site1-mic"].unsent == 0, "the leaf node should take everything"
            link.restore()
            await publish(50)
            assert await pub.flush(10)
            await wait_until(lambda: len(seqs) >= sent, timeout=60, what="every chunk centrally")
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await link.close()
    assert before_restore < 300, "the link cut did not hold anything back"
    assert seqs == list(range(sent))
    assert np.array_equal(
        np.concatenate(got), np.concatenate([block_of(0, i) for i in range(sent)])
    )
