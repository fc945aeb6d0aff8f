"""Where the recorder's audio comes from: a PortAudio device, a WAV file, a synthesiser.

Every source yields ``CapturedBlock``s: samples shaped ``(frames, channels)`` in the
stream's format and ``captured_ns``, the wall-clock time of the block's first frame.

Invariants:
- Paced sources (``file:``, ``synth:``) schedule block *n* against an absolute start
  time (``start + n * block``), never ``sleep(block)``, so pacing does not drift; a
  late event loop catches up instead of slowing the stream down. Their timestamps are
  ``wall_start + frames_emitted / rate``: exact, monotonic, gap-free.
- The device source's capture times come from ``capture_clock.CaptureClock``: a
  frame counter anchored at the first block after each open, steered toward
  PortAudio's ADC times with a bounded slew (the ADC times right after an open can be
  half a second off), so consecutive blocks are one block apart unless frames were
  really lost (an overflow, a full ring) or the device was reopened.
- The device source's PortAudio callback runs on PortAudio's thread and only copies
  ``indata`` into a preallocated ring of blocks, stores its times and flags, bumps counters;
  it never blocks, logs or allocates beyond that copy. It wakes the event loop only
  when the reader is actually waiting. A full ring drops the new block and counts it
  (``dropped``); PortAudio's overflow flag is counted (``overflows``), not logged.
- State lives in the source object; the ring indices are only written by one thread
  each (``_written`` by the callback, ``_read`` by the event loop).

``sounddevice`` is imported lazily so ``file:``/``synth:`` work without PortAudio.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs

import numpy as np
import numpy.typing as npt

from .audio import AudioFormat, SampleType
from .capture_clock import CaptureClock
from .convert import convert, full_scale_of, to_sample_type
from .errors import ConfigError, DeviceError

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
    set (then: the rate is linearly interpolated, and channels are averaged to mono
    or mono duplicated). Sample types are always converted at full-scale-correct
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
        return convert(block, dst.sample_type, dst.channels)


# --- PortAudio device ---------------------------------------------------------


def _import_sounddevice() -> Any:
    try:
        import sounddevice
    except OSError as err:  # the PortAudio shared library is missing
        raise DeviceError(
            f"PortAudio is not available ({err}); install libportaudio2 to capture audio"
        ) from err
    return sounddevice


def list_input_devices() -> tuple[list[dict[str, Any]], int | None]:
    """Input devices PortAudio sees (dicts from ``query_devices``) and the default's index."""
    sd = _import_sounddevice()
    try:
        devices = [dict(d) for d in sd.query_devices() if d["max_input_channels"] > 0]
    except sd.PortAudioError as err:
        raise DeviceError(f"PortAudio cannot list devices: {err}") from err
    return devices, _default_input(sd)


def _default_input(sd: Any) -> int | None:
    default = sd.default.device[0]
    if default is None or default < 0:
        try:
            default = int(sd.query_hostapis(0)["default_input_device"])
        except (sd.PortAudioError, IndexError, KeyError):
            return None
    return int(default) if default >= 0 else None


class DeviceSource(Source):
    """Capture from a PortAudio input device through ``sounddevice.InputStream``."""

    retryable = True

    def __init__(
        self,
        fmt: AudioFormat,
        block_frames: int,
        device: str | None = None,
        *,
        ring_seconds: float = 2.0,
        stall_timeout: float = 2.0,
    ) -> None:
        super().__init__(fmt, block_frames)
        self.device: int | str | None = int(device) if device and device.isdigit() else device
        slots = max(16, math.ceil(ring_seconds * fmt.rate / block_frames))
        # Preallocated so the callback never allocates: block slots, and per slot the
        # ADC time and callback time PortAudio reported (stream clock, s), whether an
        # input overflow came before it, and frames lost in the hand-off before it.
        self._ring = np.zeros((slots, block_frames, fmt.channels), dtype=fmt.dtype)
        self._adc = np.zeros(slots, dtype=np.float64)
        self._current = np.zeros(slots, dtype=np.float64)
        self._overflowed = np.zeros(slots, dtype=np.bool_)
        self._lost = np.zeros(slots, dtype=np.int64)
        self._slots = slots
        self._written = 0  # only the callback writes this
        self._read = 0  # only the event loop writes this
        self._overflow_pending = False  # only the callback touches these two
        self._lost_pending = 0
        #: Capture times: a frame counter disciplined toward the ADC times (see
        #: ``capture_clock``); anchored again at the first block after each open.
        self.capture_clock = CaptureClock(fmt.rate)
        self._anchor_pending = True
        self._waiting = False
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stream: Any = None
        self._finished = False
        self._offset_ns = 0
        self._offset_refreshed = 0.0
        self._stall_timeout = max(stall_timeout, 10 * block_frames / fmt.rate)
        self.name = "default input" if self.device is None else str(self.device)

    @property
    def description(self) -> str:
        return f"device {self.name} ({self.format})"

    async def open(self) -> None:
        sd = _import_sounddevice()
        fmt = self.format
        self._loop = asyncio.get_running_loop()
        self._written = self._read = 0
        self._overflow_pending = False
        self._lost_pending = 0
        self._anchor_pending = True
        self._finished = False
        self._wake = asyncio.Event()
        try:
            if self.device is None and _default_input(sd) is None:
                raise DeviceError(
                    "no audio input device: PortAudio sees no sound card or sound server "
                    "(use --source synth:sine or file:PATH to record without one)"
                )
            info = sd.query_devices(self.device, kind="input")
            self.name = str(info["name"])
            sd.check_input_settings(
                device=self.device,
                channels=fmt.channels,
                dtype=fmt.sample_type.label,
                samplerate=fmt.rate,
            )
        except ValueError as err:  # sounddevice: no such device / ambiguous name
            raise DeviceError(f"no usable input device {self._what()}: {err}") from err
        except sd.PortAudioError as err:
            raise DeviceError(
                f"input device {self._what()} cannot capture {fmt}: {_pa_reason(err)}"
            ) from err
        try:
            stream = sd.InputStream(
                device=self.device,
                samplerate=fmt.rate,
                channels=fmt.channels,
                dtype=fmt.sample_type.label,
                blocksize=self.block_frames,
                callback=self._callback,
                finished_callback=self._on_finished,
            )
            stream.start()
        except sd.PortAudioError as err:
            raise DeviceError(
                f"cannot open input device {self._what()} (busy or gone?): {_pa_reason(err)}"
            ) from err
        self._stream = stream
        self._offset_ns = self._measure_offset()
        self._offset_refreshed = time.monotonic()

    def _what(self) -> str:
        return "(the default)" if self.device is None else repr(self.device)

    def _measure_offset(self) -> int:
        """Wall clock minus the stream clock, read between two wall-clock readings."""
        before = time.time_ns()
        stream_time = float(self._stream.time)
        after = time.time_ns()
        return (before + after) // 2 - round(stream_time * 1e9)

    def _refresh_offset(self) -> None:
        # The stream clock and the wall clock drift apart slowly (and NTP slews the
        # latter): measure again once a second. The capture clock turns the reports
        # into stamps with a bounded slew, so a fresh offset never makes them jump.
        now = time.monotonic()
        if now - self._offset_refreshed < 1.0:
            return
        self._offset_refreshed = now
        try:
            self._offset_ns = self._measure_offset()
        except Exception:  # the stream is closing (or a stand-in without a clock)
            return

    # Runs on PortAudio's thread: copy, hand off, return. Nothing else.
    def _callback(self, indata: Samples, frames: int, time_info: Any, status: Any) -> None:
        if status.input_overflow:
            self.overflows += 1
            self._overflow_pending = True
        written = self._written
        if written - self._read >= self._slots or frames != self.block_frames:
            self.dropped += 1
            self._lost_pending += frames
        else:
            slot = written % self._slots
            self._ring[slot] = indata
            self._adc[slot] = time_info.inputBufferAdcTime
            self._current[slot] = time_info.currentTime
            self._overflowed[slot] = self._overflow_pending
            self._lost[slot] = self._lost_pending
            self._overflow_pending = False
            self._lost_pending = 0
            self._written = written + 1
        if self._waiting:
            self._waiting = False
            loop = self._loop
            if loop is not None:
                loop.call_soon_threadsafe(self._wake.set)

    def _on_finished(self) -> None:
        self._finished = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    async def read(self) -> CapturedBlock | None:
        while self._written == self._read:
            if self._finished or self._stream is None:
                raise DeviceLost(f"input device {self.name} stopped delivering audio")
            self._wake.clear()
            self._waiting = True
            if self._written != self._read:  # the callback ran between check and flag
                self._waiting = False
                break
            try:
                await asyncio.wait_for(self._wake.wait(), self._stall_timeout)
            except TimeoutError:
                raise DeviceLost(
                    f"input device {self.name} delivered no audio for {self._stall_timeout:g} s"
                ) from None
            finally:
                self._waiting = False
        slot = self._read % self._slots
        samples = self._ring[slot].copy()
        captured_ns = self._stamp(slot)
        self._read += 1
        self._refresh_offset()
        return CapturedBlock(samples, captured_ns)

    def _stamp(self, slot: int) -> int:
        """The block's capture time from the capture clock, fed the device's report."""
        block_ns = self.block_frames * 1_000_000_000 // self.format.rate
        # The callback runs once the block's last frame is in: its first frame was
        # captured one block earlier (PortAudio's input latency comes on top, and is
        # what the ADC reports then steer in slowly).
        called_ns = round(float(self._current[slot]) * 1e9) + self._offset_ns - block_ns
        clock = self.capture_clock
        if self._anchor_pending:
            self._anchor_pending = False
            clock.anchor(called_ns)
        adc = float(self._adc[slot])
        report = round(adc * 1e9) + self._offset_ns if adc > 0 else called_ns
        return clock.stamp(
            self.block_frames,
            report,
            lost_frames=int(self._lost[slot]),
            overflow=bool(self._overflowed[slot]),
        )

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        try:
            stream.abort()
            stream.close()
        except Exception:  # closing a device that vanished may fail; it is gone anyway
            pass


def _pa_reason(err: BaseException) -> str:
    # PortAudioError args are (message, code[, host error]); the message is enough.
    args = getattr(err, "args", ())
    return str(args[0]) if args else str(err)
