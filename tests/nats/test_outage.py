"""(b) Every NATS server down for 5 s while a recorder records, then back: the
recorder spools, re-sends in order, and the subscriber that was reading through
the outage has every chunk, sample for sample."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest
from nats_harness import NatsServer

from _support import wait_until
from audiosockets.audio import Chunk
from audiosockets.connect import connect_subscriber
from audiosockets.jetstream import JetStreamPublisher
from audiosockets.metrics import Metrics
from audiosockets.recorder import Recorder, RecorderConfig

sys.path.insert(0, str(Path(__file__).parents[1] / "recorder"))
from recorder_fakes import write_pcm_wav


async def collect(sub: object, into: list[Chunk]) -> None:
    async for chunk in sub:  # type: ignore[attr-defined]
        into.append(chunk)


@pytest.mark.slow
async def test_all_servers_down_for_5_s_loses_nothing(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    data = np.random.default_rng(11).integers(-20000, 20000, (16000 * 12, 1), dtype=np.int16)
    write_pcm_wav(tmp_path / "noise.wav", data, 16000)  # 12 s: 600 chunks of 20 ms
    metrics = Metrics()
    recorder = Recorder(
        RecorderConfig(
            relay=nats_server.url, stream="outage-1", source=f"file:{tmp_path / 'noise.wav'}"
        ),
        metrics=metrics,
    )
    assert isinstance(recorder.publisher, JetStreamPublisher)
    received: list[Chunk] = []
    sub = connect_subscriber(nats_server.url, "outage-*", name="outage-sub", start="earliest")
    await sub.start()
    reader = asyncio.create_task(collect(sub, received))
    try:
        await recorder.start()
        await wait_until(lambda: len(received) >= 50, timeout=15, what="the first chunks")
        nats_server.kill()
        stream = recorder.publisher.streams["outage-1"]
        # Five seconds of audio captured while no server exists, measured by the spool.
        await wait_until(lambda: stream.unsent >= 250, timeout=15, what="5 s spooled")
        nats_server.start()
        await asyncio.wait_for(recorder.serve_forever(), 20)  # the file has been captured
        await wait_until(lambda: len(received) >= 600, timeout=30, what="every chunk")
    finally:
        await recorder.stop()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await sub.close()
    assert [c.seq for c in received] == list(range(600))
    assert np.array_equal(np.concatenate([c.samples for c in received]), data)
    assert sub.gaps == 0
    for reason in ("spool_full", "closed_unsent"):
        assert (
            metrics.registry.get_sample_value(
                "audiosockets_chunks_dropped_total", {"stream": "outage-1", "reason": reason}
            )
            == 0
        )
    assert metrics.registry.get_sample_value(
        "audiosockets_reconnects_total", {"role": "publisher"}
    ), "the recorder never reconnected: the server was not really down"
