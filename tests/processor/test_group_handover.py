"""A group member that dies with chunks still in its backlog loses none of them:
the processor ACKs a chunk only once its handler finished, so the next owner
resumes after the last chunk really processed."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import typing

import numpy as np

from _support import wait_until
from audiosockets.audio import AudioFormat, Chunk, SampleType
from audiosockets.client import Publisher, RetryPolicy, Subscriber
from audiosockets.metrics import Metrics
from audiosockets.processor import Processor
from audiosockets.relay import Relay

FMT = AudioFormat(16000, 1, SampleType.INT16)
FAST = RetryPolicy(initial=0.02, cap=0.2, jitter=0.02, connect_timeout=1.0)
PROCESSED: dict[str, list[int]] = {"a": [], "b": []}
LOCK = threading.Lock()


def slow_a(chunk: Chunk) -> dict[str, int]:
    time.sleep(0.02)  # the work of a slow handler, not a wait
    with LOCK:
        PROCESSED["a"].append(chunk.seq)
    return {"seq": chunk.seq}


def fast_b(chunk: Chunk) -> dict[str, int]:
    with LOCK:
        PROCESSED["b"].append(chunk.seq)
    return {"seq": chunk.seq}


async def start_member(
    relay: Relay, handler: str, name: str
) -> tuple[Processor, Subscriber, asyncio.Task[None]]:
    proc = Processor(f"test_group_handover:{handler}", metrics=Metrics(), events=io.StringIO())
    sub = Subscriber(
        relay.url,
        "s",
        group="g",
        name=name,
        retry=FAST,
        manual_ack=True,
        on_stream_closed=proc.stream_closed,
    )
    proc.on_done = sub.ack
    await sub.start()
    task = asyncio.create_task(proc.run(sub))
    return proc, sub, task


async def test_member_crash_with_a_full_backlog_loses_nothing(relay: Relay) -> None:
    PROCESSED["a"].clear()
    PROCESSED["b"].clear()
    pub = Publisher(relay.url, name="rec", retry=FAST)
    stream = pub.stream("s", FMT)
    await pub.start()
    _pa, sub_a, task_a = await start_member(relay, "slow_a", "a")
    await wait_until(lambda: "s" in relay.groups.get("g", _Empty).assignment, what="a owns s")
    for seq in range(60):
        stream.send(np.full(320, seq, dtype=np.int16))
    # a's backlog fills at once; its handler works through it slowly.
    await wait_until(lambda: len(PROCESSED["a"]) >= 10, what="a processed ten")
    assert sub_a.positions["s"] >= 40, "the backlog should hold far more than a processed"
    channel = sub_a.channel
    assert channel is not None
    channel.abort()  # a crash: no goodbye, the backlog dies with it
    task_a.cancel()
    await asyncio.gather(task_a, return_exceptions=True)
    await sub_a._stop_task(farewell=False)
    processed_by_a = set(PROCESSED["a"])
    acked = relay.groups["g"].acked.get("s", -1)
    assert acked < max(processed_by_a) + 1, "ACK must not run ahead of the handler"

    _pb, sub_b, task_b = await start_member(relay, "fast_b", "b")
    for seq in range(60, 80):
        stream.send(np.full(320, seq, dtype=np.int16))
    await wait_until(lambda: 79 in PROCESSED["b"], timeout=15, what="b reached the end")
    everything = processed_by_a | set(PROCESSED["b"])
    assert everything >= set(range(80)), f"lost {sorted(set(range(80)) - everything)}"
    # At-least-once: only chunks a processed but had not acknowledged come twice.
    assert len(processed_by_a & set(PROCESSED["b"])) <= len(processed_by_a) - (acked + 1)
    assert json.dumps(sorted(PROCESSED["b"]))  # events are plain JSON-able ints
    task_b.cancel()
    await asyncio.gather(task_b, return_exceptions=True)
    await sub_b.close()
    await pub.close()


class _Empty:
    assignment: typing.ClassVar[dict[str, object]] = {}
