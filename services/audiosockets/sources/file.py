"""``file:`` sources: a WAV file played in real time, optionally looped or converted."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ..audio import AudioFormat, SampleType
from ..convert import convert as convert_samples
from ..convert import full_scale_of
from ..errors import ConfigError
from .base import Clock, PacedSource, Samples


@dataclass(frozen=True, slots=True)
class WavInfo:
    """What a WAV file holds: its format and where its PCM data lies."""

    format: AudioFormat
    data_offset: int
    frames: int


_WAVE_PCM = 1
_WAVE_FLOAT = 3
_WAVE_EXTENSIBLE = 0xFFFE


def read_wav_info(path: Path) -> WavInfo:
    """Parse a RIFF/WAVE header: 16/32-bit PCM and 32-bit float, plain or extensible."""
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            head = f.read(12)
            if head[:4] == b"fLaC":
                raise ConfigError(
                    f"{path} is FLAC; only WAV is read (convert it: sox {path.name} out.wav)"
                )
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                raise ConfigError(f"{path} is not a WAV file (no RIFF/WAVE header)")
            fmt_fields: tuple[int, int, int, int] | None = None
            while True:
                chunk = f.read(8)
                if len(chunk) < 8:
                    raise ConfigError(f"{path} has no audio data chunk")
                chunk_id, chunk_size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if chunk_id == b"fmt ":
                    body = f.read(chunk_size)
                    if len(body) < 16:
                        raise ConfigError(f"{path} has a truncated format chunk")
                    tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
                    if tag == _WAVE_EXTENSIBLE and len(body) >= 26:
                        tag = struct.unpack("<H", body[24:26])[0]
                    fmt_fields = (tag, channels, rate, bits)
                    if chunk_size % 2:
                        f.seek(1, 1)
                elif chunk_id == b"data":
                    if fmt_fields is None:
                        raise ConfigError(f"{path} has its data before its format chunk")
                    offset = f.tell()
                    # Streaming writers leave the size at 0 or 0xFFFFFFFF: trust the file.
                    available = size - offset
                    data_bytes = chunk_size if 0 < chunk_size <= available else available
                    break
                else:
                    f.seek(chunk_size + (chunk_size % 2), 1)
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}") from err
    tag, channels, rate, bits = fmt_fields
    sample_type = {
        (_WAVE_PCM, 16): SampleType.INT16,
        (_WAVE_PCM, 32): SampleType.INT32,
        (_WAVE_FLOAT, 32): SampleType.FLOAT32,
    }.get((tag, bits))
    if sample_type is None:
        kind = {_WAVE_PCM: "PCM", _WAVE_FLOAT: "float"}.get(tag, f"format tag {tag}")
        raise ConfigError(
            f"{path} is {bits}-bit {kind}; supported WAV encodings are 16/32-bit PCM "
            "and 32-bit float"
        )
    try:
        fmt = AudioFormat(rate, channels, sample_type)
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from err
    return WavInfo(fmt, offset, data_bytes // fmt.frame_bytes)


class FileSource(PacedSource):
    """A WAV file played in real time, optionally looped.

    The file's rate and channel count must match the stream unless ``convert`` is
    set (then: channels are averaged to mono or mono duplicated, and the rate is
    linearly interpolated). Sample types are always converted at full-scale-correct
    level, before channels are mixed (``convert.convert``).
    The data is memory-mapped, so long files cost no memory up front.
    """

    def __init__(
        self,
        fmt: AudioFormat,
        block_frames: int,
        path: Path,
        *,
        loop: bool = False,
        convert: bool = False,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(fmt, block_frames, clock)
        self.path = path
        self.loop = loop
        self.convert = convert
        self.info = read_wav_info(path)
        src = self.info.format
        if not convert and (src.rate, src.channels) != (fmt.rate, fmt.channels):
            raise ConfigError(
                f"{path} is {src.rate} Hz with {src.channels} channel(s) but the stream is "
                f"{fmt.rate} Hz with {fmt.channels}; pass --rate {src.rate} --channels "
                f"{src.channels}, or add ?convert=1 to the source to convert"
            )
        if convert and src.channels != fmt.channels and 1 not in (src.channels, fmt.channels):
            raise ConfigError(
                f"cannot convert {src.channels} channels to {fmt.channels}: only to or from mono"
            )
        if self.info.frames == 0:
            raise ConfigError(f"{path} holds no audio frames")
        self._data: Samples = np.memmap(
            path,
            dtype=src.dtype,
            mode="r",
            offset=self.info.data_offset,
            shape=(self.info.frames, src.channels),
        )
        # Frames of output the whole file yields at the stream's rate.
        self.output_frames = self.info.frames * fmt.rate // src.rate
        if self.output_frames == 0:
            # Downsampled to nothing: a looped file would wrap modulo 0, a plain one
            # end before its first chunk. Neither is what anyone asked for.
            needed = -(-src.rate // fmt.rate)  # ceil: frames * fmt.rate >= src.rate
            raise ConfigError(
                f"{path} holds {self.info.frames} frame(s) at {src.rate} Hz, too few for "
                f"one frame at the stream's {fmt.rate} Hz: it needs at least {needed} frames"
            )

    @property
    def description(self) -> str:
        extra = " looped" if self.loop else ""
        return f"file {self.path} ({self.info.format}{extra})"

    def render(self, start_frame: int, frames: int) -> Samples | None:
        total = self.output_frames
        if not self.loop:
            if start_frame >= total:
                return None
            idx = np.arange(start_frame, min(start_frame + frames, total))
        else:
            idx = np.arange(start_frame, start_frame + frames) % total
        return self._frames_at(idx)

    def _frames_at(self, idx: npt.NDArray[np.int64]) -> Samples:
        src, dst = self.info.format, self.format
        if src.rate == dst.rate:
            block: Samples = np.asarray(self._data[idx])
        else:
            pos = idx.astype(np.float64) * src.rate / dst.rate
            lo = np.minimum(pos.astype(np.int64), self.info.frames - 1)
            hi = np.minimum(lo + 1, self.info.frames - 1)
            frac = (pos - lo)[:, None]
            scale = full_scale_of(src.dtype)  # interpolate at full scale 1.0
            a = self._data[lo].astype(np.float64) / scale
            b = self._data[hi].astype(np.float64) / scale
            block = a + (b - a) * frac
        # The level first (full scale to full scale), then the channels: a stereo
        # int16 file at 100 is a mono int16 stream at 100 (int32: 100 << 16).
        return convert_samples(block, dst.sample_type, dst.channels)
