"""``device:`` sources: a PortAudio input device through ``sounddevice`` (lazy import).

Capture times come from ``capture_clock.CaptureClock``: a frame counter anchored at
the first block after each open, steered toward PortAudio's ADC times with a bounded
slew (the ADC times right after an open can be half a second off), so consecutive
blocks are one block apart unless frames were really lost (an overflow, a full ring)
or the device was reopened. The PortAudio callback only copies, stores its times and
flags, and bumps counters.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import numpy as np

from ..audio import AudioFormat
from ..capture_clock import CaptureClock
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
                async with asyncio.timeout(self._stall_timeout):
                    await self._wake.wait()
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
