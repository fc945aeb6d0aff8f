"""(d) A 3-node cluster with 3 replicas: the node every client lists first is
SIGKILLed mid-stream and restarted; the group's archive equals the source,
sample for sample."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from nats_harness import NatsServer, ProcessMember, cluster
from test_groups import (
    FMT,
    _poll,
    assert_archive_exact,
    assignment,
    block_of,
    every_chunk_archived,
)

from audiosockets.connect import connect_publisher, fetch_status
from audiosockets.jetstream import JetStreamPublisher

STREAMS = [f"c-{i}" for i in range(4)]


@pytest.mark.slow
async def test_first_listed_node_killed_and_restarted(
    servers: list[NatsServer], tmp_path: Path
) -> None:
    nodes = cluster(tmp_path)
    servers.extend(nodes)
    for node in nodes:
        node.start()
    url = ",".join(n.url for n in nodes) + "?replicas=3"
    archive = tmp_path / "archive"
    archive.mkdir()
    members = [ProcessMember(f"m{i}", url, archive, tmp_path, "c-*") for i in range(2)]
    pub = connect_publisher(url, name="rec", history_seconds=120)
    assert isinstance(pub, JetStreamPublisher)
    streams = [pub.stream(name, FMT) for name in STREAMS]
    sent = 0

    async def publish(rounds: int) -> None:
        nonlocal sent
        for _ in range(rounds):
            for i, s in enumerate(streams):
                s.send(block_of(i, sent), captured_ns=1_700_000_000_000_000_000 + sent * 20_000_000)
            sent += 1
            await asyncio.sleep(0.02)  # pacing the producer at real time, not waiting

    try:
        await pub.start()
        for m in members:
            m.start()
        await publish(50)

        async def shared() -> bool:
            current = await assignment(url)
            return len(current) == 2 and sorted(s for v in current.values() for s in v) == STREAMS

        await _poll(shared, 60, "both members holding two streams")
        assert (await fetch_status(url))["replicas"] == 3
        assert pub.link.client is not None
        assert pub.link.client.connected_url.port == nodes[0].port  # the first listed
        await publish(50)
        nodes[0].kill()  # the node every client lists first
        await publish(150)
        nodes[0].start()
        await publish(100)
        assert await pub.flush(30), "the publisher never got everything acknowledged"
        held = await every_chunk_archived(archive, STREAMS, sent)
    finally:
        await pub.close()
        codes = [m.stop() for m in members]
    assert_archive_exact(held, STREAMS, sent)
    reconnects = pub.metrics.registry.get_sample_value(
        "audiosockets_reconnects_total", {"role": "publisher"}
    )
    assert reconnects, "the publisher never lost its server: the kill missed it"
    # (A clean SIGTERM exit is test_groups.py's to check: here a drain after the
    # catch-up can outlast the harness's patience on a loaded machine.)
    del codes
