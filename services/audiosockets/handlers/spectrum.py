"""``spectrum``: octave-band energies per stream as gauges.

Each chunk (mixed to mono, Hann-windowed) is transformed with a real FFT and
its power summed into the ISO octave bands 31.5 Hz .. 16 kHz (edges at
``fc / sqrt(2)`` and ``fc * sqrt(2)``, bands above Nyquist left out). Powers are
scaled by Parseval with the window's energy corrected, so a band holding a
full-scale sine reads -3.01 dBFS, the same convention as ``level``'s RMS.
Resolution is ``rate / frames`` Hz: with short chunks the lowest bands hold one
or two bins (their values are then coarse, not wrong).

Stateless apart from the cached window, so it may run on many workers.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..audio import AudioFormat, Chunk
from . import HandlerContext, dbfs, normalized

#: Nominal centre labels and exact base-2 centres (1 kHz * 2**k).
BANDS: tuple[tuple[str, float], ...] = tuple(
    (label, 1000.0 * 2.0**k)
    for label, k in zip(
        ("31.5", "63", "125", "250", "500", "1000", "2000", "4000", "8000", "16000"),
        range(-5, 5),
        strict=True,
    )
)


class Spectrum:
    """Sets ``audiosockets_band_energy_dbfs{stream,band}`` for every chunk."""

    def __init__(self, ctx: HandlerContext) -> None:
        self.ctx = ctx
        self._window: npt.NDArray[np.float64] = np.zeros(0)

    def setup(self, fmt: AudioFormat) -> None:
        """Keep the octave bands whose lower edge lies below the stream's Nyquist frequency."""
        nyquist = fmt.rate / 2
        self.bands = [(label, fc) for label, fc in BANDS if fc / np.sqrt(2) < nyquist]
        self.rate = fmt.rate

    def band_powers(self, mono: npt.NDArray[np.float64]) -> dict[str, float]:
        """Power per octave band of ``mono`` (samples in [-1, 1), shape ``(frames,)``).

        Hann-windowed, one-sided periodogram, normalised by the window's energy;
        returns band label -> mean-square power (full scale = 1, no unit)."""
        n = len(mono)
        if len(self._window) != n:
            self._window = np.hanning(n) if n > 1 else np.ones(n)
        w = self._window
        spec = np.fft.rfft(mono * w)
        power = (spec.real**2 + spec.imag**2) / (n * float(np.sum(w * w)))
        power[1 : (n + 1) // 2] *= 2.0  # one-sided: fold the negative frequencies in
        freqs = np.fft.rfftfreq(n, 1.0 / self.rate)
        out: dict[str, float] = {}
        for label, fc in self.bands:
            mask = (freqs >= fc / np.sqrt(2)) & (freqs < fc * np.sqrt(2))
            out[label] = float(np.sum(power[mask]))
        return out

    def handle(self, chunk: Chunk) -> None:
        """Set ``band_energy_dbfs`` per band for the chunk (channels averaged). No events."""
        mono = normalized(chunk).mean(axis=1)
        if len(mono) == 0:
            return
        for label, p in self.band_powers(mono).items():
            value = float(dbfs(np.sqrt(np.array([p])))[0])
            self.ctx.sink.set("band_energy_dbfs", (chunk.stream, label), value)

    def teardown(self) -> None:
        """Nothing to release; no events."""
        pass
