"""Where the recorder's audio comes from: a PortAudio device, a WAV file, a synthesiser.

Every source yields ``CapturedBlock``s: samples shaped ``(frames, channels)`` in the
stream's format and ``captured_ns``, the wall-clock time of the block's first frame.

Invariants:
- Paced sources (``file:``, ``synth:``) schedule block *n* against an absolute start
  time (``start + n * block``), never ``sleep(block)``, so pacing does not drift; a
  late event loop catches up instead of slowing the stream down. Their timestamps are
  ``wall_start + frames_emitted / rate``: exact, monotonic, gap-free.
- The device source's PortAudio callback runs on PortAudio's thread and only copies
  ``indata`` into a preallocated ring of blocks, stores two floats and bumps counters;
  it never blocks, logs or allocates beyond that copy. It wakes the event loop only
  when the reader is actually waiting. A full ring drops the new block and counts it
  (``dropped``); PortAudio's overflow flag is counted (``overflows``), not logged.
- State lives in the source object; the ring indices are only written by one thread
  each (``_written`` by the callback, ``_read`` by the event loop).

``sounddevice`` is imported lazily so ``file:``/``synth:`` work without PortAudio.

Modules: ``base`` (the ``Source`` API, pacing, conversions), ``synth``, ``file``,
``device``; ``parse_source`` here picks one from a ``--source`` value.
"""

from __future__ import annotations

from pathlib import Path

from ..audio import AudioFormat
from ..convert import to_sample_type
from ..errors import ConfigError
from .base import (
    SYNTH_KINDS,
    CapturedBlock,
    Clock,
    DeviceLost,
    PacedSource,
    Samples,
    Source,
    SystemClock,
    _flag,
    _split_options,
    block_frames_for,
)
from .device import DeviceSource, list_input_devices
from .file import FileSource, WavInfo, read_wav_info
from .synth import SynthSource


def parse_source(
    spec: str,
    fmt: AudioFormat,
    block_frames: int,
    *,
    clock: Clock | None = None,
) -> Source:
    """Build the source named by ``spec`` (``device[:X]``, ``file:PATH[?opts]``, ``synth:KIND``)."""
    kind, _, rest = spec.partition(":")
    if kind == "device":
        return DeviceSource(fmt, block_frames, device=rest or None)
    if kind == "file":
        if not rest:
            raise ConfigError("file source needs a path: file:PATH.wav")
        path, options = _split_options(rest, allowed=("loop", "convert"))
        return FileSource(
            fmt,
            block_frames,
            Path(path),
            loop=_flag(options, "loop"),
            convert=_flag(options, "convert"),
            clock=clock,
        )
    if kind == "synth":
        name, _, arg = rest.partition(":")
        if name not in SYNTH_KINDS:
            raise ConfigError(
                f"unknown synth {name!r} in source {spec!r} "
                f"(expected one of: {', '.join(SYNTH_KINDS)})"
            )
        hz = 440.0
        if arg:
            if name != "sine":
                raise ConfigError(f"synth:{name} takes no argument (got {arg!r})")
            try:
                hz = float(arg)
            except ValueError:
                raise ConfigError(f"synth:sine frequency must be a number, got {arg!r}") from None
            if not 0 < hz < fmt.rate / 2:
                raise ConfigError(
                    f"synth:sine frequency {hz:g} Hz must be between 0 and the Nyquist "
                    f"frequency ({fmt.rate / 2:g} Hz)"
                )
        return SynthSource(fmt, block_frames, name, hz=hz, clock=clock)
    raise ConfigError(
        f"unknown source {spec!r} (expected device, device:NAME_OR_INDEX, file:PATH or "
        f"synth:{'|'.join(SYNTH_KINDS)})"
    )


__all__ = [
    "SYNTH_KINDS",
    "CapturedBlock",
    "Clock",
    "DeviceLost",
    "DeviceSource",
    "FileSource",
    "PacedSource",
    "Samples",
    "Source",
    "SynthSource",
    "SystemClock",
    "WavInfo",
    "block_frames_for",
    "list_input_devices",
    "parse_source",
    "read_wav_info",
    "to_sample_type",
]
