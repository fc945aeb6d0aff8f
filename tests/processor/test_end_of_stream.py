"""End of stream: a stream closes after its last chunk is handled (issue 13, item 6).

CLOSE_STREAM used to be applied when it came off the socket, ahead of the chunks still
queued in the client library: the archive completed its segment, then the last chunks
opened a new one, left as ``.part`` until the processor shut down.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np

from _support import wait_until
from audiosockets.audio import AudioFormat, Chunk, SampleType
from audiosockets.client import Publisher, RetryPolicy, Subscriber
from audiosockets.metrics import Metrics
from audiosockets.processor import Processor, ProcessorConfig, serve
from audiosockets.relay import Relay

FMT = AudioFormat(16000, 1, SampleType.INT16)
BLOCK = 320  # 20 ms
FAST_RETRY = RetryPolicy(initial=0.02, cap=0.2, jitter=0.02, connect_timeout=1.0)


def payloads(n: int, seed: int = 5) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(-20000, 20000, BLOCK, dtype=np.int16).tobytes() for _ in range(n)]


async def publish_and_close(relay: Relay, streams: dict[str, list[bytes]]) -> None:
    pub = Publisher(relay.url, name="rec", retry=FAST_RETRY)
    await pub.start()
    handles = {name: pub.stream(name, FMT) for name in streams}
    for i in range(max(len(p) for p in streams.values())):
        for name, data in streams.items():
            if i < len(data):
                handles[name].send(data[i])
    assert await pub.flush(5)
    await pub.close(2.0)  # CLOSE_STREAM after the last chunk


def check_archive(directory: Path, data: dict[str, list[bytes]]) -> None:
    """One closed segment per stream, exactly what was sent, no ``.part`` left."""
    assert not list(directory.glob(".*.part"))
    for name, sent in data.items():
        sidecars = [json.loads(p.read_text()) for p in sorted(directory.glob(f"{name}_*.json"))]
        assert [(s["first_seq"], s["last_seq"], s["ended_by"]) for s in sidecars] == [
            (0, len(sent) - 1, "closed")
        ]
        wav = directory / sidecars[0]["file"]
        assert wav.read_bytes()[44:] == b"".join(sent)


async def test_the_close_reaches_the_application_after_the_streams_last_chunk(
    relay: Relay,
) -> None:
    n = 40
    taken: list[Chunk] = []
    closed_after: list[int] = []
    sub = Subscriber(
        relay.url,
        "eos-*",
        name="eos-sub",
        start="earliest",
        retry=FAST_RETRY,
        on_stream_closed=lambda stream: closed_after.append(len(taken)),
    )
    async with sub:
        await sub.wait_connected(5)
        await publish_and_close(relay, {"eos-1": payloads(n)})
        # The relay's CLOSE_STREAM is off the socket before the application reads a chunk.
        await wait_until(lambda: sub.backlog == n + 1, what="chunks and the close queued")
        assert closed_after == []
        for _ in range(n):
            taken.append(await sub.get(timeout=5))
        assert closed_after == []  # the last chunk is in the application's hands
        reader = asyncio.create_task(sub.get())
        await wait_until(lambda: closed_after == [n], what="the close, after the last chunk")
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    assert [c.seq for c in taken] == list(range(n))


async def test_the_archive_completes_every_stream_with_no_part_left_while_running(
    relay: Relay, tmp_path: Path
) -> None:
    n = 60
    data = {"eos-a": payloads(n, 1), "eos-b": payloads(n, 2)}
    started: list[Processor] = []
    config = ProcessorConfig(
        handler=f"archive:{tmp_path}",
        relay=relay.url,
        stream="eos-*",
        metrics_port=0,
        start="earliest",
        events=str(tmp_path / "events.jsonl"),
    )
    task = asyncio.create_task(serve(config, metrics=Metrics(), started=started.append))
    try:
        await wait_until(lambda: bool(started), what="the processor")
        await publish_and_close(relay, data)

        def complete() -> bool:
            sidecars = [json.loads(p.read_text()) for p in tmp_path.glob("eos-*.json")]
            ends = {s["stream"]: s["last_seq"] for s in sidecars}
            return ends == {"eos-a": n - 1, "eos-b": n - 1}

        await wait_until(complete, timeout=15, what="both streams' segments completed")
        assert not task.done()  # the processor is still running: nothing waited for shutdown
        check_archive(tmp_path, data)
        assert started[0].stats.dropped == 0
    finally:
        if started:
            started[0].request_stop()
        await asyncio.wait_for(task, 10)
