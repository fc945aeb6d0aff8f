"""``synth:`` sources: sine, noise, silence and speech-like test signals, paced."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from ..audio import AudioFormat
from ..convert import to_sample_type
from ..errors import ConfigError
from .base import SYNTH_KINDS, Clock, PacedSource, Samples


class SynthSource(PacedSource):
    """Generated audio for demos and machines without a microphone."""

    def __init__(
        self,
        fmt: AudioFormat,
        block_frames: int,
        kind: str,
        *,
        hz: float = 440.0,
        amplitude: float = 0.5,
        seed: int = 0,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(fmt, block_frames, clock)
        if kind not in SYNTH_KINDS:
            raise ConfigError(f"unknown synth {kind!r}")
        self.kind = kind
        self.hz = hz
        self.amplitude = amplitude
        self._rng = np.random.default_rng(seed)

    @property
    def description(self) -> str:
        what = f"sine {self.hz:g} Hz" if self.kind == "sine" else self.kind
        return f"synth {what} ({self.format})"

    def render(self, start_frame: int, frames: int) -> Samples:
        rate = self.format.rate
        n = np.arange(start_frame, start_frame + frames, dtype=np.float64)
        if self.kind == "sine":
            # Phase from the frame index modulo one period keeps precision on long runs.
            period = rate / self.hz
            mono = self.amplitude * np.sin(2 * math.pi * np.fmod(n, period) / period)
        elif self.kind == "noise":
            mono = self.amplitude * self._rng.uniform(-1.0, 1.0, frames)
        elif self.kind == "silence":
            mono = np.zeros(frames)
        else:
            mono = self._speechlike(n)
        signal = np.repeat(mono[:, None], self.format.channels, axis=1)
        return to_sample_type(signal, self.format.sample_type)

    def _speechlike(self, n: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        # Voiced bursts: a 150 Hz harmonic buzz under a 4 Hz syllable envelope,
        # on for 1.5 s out of every 2.5 s. Deterministic, so VAD demos repeat.
        t = n / self.format.rate
        buzz = sum(np.sin(2 * math.pi * 150.0 * k * t) / k for k in range(1, 6))
        syllables = np.sin(math.pi * np.fmod(t * 4.0, 1.0)) ** 2
        talking = np.fmod(t, 2.5) < 1.5
        return self.amplitude * 0.6 * buzz * syllables * talking
