"""Archive replicas in one group, sharing one directory, through joins, a
rebalance and a crash: together they hold every chunk of every stream."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from pathlib import Path

import numpy as np

from _support import wait_until
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.client import Publisher, RetryPolicy, Subscriber
from audiosockets.handlers import HandlerOptions
from audiosockets.metrics import Metrics
from audiosockets.processor import Processor
from audiosockets.relay import Relay

sys.path.insert(0, str(Path(__file__).parents[1] / "docker"))
from docker_harness import archived_segments, missing_seqs

FMT = AudioFormat(16000, 1, SampleType.INT16)
FAST = RetryPolicy(initial=0.02, cap=0.2, jitter=0.02, connect_timeout=1.0)
STREAMS = ("g-a", "g-b", "g-c")


class Member:
    def __init__(self, relay: Relay, name: str, directory: Path) -> None:
        self.processor = Processor(
            f"archive:{directory}",
            options=HandlerOptions(segment_seconds=0.5),
            metrics=Metrics(),
            events=io.StringIO(),
        )
        self.sub = Subscriber(
            relay.url,
            "g-*",
            group="archive",
            name=name,
            retry=FAST,
            manual_ack=True,
            on_stream_closed=self.processor.stream_closed,
        )
        self.processor.on_done = self.sub.ack
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.sub.start()
        self.task = asyncio.create_task(self.processor.run(self.sub))

    async def stop(self) -> None:
        await self.processor.stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)
        await self.sub.close()

    async def crash(self) -> None:
        channel = self.sub.channel
        assert channel is not None
        channel.abort()
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.sub._stop_task(farewell=False)


async def test_group_archive_holds_every_chunk_through_joins_and_a_crash(
    relay: Relay, tmp_path: Path
) -> None:
    pub = Publisher(relay.url, name="rec", retry=FAST)
    streams = [pub.stream(s, FMT) for s in STREAMS]
    await pub.start()
    members = [Member(relay, f"m{i}", tmp_path) for i in range(3)]
    n = 0

    async def publish(rounds: int) -> None:
        nonlocal n
        for _ in range(rounds):
            for s in streams:
                s.send(
                    np.full(320, n % 30000, dtype=np.int16),
                    captured_ns=1_700_000_000_000_000_000 + n * 20_000_000,
                )
            n += 1
            await asyncio.sleep(0.005)  # pacing the producer, not waiting for anything

    await members[0].start()
    await publish(40)
    await members[1].start()  # rebalance: a stream moves to m1
    await publish(40)
    await members[2].start()  # and one to m2
    await publish(40)
    await members[1].crash()  # its streams move on after its last ACK
    await publish(40)
    assert await pub.flush(5)
    group = relay.groups["archive"]
    await wait_until(
        lambda: all(group.acked.get(s, -1) >= n - 1 for s in STREAMS),
        timeout=15,
        what="every chunk acknowledged",
    )
    for m in (members[0], members[2]):
        await m.stop()
    await pub.close()
    segments = archived_segments(tmp_path)
    for s in STREAMS:
        missing = missing_seqs(segments, s, n - 1)
        assert missing == [], f"{s}: missing {missing[:10]}; " + json.dumps(
            [seg.__dict__ for seg in segments if seg.stream == s]
        )
