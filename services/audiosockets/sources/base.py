"""The source API (``Source``, ``CapturedBlock``, ``Clock``) and what every source shares."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs

import numpy.typing as npt

from ..audio import AudioFormat
from ..errors import ConfigError, DeviceError

Samples = npt.NDArray[Any]

SYNTH_KINDS = ("sine", "noise", "silence", "speechlike")


class DeviceLost(DeviceError):
    """A capture device stopped delivering audio mid-run (unplugged, server gone)."""


@dataclass(frozen=True, slots=True)
class CapturedBlock:
    """One block of captured audio and the wall-clock time of its first frame."""

    samples: Samples
    captured_ns: int

    @property
    def frames(self) -> int:
        return int(self.samples.shape[0])


class Clock(Protocol):
    """Time as the paced sources see it; tests inject a fake one."""

    def monotonic_ns(self) -> int: ...

    def time_ns(self) -> int: ...

    async def sleep_until(self, monotonic_ns: int) -> None: ...


class SystemClock:
    """The real clocks; ``sleep_until`` sleeps on the event loop's monotonic clock."""

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    def time_ns(self) -> int:
        return time.time_ns()

    async def sleep_until(self, monotonic_ns: int) -> None:
        delay = (monotonic_ns - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)


class Source(ABC):
    """A stream of ``CapturedBlock``s in ``format``.

    ``open`` raises ``DeviceError``/``ConfigError`` with one sentence; ``read``
    returns ``None`` at the end of a finite source and raises ``DeviceLost`` when a
    device vanishes (``retryable`` sources may then be closed and opened again).
    """

    retryable = False

    def __init__(self, fmt: AudioFormat, block_frames: int) -> None:
        if block_frames < 1:
            raise ConfigError(f"block size must be at least one frame, got {block_frames}")
        self.format = fmt
        self.block_frames = block_frames
        #: PortAudio input-overflow flags seen (device only).
        self.overflows = 0
        #: Blocks lost because the hand-off ring was full (device only).
        self.dropped = 0

    @property
    @abstractmethod
    def description(self) -> str:
        """What this source is, for logs and ``--help``-like output."""

    async def open(self) -> None:
        """Acquire the source; return once the first ``read`` can succeed."""
        return None

    @abstractmethod
    async def read(self) -> CapturedBlock | None:
        """The next block, or ``None`` when a finite source has ended."""

    async def close(self) -> None:
        """Release the source; safe to call twice."""
        return None


def block_frames_for(rate: int, block_ms: float) -> int:
    """Frames in a block of ``block_ms`` milliseconds at ``rate`` (at least one)."""
    if not block_ms > 0:
        raise ConfigError(f"--block-ms must be positive, got {block_ms}")
    return max(1, round(rate * block_ms / 1000.0))


def _split_options(text: str, allowed: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    path, sep, query = text.rpartition("?")
    if not sep:
        return text, {}
    options: dict[str, str] = {}
    for key, values in parse_qs(query, keep_blank_values=True, strict_parsing=False).items():
        if key not in allowed:
            raise ConfigError(f"unknown option {key!r} in {text!r} (allowed: {', '.join(allowed)})")
        options[key] = values[-1]
    return path, options


def _flag(options: dict[str, str], key: str) -> bool:
    """``?key`` or ``?key=1`` is on; absent or ``?key=0`` is off."""
    if key not in options:
        return False
    value = options[key].lower()
    if value in ("", "1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise ConfigError(f"option {key}={value!r} must be 0 or 1")


# --- paced sources -----------------------------------------------------------


class PacedSource(Source):
    """A source that renders audio itself and releases it at the real-time rate."""

    def __init__(self, fmt: AudioFormat, block_frames: int, clock: Clock | None) -> None:
        super().__init__(fmt, block_frames)
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._frames_out = 0
        self._mono_start = 0
        self._wall_start = 0
        self._started = False

    async def open(self) -> None:
        self._mono_start = self._clock.monotonic_ns()
        self._wall_start = self._clock.time_ns()
        self._frames_out = 0
        self._started = True

    @abstractmethod
    def render(self, start_frame: int, frames: int) -> Samples | None:
        """Frames ``[start_frame, start_frame + frames)`` in the stream format, or None at end."""

    async def read(self) -> CapturedBlock | None:
        if not self._started:
            await self.open()
        block = self.render(self._frames_out, self.block_frames)
        if block is None or len(block) == 0:
            return None
        first = self._frames_out
        self._frames_out += len(block)
        rate = self.format.rate
        # A block is available once its last frame has been "captured".
        await self._clock.sleep_until(self._mono_start + self._frames_out * 1_000_000_000 // rate)
        return CapturedBlock(block, self._wall_start + first * 1_000_000_000 // rate)
