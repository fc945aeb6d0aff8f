"""The JetStream clients' own metrics against a real server: the publisher times
every PubAck, and a subscriber's lag gauge is what the server says its consumer
has not delivered yet (consumer info ``num_pending``), per stream it reads."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from nats_harness import NatsServer

import nats
from _support import wait_until
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.jetstream import JetStreamPublisher, JetStreamSubscriber
from audiosockets.jetstream.mapping import NatsSettings
from audiosockets.metrics import Metrics

FMT = AudioFormat(16000, 1, SampleType.INT16)
CHUNKS = 300


async def test_publisher_times_every_ack(nats_server: NatsServer) -> None:
    metrics = Metrics()
    pub = JetStreamPublisher(nats_server.url, name="rec", metrics=metrics)
    stream = pub.stream("timed", FMT)
    async with pub:
        for _ in range(20):
            stream.send(np.zeros(160, dtype=np.int16))
        assert await pub.flush(10)
    name = "audiosockets_jetstream_publish_ack_latency_seconds"
    labels = {"stream": "timed"}
    assert metrics.registry.get_sample_value(f"{name}_count", labels) == 20
    total = metrics.registry.get_sample_value(f"{name}_sum", labels)
    assert total is not None
    assert 0 < total < 20 * 2.0  # each under the publish timeout


async def test_lag_gauge_is_the_servers_num_pending_per_stream(nats_server: NatsServer) -> None:
    pub = JetStreamPublisher(nats_server.url, name="rec")
    streams = [pub.stream(name, FMT) for name in ("lag-a", "lag-b")]
    async with pub:
        for stream in streams:
            for _ in range(CHUNKS):
                stream.send(np.zeros(160, dtype=np.int16))
        assert await pub.flush(20)
    metrics = Metrics()
    settings = NatsSettings(lag_interval=0.2)
    # A group member owns both streams (one consumer each) and never iterates:
    # its readers stop after a batch, the rest stays in JetStream.
    sub = JetStreamSubscriber(
        nats_server.url,
        "lag-*",
        group="g",
        name="slow",
        start="earliest",
        metrics=metrics,
        settings=settings,
        queue_chunks=2,
    )
    client = await nats.connect(nats_server.url)
    try:
        async with sub:
            await wait_until(lambda: len(sub._readers) == 2, timeout=15, what="two readers")
            js = client.jetstream()

            async def server_says() -> dict[str, int]:
                out = {}
                for key, reader in sub._readers.items():
                    assert reader.consumer is not None
                    info = await js.consumer_info(settings.stream, reader.consumer)
                    out[key] = int(info.num_pending or 0)
                return out

            def gauge(stream: str) -> float | None:
                return metrics.registry.get_sample_value(
                    "audiosockets_jetstream_consumer_pending_chunks", {"stream": stream}
                )

            await wait_until(
                lambda: all(r.consumer for r in sub._readers.values()), what="consumers"
            )
            # Polled with a deadline: the readers stop pulling after a batch, and
            # the gauge follows within one lag_interval.
            deadline = time.monotonic() + 15
            said = await server_says()
            while any(gauge(k) != v for k, v in said.items()) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                said = await server_says()
            assert {k: gauge(k) for k in said} == said
            assert all(0 < v < CHUNKS + 1 for v in said.values()), said
            # A stream this member no longer reads (moved to another member)
            # loses its series; the other keeps it.
            await sub.stop_reader("lag-a")
            await wait_until(lambda: gauge("lag-a") is None, timeout=5, what="lag-a removed")
            assert gauge("lag-b") == said["lag-b"]
    finally:
        await client.close()
