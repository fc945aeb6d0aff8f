"""The publisher's spool over JetStream: an outage longer than the spool drops
the oldest unacknowledged chunks, counts every one (``spool_full``), and
delivers the rest in order once a server is back."""

from __future__ import annotations

import numpy as np
from nats_harness import NatsServer

from _support import wait_until
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.connect import connect_subscriber
from audiosockets.jetstream import JetStreamPublisher
from audiosockets.metrics import Metrics

FMT = AudioFormat(16000, 1, SampleType.INT16)


async def test_outage_longer_than_the_spool_drops_exactly_the_oldest(
    nats_server: NatsServer,
) -> None:
    metrics = Metrics()
    # 250 frames = 1/64 s per chunk (exact in binary): a 0.5 s spool holds 32 chunks.
    pub = JetStreamPublisher(nats_server.url, name="rec", history_seconds=0.5, metrics=metrics)
    stream = pub.stream("spool-1", FMT)
    async with pub:
        assert await pub.wait_connected(10)
        stream.send(np.full(250, 0, dtype=np.int16))
        assert await pub.flush(10)
        nats_server.kill()
        await wait_until(lambda: not pub.connected.is_set(), what="the publisher to notice")
        for seq in range(1, 101):
            assert stream.send(np.full(250, seq, dtype=np.int16)) == seq
        kept = stream.unsent
        dropped = metrics.registry.get_sample_value(
            "audiosockets_chunks_dropped_total", {"stream": "spool-1", "reason": "spool_full"}
        )
        assert kept + dropped == 100
        assert kept in (32, 33)  # 33: the chunk in flight when the server died stays
        nats_server.start()
        assert await pub.flush(20)
    sub = connect_subscriber(nats_server.url, "spool-1", start="earliest")
    async with sub:
        got = [await sub.get(10) for _ in range(kept + 1)]
    seqs = [c.seq for c in got]
    assert seqs[0] == 0
    assert seqs[-32:] == list(range(69, 101))  # the newest half second, complete
    assert all(int(c.samples[0, 0]) == c.seq for c in got)
    assert sub.gaps == dropped
