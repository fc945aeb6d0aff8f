"""Sample-type and channel conversion at full-scale-correct level.

Full scale is the magnitude that maps to 1.0: 32768 for int16, 2**31 for int32, 1.0
for float32 (``FULL_SCALE``; the level meters use the same numbers). A sample keeps
its level through any conversion: int16 ``100`` is int32 ``100 * 65536`` and float32
``100 / 32768``, and back. Integer to integer is exact where the target is wider;
narrower integers round to nearest. Float to integer scales by full scale, rounds to
nearest and clips to the integer's range (``+1.0`` becomes ``32767``); NaN becomes 0.
Float to float keeps the value (float32 may carry more than full scale).

Channels are changed *after* the conversion, in the target type's scale, so averaging
never mixes levels: two int16 channels of 100 downmix to int16 ``100``, int32
``6553600``, float32 ``0.0030517578125``. Downmix to mono is the mean of the channels;
upmix from mono repeats the channel; other channel counts are refused.

Everything here is a pure function of NumPy arrays shaped ``(frames, channels)``.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import numpy.typing as npt

from .audio import SampleType

Samples = npt.NDArray[Any]

#: The magnitude that is 1.0 (0 dBFS) in each sample type.
FULL_SCALE: dict[SampleType, float] = {
    SampleType.INT16: 32768.0,
    SampleType.INT32: 2147483648.0,
    SampleType.FLOAT32: 1.0,
}


def full_scale_of(dtype: npt.DTypeLike) -> float:
    """Full scale of a NumPy dtype: ``2**(bits-1)`` for signed integers, 1.0 for floats."""
    dt = np.dtype(dtype)
    if np.issubdtype(dt, np.signedinteger):
        return float(-np.iinfo(cast(Any, dt)).min)
    if np.issubdtype(dt, np.floating):
        return 1.0
    raise TypeError(f"samples must be signed integers or floats, got {dt}")


def scaled(x: Samples, sample_type: SampleType) -> npt.NDArray[np.float64]:
    """``x`` as float64 in ``sample_type``'s scale (not rounded, not clipped).

    int16 ``100`` -> ``6553600.0`` for int32; float ``0.5`` -> ``16384.0`` for int16.
    """
    factor = FULL_SCALE[sample_type] / full_scale_of(x.dtype)
    out = np.asarray(x, dtype=np.float64)
    if factor != 1.0:
        out = out * factor
    return out


def quantized(x: npt.NDArray[np.float64], sample_type: SampleType) -> Samples:
    """Float64 values already in ``sample_type``'s scale, stored as ``sample_type``.

    Integers: rounded to nearest (half to even), clipped to the type's range, NaN -> 0.
    """
    target = sample_type.dtype
    if sample_type is SampleType.FLOAT32:
        return x.astype(target)
    info = np.iinfo(cast(Any, target))
    clean = np.nan_to_num(x, nan=0.0, posinf=info.max, neginf=info.min)
    out: Samples = np.clip(np.rint(clean), info.min, info.max).astype(target)
    return out


def to_sample_type(x: Samples, sample_type: SampleType) -> Samples:
    """``x`` (any signed integer or float samples) in ``sample_type`` at the same level.

    Floats are read as full scale 1.0. Same dtype in, the same array out (no copy).
    Wider integers are exact (int16 -> int32 is ``<< 16``).
    """
    if x.dtype == sample_type.dtype:
        return x
    return quantized(scaled(x, sample_type), sample_type)


def to_channels(x: npt.NDArray[np.float64], channels: int) -> npt.NDArray[np.float64]:
    """``(frames, c)`` -> ``(frames, channels)``: mean to mono, or repeat mono.

    ``ValueError`` for any other change (e.g. 2 -> 6).
    """
    have = x.shape[1]
    if have == channels:
        return x
    if channels == 1:
        mixed: npt.NDArray[np.float64] = x.mean(axis=1, keepdims=True)
        return mixed
    if have == 1:
        return np.repeat(x, channels, axis=1)
    raise ValueError(f"cannot convert {have} channels to {channels}: only to or from mono")


def convert(x: Samples, sample_type: SampleType, channels: int) -> Samples:
    """``(frames, c)`` samples of any type -> ``(frames, channels)`` in ``sample_type``.

    First the level (``scaled``), then the channels (``to_channels``), then one
    rounding (``quantized``). ``ValueError`` for an unsupported channel change.
    """
    if x.ndim != 2:
        raise ValueError(f"samples must be shaped (frames, channels), got {x.shape}")
    if x.shape[1] == channels:
        return to_sample_type(x, sample_type)
    return quantized(to_channels(scaled(x, sample_type), channels), sample_type)


__all__ = [
    "FULL_SCALE",
    "convert",
    "full_scale_of",
    "quantized",
    "scaled",
    "to_channels",
    "to_sample_type",
]
