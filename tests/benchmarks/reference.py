"""What the two reference systems share: the chunk payload, the publisher loop, the tally.

Neither reference has sequence numbers or capture timestamps of its own, so the first
20 bytes of every chunk's audio carry them (``HEAD``: capture time in ns since the
epoch, sequence number, stream index); the rest is silence. The publisher loop and the
subscriber bookkeeping mirror ``audiosockets.loadtest``'s (same pacing, same flush
cadence at max rate, same completion rule), and report the same dicts, so
``loadtest._report`` turns them into the same figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from multiprocessing.connection import Connection as Pipe
from typing import Any

import numpy as np

from audiosockets.loadtest import LoadTestConfig

HEAD = struct.Struct("<qQI")  # captured_ns, seq, stream index


def stream_name(index: int) -> str:
    """The name loadtest gives stream ``index``: completion is checked by name."""
    return f"load-{index:04d}"


def chunk_bytes(cfg: LoadTestConfig) -> int:
    return cfg.frames * 2  # int16 mono, as loadtest's publishers send


class Sender:
    """One publisher connection of a reference system: send a chunk, flush the socket."""

    async def send(self, payload: bytes) -> None:
        raise NotImplementedError

    async def flush(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


async def publish(pipe: Pipe, cfg: LoadTestConfig, senders: Sequence[Sender]) -> None:
    """loadtest's publisher loop over ``senders`` (one per stream), with its pipe protocol."""
    pipe.send("ready")
    await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # "go"
    payload = bytearray(chunk_bytes(cfg))
    period = cfg.frames / cfg.sample_rate
    start = time.monotonic()
    started_ns = time.time_ns()
    sent = 0
    tick = 0
    while time.monotonic() - start < cfg.duration:
        captured = time.time_ns()
        for index, sender in enumerate(senders):
            HEAD.pack_into(payload, 0, captured, tick, index)
            await sender.send(bytes(payload))
        sent += len(senders)
        tick += 1
        if cfg.rate == "realtime":
            delay = start + tick * period - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        elif tick % 8 == 0:
            await asyncio.gather(*(s.flush() for s in senders))
    elapsed = time.monotonic() - start
    await asyncio.gather(*(s.flush() for s in senders))
    pipe.send(
        {
            "sent": sent,
            "elapsed": elapsed,
            "started_ns": started_ns,
            "last": {stream_name(i): tick - 1 for i in range(len(senders))},
            "spool_drops": 0,
            "bytes_per_chunk": len(payload),
        }
    )
    await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # "stop"
    for s in senders:
        with contextlib.suppress(Exception):
            await s.close()


class Tally:
    """What one subscriber connection received: counts, last seq per stream, latencies."""

    __slots__ = ("duplicates", "gaps", "last", "last_rx_ns", "latency_ns", "received")

    def __init__(self) -> None:
        self.received = 0
        self.duplicates = 0
        self.gaps = 0
        self.last: dict[int, int] = {}
        self.latency_ns: list[int] = []
        self.last_rx_ns = 0

    def chunk(self, buffer: bytes | bytearray, offset: int, now_ns: int) -> None:
        """Count the chunk whose ``HEAD`` starts at ``buffer[offset]``."""
        captured, seq, index = HEAD.unpack_from(buffer, offset)
        prev = self.last.get(index, -1)
        if seq <= prev:
            self.duplicates += 1
        else:
            if prev >= 0:
                self.gaps += seq - prev - 1
            self.last[index] = seq
        self.received += 1
        self.latency_ns.append(now_ns - captured)
        self.last_rx_ns = now_ns


async def subscribe(
    pipe: Pipe,
    cfg: LoadTestConfig,
    names: Sequence[str],
    progress: Any,
    connect: Callable[[str, Tally], Awaitable[Awaitable[None]]],
) -> None:
    """loadtest's subscriber protocol: ``connect(name, tally)`` returns the read loop."""
    tallies = [Tally() for _ in names]
    loops = [await connect(n, t) for n, t in zip(names, tallies, strict=True)]
    tasks = [asyncio.ensure_future(loop) for loop in loops]
    pipe.send("ready")
    final: dict[str, int] = await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
    want = {int(k.rsplit("-", 1)[1]): v for k, v in final.items()}

    def complete() -> bool:
        if cfg.group:  # each stream to one member: the union must be complete
            merged: dict[int, int] = {}
            for t in tallies:
                for k, v in t.last.items():
                    merged[k] = max(merged.get(k, -1), v)
            return all(merged.get(k, -1) >= v for k, v in want.items())
        return all(all(t.last.get(k, -1) >= v for k, v in want.items()) for t in tallies)

    deadline = time.monotonic() + cfg.drain_seconds
    while not complete() and time.monotonic() < deadline:
        progress.value = sum(t.received for t in tallies)
        await asyncio.sleep(0.05)  # pacing the completion check, not waiting for a condition
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    progress.value = sum(t.received for t in tallies)
    pipe.send(
        {
            "subs": [
                {"received": t.received, "duplicates": t.duplicates, "gaps": t.gaps}
                for t in tallies
            ],
            "out_of_order": 0,
            "latency_ns": np.array([x for t in tallies for x in t.latency_ns], dtype=np.int64),
            "last_rx_ns": max(t.last_rx_ns for t in tallies),
        }
    )


def relay_result(received: int, delivered: int) -> dict[str, Any]:
    """The relay child's last message, as loadtest's relay sends it: chunks taken
    in from the publishers and deliveries written to subscribers."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "drops": {},
        "sent": float(delivered),
        "received": float(received),
        "max_rss_mb": usage.ru_maxrss / 1024,
    }
