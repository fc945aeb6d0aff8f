"""Capture times for a device's blocks: a frame counter, disciplined toward the device.

A sound card delivers frames at its own sample clock, and PortAudio reports for each
block the time its first frame reached the ADC (``inputBufferAdcTime``). Those reports
are not good enough to stamp chunks with directly: through the PulseAudio/ALSA plugin
the first block after an open is reported about 0.5 s in the past and the reports
converge over some 100 blocks, so consecutive 20 ms chunks came out 40 ms apart while
the audio was continuous; and they jitter with scheduling when the ADC time is missing.

``CaptureClock`` therefore stamps block *n* as ``anchor + frames_before_n / rate +
correction``: the anchor is the wall-clock time of the first frame after an open, the
frame counter is exact, and ``correction`` is steered toward the device's reports
(``device_ns``) slowly:

- The difference ``device_ns - predicted`` is smoothed (an exponential average over
  ``smoothing_seconds`` of audio, each report's pull clipped to
  ``report_clip_seconds``, so the wild reports after an open weigh little) and
  ``correction`` moves toward it by at most
  ``max_slew_ppm`` of each block's duration (1000 ppm: 20 µs per 20 ms block), which
  is more than a sound card's crystal drifts (typically < 100 ppm) and far too little
  to be heard in timestamps. Consecutive stamps therefore differ by the block's
  duration within ``max_slew_ppm``, whatever the device reports. A drifting sample
  clock is followed with a standing error of about drift × ``smoothing_seconds``
  (100 ppm: 0.1 ms).
- Reports more than ``step_threshold_seconds`` off are left out of the average; if
  that lasts ``step_after_seconds`` of audio it is a step of the wall clock (NTP setting the time of an edge PC without a
  real-time clock): the correction then jumps by it, once (``steps`` counts them).
- Frames really lost move the counter on: ``lost_frames`` known to the caller (its
  hand-off ring was full), or, after an input overflow, how much further the device's
  report is from its previous report than the frames counted in between, rounded to
  frames (only when more than half a block; never backwards).
- ``anchor`` again (the device was reopened) starts a new count at the new first
  frame, never before the end of the previous block: stamps never go backwards
  across a reopen, and the gap is returned for the capture-gap metrics.

Pure: no I/O, no clock reads; the caller passes every time in. State: the anchor, the
frame count since it, the correction and the smoothed difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NS_PER_S = 1_000_000_000


@dataclass(slots=True)
class CaptureClock:
    """Stamps consecutive blocks of one capture stream (see the module note).

    ``rate`` in Hz. Times are wall-clock ns since the Unix epoch. Call ``anchor``
    before the first ``stamp`` and after every reopen.
    """

    rate: int
    max_slew_ppm: float = 1000.0
    smoothing_seconds: float = 1.0
    step_threshold_seconds: float = 0.5
    step_after_seconds: float = 5.0
    report_clip_seconds: float = 0.005
    #: Wall-clock steps followed (see ``step_threshold_seconds``).
    steps: int = 0
    #: Frames counted as lost (given by the caller, or estimated after overflows).
    lost_frames: int = 0
    _base_ns: int | None = field(default=None, repr=False)
    _frames: int = field(default=0, repr=False)
    _correction_ns: int = field(default=0, repr=False)
    _offset_ns: float = field(default=0.0, repr=False)
    _beyond_ns: int = field(default=0, repr=False)
    _last_report: tuple[int, int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError(f"rate must be positive, got {self.rate}")
        if not 0 < self.max_slew_ppm < 1e6:
            raise ValueError(f"max_slew_ppm must be in (0, 1e6), got {self.max_slew_ppm}")
        if self.smoothing_seconds <= 0 or self.step_threshold_seconds <= 0:
            raise ValueError("smoothing_seconds and step_threshold_seconds must be positive")

    @property
    def anchored(self) -> bool:
        return self._base_ns is not None

    @property
    def next_ns(self) -> int:
        """The stamp the next block will get (before its own correction)."""
        if self._base_ns is None:
            raise RuntimeError("anchor() first")
        return self._base_ns + self._frames * NS_PER_S // self.rate + self._correction_ns

    @property
    def offset_ns(self) -> float:
        """The smoothed difference device - stamps still to be steered away (ns)."""
        return self._offset_ns

    def anchor(self, first_frame_ns: int) -> int:
        """Start counting at a block whose first frame was captured at ``first_frame_ns``.

        After an earlier anchor (a reopen), the new start is never before the end of
        the last block stamped. Returns the gap in ns (0 for the first anchor).
        """
        gap = 0
        if self._base_ns is not None:
            end = self.next_ns
            if first_frame_ns < end:
                first_frame_ns = end
            gap = first_frame_ns - end
        self._base_ns = first_frame_ns
        self._frames = 0
        self._correction_ns = 0
        self._offset_ns = 0.0
        self._beyond_ns = 0
        self._last_report = None
        return gap

    def stamp(
        self,
        frames: int,
        device_ns: int | None = None,
        *,
        lost_frames: int = 0,
        overflow: bool = False,
    ) -> int:
        """The capture time (ns) of the first frame of the next block of ``frames``.

        ``device_ns``: the device's own report for that frame (wall clock), if any.
        ``lost_frames``: frames known to be missing before this block. ``overflow``:
        the device flagged lost input before this block (how much is estimated from
        ``device_ns``).
        """
        if self._base_ns is None:
            raise RuntimeError("anchor() first")
        if frames < 0 or lost_frames < 0:
            raise ValueError("frames and lost_frames must be >= 0")
        if lost_frames:
            self._frames += lost_frames
            self.lost_frames += lost_frames
        block_ns = frames * NS_PER_S // self.rate
        if device_ns is not None:
            if overflow and self._last_report is not None:
                # How far this report is from the last one, beyond the frames counted
                # in between: local, so neither a standing offset nor the slow
                # convergence of the reports after an open passes for lost audio.
                last_ns, last_frames = self._last_report
                jump = device_ns - last_ns - (self._frames - last_frames) * NS_PER_S // self.rate
                if jump > block_ns // 2:
                    missing = round(jump * self.rate / NS_PER_S)
                    self._frames += missing
                    self.lost_frames += missing
            self._last_report = (device_ns, self._frames)
        stamp = self.next_ns
        if device_ns is not None:
            # Steers the blocks after this one: the first block after an anchor is
            # stamped with the anchor itself.
            self._discipline(device_ns - stamp, block_ns)
        self._frames += frames
        return stamp

    def _discipline(self, difference: int, block_ns: int) -> None:
        """Follow a lasting step; else smooth the difference and slew toward it."""
        if abs(difference) > self.step_threshold_seconds * NS_PER_S:
            self._beyond_ns += block_ns
            if self._beyond_ns >= self.step_after_seconds * NS_PER_S:
                # By the latest report, not the average (which still lags the step);
                # its jitter is nothing next to a step this large.
                self._correction_ns += difference
                self._offset_ns = 0.0
                self._beyond_ns = 0
                self.steps += 1
            return  # a report that far off says nothing about a small offset
        self._beyond_ns = 0
        # Starts from 0 (trust the anchor), and one report moves the average by at most
        # ``report_clip_seconds`` × weight: the reports right after an open, which may be
        # hundreds of ms off, cannot drag the stamps far before they converge.
        weight = min(1.0, block_ns / (self.smoothing_seconds * NS_PER_S))
        clip = self.report_clip_seconds * NS_PER_S
        innovation = max(-clip, min(clip, difference - self._offset_ns))
        self._offset_ns += weight * innovation
        offset = self._offset_ns
        limit = self.max_slew_ppm * 1e-6 * block_ns
        step = round(max(-limit, min(limit, offset)))
        self._correction_ns += step
        self._offset_ns = offset - step


__all__ = ["NS_PER_S", "CaptureClock"]
