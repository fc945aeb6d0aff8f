"""User-style handlers the processor tests load by ``module:callable`` spec."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np

from audiosockets.audio import AudioFormat, Chunk

GATE = threading.Event()
STARTED = threading.Event()
SEEN: list[int] = []


def reset() -> None:
    GATE.clear()
    STARTED.clear()
    SEEN.clear()
    PerStream.instances.clear()


def record(chunk: Chunk) -> dict[str, Any]:
    SEEN.append(chunk.seq)
    return {"frames": chunk.frames}


def sleepy(chunk: Chunk) -> None:
    """Ten times slower than real time."""
    time.sleep(10 * chunk.seconds)


def blocking(chunk: Chunk) -> None:
    """Blocks on the first chunk until the test opens GATE (a handler far slower than real time)."""
    SEEN.append(chunk.seq)
    STARTED.set()
    if not GATE.wait(20):
        raise TimeoutError("test never opened the gate")


def every_third(chunk: Chunk) -> dict[str, Any]:
    if chunk.seq % 3 == 2:
        raise ValueError(f"cannot handle seq {chunk.seq}")
    return {"ok": chunk.seq}


def always_fails(chunk: Chunk) -> None:
    raise RuntimeError("model file missing")


def bad_return(chunk: Chunk) -> int:
    return 42


async def async_peak(chunk: Chunk) -> dict[str, Any]:
    await asyncio.sleep(0)
    return {"peak": np.abs(chunk.samples).max()}  # a numpy scalar: serialised as a number


class PerStream:
    """A class handler: one instance per stream, setup/teardown around it."""

    instances: list[PerStream] = []  # noqa: RUF012

    def setup(self, fmt: AudioFormat) -> None:
        self.fmt = fmt
        self.count = 0
        PerStream.instances.append(self)

    async def handle(self, chunk: Chunk) -> None:
        self.count += 1

    def teardown(self) -> dict[str, Any]:
        return {"event": "summary", "chunks": self.count, "rate": self.fmt.rate}


def fails_on_bad_streams(chunk: Chunk) -> dict[str, Any]:
    """Fails every chunk of a stream whose name starts with ``bad`` (as an archive whose
    file names the file system refuses did)."""
    if chunk.stream.startswith("bad"):
        raise OSError(36, "File name too long")
    SEEN.append(chunk.seq)
    return {"stream": chunk.stream, "seq": chunk.seq}
