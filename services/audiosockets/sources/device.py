"""``device:`` sources: a PortAudio input device through ``sounddevice`` (lazy import)."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import numpy as np

from ..audio import AudioFormat
from ..errors import DeviceError
from .base import CapturedBlock, DeviceLost, Samples, Source

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
        # Preallocated so the callback never allocates: block slots, capture times.
        self._ring = np.zeros((slots, block_frames, fmt.channels), dtype=fmt.dtype)
        self._adc = np.zeros(slots, dtype=np.float64)
        self._slots = slots
        self._written = 0  # only the callback writes this
        self._read = 0  # only the event loop writes this
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
        # latter). Slew towards a fresh measurement by at most 1 ms per refresh so
        # timestamps never jump backwards.
        now = time.monotonic()
        if now - self._offset_refreshed < 10.0:
            return
        self._offset_refreshed = now
        try:
            fresh = self._measure_offset()
        except Exception:  # the stream is closing; keep the old offset
            return
        step = max(-1_000_000, min(1_000_000, fresh - self._offset_ns))
        self._offset_ns += step

    # Runs on PortAudio's thread: copy, hand off, return. Nothing else.
    def _callback(self, indata: Samples, frames: int, time_info: Any, status: Any) -> None:
        if status.input_overflow:
            self.overflows += 1
        written = self._written
        if written - self._read >= self._slots or frames != self.block_frames:
            self.dropped += 1
        else:
            slot = written % self._slots
            self._ring[slot] = indata
            adc = time_info.inputBufferAdcTime
            self._adc[slot] = adc if adc > 0 else time_info.currentTime
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
        captured_ns = round(float(self._adc[slot]) * 1e9) + self._offset_ns
        self._read += 1
        self._refresh_offset()
        return CapturedBlock(samples, captured_ns)

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
