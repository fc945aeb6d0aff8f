"""(a) Publisher -> JetStream -> fan-out subscribers: every chunk, in order,
sample for sample, on a real nats-server; names that are not subject tokens
travel escaped; a publisher that starts again continues the numbering."""

from __future__ import annotations

import numpy as np
import pytest
from nats_harness import NatsServer

from _support import wait_until
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.connect import connect_publisher, connect_subscriber
from audiosockets.jetstream import JetStreamPublisher, JetStreamSubscriber
from audiosockets.metrics import Metrics

FMT = AudioFormat(16000, 1, SampleType.INT16)
BLOCK = 320  # 20 ms


def source(n_blocks: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-32768, 32767, size=n_blocks * BLOCK, dtype=np.int16)


async def test_every_chunk_in_order_sample_exact(nats_server: NatsServer) -> None:
    names = ["mic-1", "hall.2 küche"]
    audio = {name: source(150, seed) for seed, name in enumerate(names)}
    pub_metrics, sub_metrics, all_metrics = Metrics(), Metrics(), Metrics()
    pub = connect_publisher(nats_server.url, name="rec", metrics=pub_metrics)
    assert isinstance(pub, JetStreamPublisher)
    # One subscriber from before the first chunk (live), one for a glob.
    live = connect_subscriber(nats_server.url, "hall.2 küche", name="live", metrics=sub_metrics)
    everything = connect_subscriber(
        nats_server.url, "*", name="all", start="earliest", metrics=all_metrics
    )
    assert isinstance(live, JetStreamSubscriber)
    async with pub, live, everything:
        assert await pub.wait_connected(10)
        assert await live.wait_connected(10)
        await wait_until(lambda: "" in live._readers, what="reader started")
        await wait_until(lambda: live._readers[""].consumers_created > 0, what="consumer")
        streams = {name: pub.stream(name, FMT) for name in names}
        for i in range(150):
            for name in names:
                seq = streams[name].send(audio[name][i * BLOCK : (i + 1) * BLOCK])
                assert seq == i
        assert await pub.flush(15)
        got: dict[str, list[np.ndarray]] = {name: [] for name in names}
        seqs: dict[str, list[int]] = {name: [] for name in names}
        async with __import__("asyncio").timeout(20):
            while sum(len(v) for v in got.values()) < 300:
                chunk = await everything.get()
                got[chunk.stream].append(chunk.samples[:, 0].copy())
                seqs[chunk.stream].append(chunk.seq)
                assert chunk.format == FMT
        for name in names:
            assert seqs[name] == list(range(150))
            assert np.array_equal(np.concatenate(got[name]), audio[name])
        live_chunks = [await live.get(10) for _ in range(150)]
        assert [c.seq for c in live_chunks] == list(range(150))
        assert {c.stream for c in live_chunks} == {"hall.2 küche"}
        assert np.array_equal(
            np.concatenate([c.samples[:, 0] for c in live_chunks]), audio["hall.2 küche"]
        )
        assert everything.gaps == everything.duplicates == 0
    for name in names:
        assert (
            pub_metrics.registry.get_sample_value(
                "audiosockets_chunks_sent_total", {"stream": name}
            )
            == 150
        )
        assert (
            all_metrics.registry.get_sample_value(
                "audiosockets_chunks_received_total", {"stream": name}
            )
            == 150
        )
        assert (
            pub_metrics.registry.get_sample_value(
                "audiosockets_chunks_dropped_total", {"stream": name, "reason": "spool_full"}
            )
            == 0
        )


async def test_a_new_publisher_continues_the_numbering(nats_server: NatsServer) -> None:
    block = source(1, 7)
    async with connect_publisher(nats_server.url, name="first") as pub:
        stream = pub.stream("mic-1", FMT)
        for _ in range(5):
            stream.send(block)
        assert await pub.flush(10)
    async with connect_publisher(nats_server.url, name="second") as pub:
        stream = pub.stream("mic-1", FMT)
        assert stream.send(block) == 0  # numbered locally until it learns better
        assert await pub.flush(10)
        assert stream.next_seq == 6
    async with connect_subscriber(nats_server.url, "mic-1", start="earliest") as sub:
        seqs = [(await sub.get(10)).seq for _ in range(6)]
    assert seqs == list(range(6))


async def test_a_stream_end_reaches_subscribers(nats_server: NatsServer) -> None:
    closed: list[str] = []
    sub = connect_subscriber(
        nats_server.url, "mic-*", start="earliest", on_stream_closed=closed.append
    )
    async with sub:
        async with connect_publisher(nats_server.url) as pub:
            pub.stream("mic-9", FMT).send(source(1, 3))
        assert (await sub.get(10)).seq == 0
        await wait_until(lambda: closed == ["mic-9"], what="the end marker")


@pytest.mark.parametrize("bad", ["ws://h:1", "nats://h:1/path", "nats://h:1?nope=1"])
def test_bad_nats_urls_are_configuration_errors(bad: str) -> None:
    from audiosockets.errors import ConfigError

    with pytest.raises(ConfigError):
        connect_publisher(bad)
