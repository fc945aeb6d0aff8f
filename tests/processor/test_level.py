"""``level``: dBFS of known signals, clipping, seconds since sound."""

from __future__ import annotations

import math

import numpy as np
import pytest
from processor_support import Harness, sine, to_chunks

from audiosockets.audio import SampleType
from audiosockets.errors import HandlerError


@pytest.mark.parametrize("sample_type", [SampleType.INT16, SampleType.INT32, SampleType.FLOAT32])
@pytest.mark.parametrize("amplitude", [1.0, 0.5, 0.01])
def test_sine_rms_and_peak_within_0_1_db(sample_type: SampleType, amplitude: float) -> None:
    rate = 16000
    # 1 kHz over 1024-frame chunks: whole periods are not required for 0.1 dB.
    h = Harness("level")
    a = min(amplitude, 32767 / 32768)  # a full-scale int sine cannot reach +1.0
    h.feed(to_chunks(sine(1000, 1.0, rate, a, phase=0.3), rate, 1024, sample_type=sample_type))
    expected_rms = 20 * math.log10(a / math.sqrt(2))
    rms = h.value("audiosockets_level_dbfs", stream="mic-1", channel="0", measure="rms")
    peak = h.value("audiosockets_level_dbfs", stream="mic-1", channel="0", measure="peak")
    assert rms == pytest.approx(expected_rms, abs=0.1)
    assert peak == pytest.approx(20 * math.log10(a), abs=0.1)
    if amplitude == 1.0:
        assert rms == pytest.approx(-3.01, abs=0.1)  # the documented convention


def test_channels_are_measured_separately_and_silence_is_floored() -> None:
    rate = 8000
    left = sine(440, 0.5, rate, 0.25)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    h = Harness("level")
    h.feed(to_chunks(stereo, rate, 400))
    assert h.value(
        "audiosockets_level_dbfs", stream="mic-1", channel="0", measure="rms"
    ) == pytest.approx(20 * math.log10(0.25 / math.sqrt(2)), abs=0.1)
    assert h.value("audiosockets_level_dbfs", stream="mic-1", channel="1", measure="rms") == -120.0


def test_clipped_samples_counted_exactly() -> None:
    rate = 8000
    x = sine(100, 0.5, rate, 0.5)
    x[[10, 500, 501, 3999]] = 1.5  # beyond full scale: clipped to 32767 by quantisation
    x[1234] = -2.0
    h = Harness("level")
    h.feed(to_chunks(x, rate, 256))
    assert h.value("audiosockets_clipped_samples_total", stream="mic-1", channel="0") == 5


def test_seconds_since_sound_counts_capture_time_of_silence() -> None:
    rate = 8000
    x = np.concatenate([sine(300, 1.0, rate, 0.3), np.zeros(int(2.5 * rate))])
    h = Harness("level:silence_dbfs=-50")
    chunks = to_chunks(x, rate, 800)  # 0.1 s chunks
    h.feed(chunks[:10])
    assert h.value("audiosockets_seconds_since_sound", stream="mic-1") == 0.0
    h.feed(chunks[10:])
    assert h.value("audiosockets_seconds_since_sound", stream="mic-1") == pytest.approx(
        2.5, abs=1e-6
    )


def test_unknown_level_option_is_one_clear_error() -> None:
    with pytest.raises(HandlerError, match="unknown option 'loud=1'"):
        Harness("level:loud=1")
