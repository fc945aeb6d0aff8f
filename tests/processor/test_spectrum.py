"""``spectrum``: a sine's energy lands in its octave band at its RMS level."""

from __future__ import annotations

import math

import pytest
from processor_support import Harness, sine, to_chunks

from audiosockets.audio import SampleType


def test_sine_energy_is_in_its_band_at_its_rms() -> None:
    rate = 16000
    h = Harness("spectrum")
    h.feed(to_chunks(sine(1000, 0.5, rate, 0.5), rate, 1024, sample_type=SampleType.FLOAT32))
    band = lambda b: h.value("audiosockets_band_energy_dbfs", stream="mic-1", band=b)  # noqa: E731
    assert band("1000") == pytest.approx(20 * math.log10(0.5 / math.sqrt(2)), abs=0.2)
    assert band("250") < band("1000") - 60
    assert band("4000") < band("1000") - 60
    assert band("16000") is None  # above Nyquist at 16 kHz: not reported


def test_spectrum_takes_no_argument() -> None:
    from audiosockets.errors import HandlerError

    with pytest.raises(HandlerError, match="takes no argument"):
        Harness("spectrum:x")
