"""Signals, chunking and a direct handler harness for the processor tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from audiosockets.audio import AudioFormat, Chunk, SampleType
from audiosockets.handlers import HandlerOptions
from audiosockets.metrics import Metrics
from audiosockets.processor import HandlerRunner, ProcessorMetrics, parse_spec

T0_NS = 1_700_000_000_000_000_000  # a fixed capture epoch: results do not depend on "now"


def sine(
    freq: float, seconds: float, rate: int, amplitude: float, phase: float = 0.0
) -> npt.NDArray[np.float64]:
    t = np.arange(round(seconds * rate)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t + phase)


def quantize(x: npt.NDArray[np.float64], sample_type: SampleType) -> npt.NDArray[Any]:
    if sample_type is SampleType.FLOAT32:
        return x.astype("<f4")
    info = np.iinfo(np.int16 if sample_type is SampleType.INT16 else np.int32)
    return np.clip(np.round(x * (info.max + 1)), info.min, info.max).astype(sample_type.dtype)


def to_chunks(
    signal: npt.NDArray[np.float64],
    rate: int,
    chunk_frames: int | Iterable[int],
    *,
    stream: str = "mic-1",
    sample_type: SampleType = SampleType.INT16,
    start_ns: int = T0_NS,
    first_seq: int = 0,
) -> list[Chunk]:
    """Cut a (frames,) or (frames, channels) float signal into chunks with exact capture times."""
    x = signal if signal.ndim == 2 else signal[:, None]
    fmt = AudioFormat(rate, x.shape[1], sample_type)
    pcm = quantize(x, sample_type)
    sizes = iter([chunk_frames]) if isinstance(chunk_frames, int) else iter(chunk_frames)
    size = chunk_frames if isinstance(chunk_frames, int) else 0
    chunks, offset, seq = [], 0, first_seq
    while offset < len(pcm):
        if not isinstance(chunk_frames, int):
            size = next(sizes)
        block = pcm[offset : offset + size]
        captured = start_ns + round(offset * 1e9 / rate)
        chunks.append(Chunk(stream, seq, captured, fmt, block.tobytes(), captured))
        offset += len(block)
        seq += 1
    return chunks


class Harness:
    """Runs a handler spec in this thread and applies its metric updates to a fresh registry."""

    def __init__(self, spec: str, options: HandlerOptions | None = None) -> None:
        self.metrics = Metrics()
        self.pm = ProcessorMetrics.of(self.metrics)
        self.runner = HandlerRunner(parse_spec(spec), options or HandlerOptions())
        self.events: list[dict[str, Any]] = []
        self.errors: list[str] = []

    def feed(self, chunks: Iterable[Chunk]) -> None:
        for chunk in chunks:
            out = self.runner.process(chunk)
            self.pm.apply(out.ops)
            self.events += [json.loads(line) for line in out.events]
            if out.error:
                self.errors.append(out.error)

    def close(self) -> None:
        out = self.runner.close()
        self.pm.apply(out.ops)
        self.events += [json.loads(line) for line in out.events]
        if out.error:
            self.errors.append(out.error)

    def value(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


async def paced(chunks: Iterable[Chunk]) -> AsyncIterator[Chunk]:
    """Yield chunks, letting the event loop run between them (like a socket would)."""
    for chunk in chunks:
        yield chunk
        await asyncio.sleep(0)
