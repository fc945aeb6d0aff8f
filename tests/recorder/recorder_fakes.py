"""Test doubles for the recorder: a clock that never really sleeps, WAV writers,
a publisher that records what it is given, and the skip-or-fail rule for tools."""

from __future__ import annotations

import struct
import subprocess
import sys
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from audiosockets.audio import AudioFormat
from audiosockets.client import SpooledChunk


class FakeClock:
    """Monotonic time starts at 0; ``sleep_until`` jumps to the deadline."""

    def __init__(self, wall_start_ns: int = 1_700_000_000_000_000_000) -> None:
        self.now = 0
        self.wall_start = wall_start_ns
        self.deadlines: list[int] = []

    def monotonic_ns(self) -> int:
        return self.now

    def time_ns(self) -> int:
        return self.wall_start + self.now

    async def sleep_until(self, monotonic_ns: int) -> None:
        self.deadlines.append(monotonic_ns)
        self.now = max(self.now, monotonic_ns)


def noise_wav(path: Path, frames: int, seed: int = 7, rate: int = 16000) -> np.ndarray:
    """``frames`` of mono int16 noise (seeded: the same data every run) written to
    ``path`` as a WAV file at ``rate``; returns the samples, shaped (frames, 1)."""
    data = np.random.default_rng(seed).integers(-20000, 20000, (frames, 1), dtype=np.int16)
    write_pcm_wav(path, data, rate)
    return data


def write_pcm_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """int16 PCM through the stdlib writer; ``samples`` shaped (frames, channels)."""
    assert samples.dtype == np.int16
    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return path


def write_raw_wav(
    path: Path,
    samples: np.ndarray,
    rate: int,
    *,
    tag: int,
    bits: int,
    extensible: bool = False,
    extra_chunk: bool = True,
) -> Path:
    """Hand-built RIFF: any tag/bit depth, optional WAVE_FORMAT_EXTENSIBLE and a LIST chunk."""
    channels = samples.shape[1]
    data = samples.tobytes()
    align = channels * bits // 8
    if extensible:
        guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt = struct.pack("<HHIIHH", 0xFFFE, channels, rate, rate * align, align, bits)
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", tag) + guid_tail
    else:
        fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    if extra_chunk:
        body += b"LIST" + struct.pack("<I", 5) + b"INFO\x00\x00"  # odd size + pad byte
    body += b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


@dataclass
class SentBlock:
    samples: np.ndarray
    captured_ns: int
    seq: int


@dataclass
class FakeStream:
    name: str
    format: AudioFormat
    sent: list[SentBlock] = field(default_factory=list)
    unsent: int = 0

    #: Duration of one unsent chunk (the recorder's default 20 ms block).
    block_seconds: float = 0.02

    @property
    def spooled_seconds(self) -> float:
        return self.unsent * self.block_seconds

    def unsent_chunks(self) -> list[SpooledChunk]:
        return [
            SpooledChunk(b.seq, b.captured_ns, b.samples.tobytes(), 0.0)
            for b in self.sent[len(self.sent) - self.unsent :]
        ]

    def send(self, samples: Any, captured_ns: int | None = None) -> int:
        seq = len(self.sent)
        assert captured_ns is not None
        self.sent.append(SentBlock(np.array(samples, copy=True), captured_ns, seq))
        return seq


class FakePublisher:
    """Takes everything at once; remembers the calls the recorder made."""

    def __init__(self, flush_result: bool = True) -> None:
        self.streams: dict[str, FakeStream] = {}
        self.started = False
        self.closed = False
        self.flush_timeouts: list[float | None] = []
        self.flush_result = flush_result

    async def start(self) -> None:
        self.started = True

    def stream(self, name: str, fmt: AudioFormat) -> FakeStream:
        self.streams[name] = FakeStream(name, fmt)
        return self.streams[name]

    async def flush(self, timeout: float | None = 2.0) -> bool:
        self.flush_timeouts.append(timeout)
        return self.flush_result

    async def close(self, timeout: float = 2.0, *, drop_unsent: bool = True) -> None:
        self.closed = True


def spawn_record(*args: str, stdout: int = subprocess.PIPE) -> subprocess.Popen[bytes]:
    """``audiosockets record --metrics-port 0 --loop asyncio ARGS`` as a child
    process (stdin closed, stderr piped)."""
    return subprocess.Popen(
        [sys.executable, "-m", "audiosockets", "record", "--metrics-port", "0",
         "--loop", "asyncio", *args],
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.PIPE,
    )  # fmt: skip
