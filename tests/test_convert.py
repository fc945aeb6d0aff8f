"""``convert``: sample types at full-scale-correct level, then channels (issue 13, item 3)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from audiosockets.audio import SampleType
from audiosockets.convert import FULL_SCALE, convert, full_scale_of, to_sample_type

I16, I32, F32 = SampleType.INT16, SampleType.INT32, SampleType.FLOAT32

#: The same level, 100/32768 of full scale, in each sample type.
LEVEL_100: dict[SampleType, Any] = {
    I16: np.int16(100),
    I32: np.int32(100 * 65536),
    F32: np.float32(100 / 32768),
}

PAIRS = [(a, b) for a in (I16, I32, F32) for b in (I16, I32, F32)]


def block(sample_type: SampleType, value: Any, frames: int = 4, channels: int = 1) -> np.ndarray:
    return np.full((frames, channels), value, dtype=sample_type.dtype)


@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=[f"{a.label}-{b.label}" for a, b in PAIRS])
def test_stereo_downmix_keeps_the_level_for_every_sample_type_pair(
    src: SampleType, dst: SampleType
) -> None:
    """The issue's file: 2 channels all at 100 (int16) read into a mono stream gave
    32767 (int16), 2147483647 (int32), 100.0 (float32)."""
    stereo = block(src, LEVEL_100[src], channels=2)
    mono = convert(stereo, dst, 1)
    assert mono.dtype == dst.dtype
    assert mono.shape == (4, 1)
    assert np.array_equal(mono, block(dst, LEVEL_100[dst]))


@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=[f"{a.label}-{b.label}" for a, b in PAIRS])
def test_same_channels_convert_the_level_for_every_sample_type_pair(
    src: SampleType, dst: SampleType
) -> None:
    x = block(src, LEVEL_100[src], channels=2)
    assert np.array_equal(convert(x, dst, 2), block(dst, LEVEL_100[dst], channels=2))


@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=[f"{a.label}-{b.label}" for a, b in PAIRS])
def test_mono_upmix_repeats_the_channel_at_the_same_level(src: SampleType, dst: SampleType) -> None:
    out = convert(block(src, LEVEL_100[src]), dst, 2)
    assert np.array_equal(out, block(dst, LEVEL_100[dst], channels=2))


def test_downmix_averages_channels_in_the_target_scale() -> None:
    x = np.array([[100, 300], [-32768, 32767], [1, 2]], dtype=np.int16)
    assert convert(x, I16, 1)[:, 0].tolist() == [200, 0, 2]  # 1.5 rounds half to even
    assert convert(x, I32, 1)[:, 0].tolist() == [200 * 65536, -32768, 98304]
    assert convert(x, F32, 1)[:, 0].tolist() == pytest.approx(
        [200 / 32768, -1 / 65536, 1.5 / 32768]
    )


def test_full_scale_ends_map_onto_each_other() -> None:
    x16 = np.array([[-32768], [32767], [0]], dtype=np.int16)
    assert to_sample_type(x16, I32)[:, 0].tolist() == [-(2**31), 32767 * 65536, 0]
    assert to_sample_type(x16, F32)[:, 0].tolist() == [-1.0, 32767 / 32768, 0.0]
    x32 = np.array([[-(2**31)], [2**31 - 1]], dtype=np.int32)
    assert to_sample_type(x32, I16)[:, 0].tolist() == [-32768, 32767]  # rounds, then clips


def test_float_beyond_full_scale_is_clipped_and_nan_is_silence() -> None:
    x = np.array([[1.0], [-1.0], [1.5], [-7.0], [np.nan], [0.5]], dtype=np.float32)
    assert to_sample_type(x, I16)[:, 0].tolist() == [32767, -32768, 32767, -32768, 0, 16384]
    assert to_sample_type(x, I32)[:, 0].tolist() == [
        2**31 - 1,
        -(2**31),
        2**31 - 1,
        -(2**31),
        0,
        2**30,
    ]
    # float32 keeps values beyond full scale: no information is thrown away.
    assert to_sample_type(x.astype(np.float64), F32)[2, 0] == np.float32(1.5)


def test_the_same_type_is_returned_without_a_copy() -> None:
    x = block(I16, 5, channels=2)
    assert to_sample_type(x, I16) is x


def test_unsupported_channel_changes_are_refused() -> None:
    with pytest.raises(ValueError, match="only to or from mono"):
        convert(block(I16, 1, channels=2), I16, 6)
    with pytest.raises(ValueError, match="frames, channels"):
        convert(np.zeros(4, dtype=np.int16), I16, 1)
    with pytest.raises(TypeError, match="signed integers or floats"):
        full_scale_of(np.uint8)


def test_full_scale_matches_the_level_meters() -> None:
    from audiosockets.handlers import FULL_SCALE as METER_FULL_SCALE

    assert dict(METER_FULL_SCALE) == FULL_SCALE


@given(hnp.arrays(np.int16, hnp.array_shapes(min_dims=2, max_dims=2, max_side=16)))
def test_int16_survives_a_round_trip_through_int32_and_float32(x: np.ndarray) -> None:
    assert np.array_equal(to_sample_type(to_sample_type(x, I32), I16), x)
    assert np.array_equal(to_sample_type(to_sample_type(x, F32), I16), x)


@given(
    hnp.arrays(np.int16, st.tuples(st.integers(1, 16), st.just(2))),
    st.sampled_from([I16, I32, F32]),
)
def test_downmix_of_identical_channels_equals_converting_one(
    x: np.ndarray, dst: SampleType
) -> None:
    twin = np.repeat(x[:, :1], 2, axis=1)
    assert np.array_equal(convert(twin, dst, 1), to_sample_type(x[:, :1], dst))
