"""``vad``: energy-based voice/sound activity detection with hangover.

The stream (mixed to mono) is cut into frames of ``frame_ms``. A frame is
active when its RMS exceeds ``threshold_dbfs``. A segment starts once
``min_speech_ms`` of consecutive active frames were seen, and ends once
``hangover_ms`` of consecutive inactive frames followed the last active one.
Events carry capture timestamps, not detection times:

    {"event": "vad_start", "time_ns": ..., "time": ...}
    {"event": "vad_end", "time_ns": ..., "time": ..., "start_ns": ..., "duration": ...}

``time_ns`` is the capture time of the first sample of the first active frame
(start) or one past the last sample of the last active frame (end), derived
from the chunk's ``captured_ns`` plus the sample offset, so it is precise to
the frame whatever the chunk size. Samples left over from a chunk carry into
the next frame; a sequence gap ends an open segment at its last active frame
and discards the partial frame (audio across a hole is not one frame).

State (one instance per stream): the partial frame, the open segment, run
counters. Spec: ``vad`` or ``vad:threshold_dbfs=-40,hangover_ms=300``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from ..audio import AudioFormat, Chunk
from . import HandlerContext, dbfs, normalized, parse_params

DEFAULTS = {
    "threshold_dbfs": -45.0,
    "frame_ms": 10.0,
    "hangover_ms": 200.0,
    "min_speech_ms": 30.0,
}


class Vad:
    """Emits ``vad_start``/``vad_end`` events and the ``vad_active`` gauge."""

    def __init__(self, ctx: HandlerContext) -> None:
        self.ctx = ctx
        p = parse_params("vad", ctx.arg, DEFAULTS)
        self.threshold_dbfs = p["threshold_dbfs"]
        self.frame_ms = p["frame_ms"]
        self.hangover_ms = p["hangover_ms"]
        self.min_speech_ms = p["min_speech_ms"]
        if self.frame_ms <= 0 or self.hangover_ms < 0 or self.min_speech_ms < 0:
            from ..errors import HandlerError

            raise HandlerError("handler vad: frame_ms must be > 0, other durations >= 0")

    def setup(self, fmt: AudioFormat) -> None:
        """Size the analysis frames (``frame_ms``) for the stream's rate and reset the state."""
        self.rate = fmt.rate
        self.frame = max(1, round(fmt.rate * self.frame_ms / 1000))
        self.onset_frames = max(1, round(self.min_speech_ms / self.frame_ms))
        self.hangover_frames = max(1, round(self.hangover_ms / self.frame_ms))
        self._pending: npt.NDArray[np.float64] = np.zeros(0)
        self._next_seq: int | None = None
        self._active = False
        self._run = 0  # consecutive active (while idle) or inactive (while active) frames
        self._run_start_ns = 0
        self._seg_start_ns = 0
        self._last_active_end_ns = 0
        self.ctx.sink.set("vad_active", (self.ctx.stream,), 0)

    def handle(self, chunk: Chunk) -> list[dict[str, Any]]:
        """Feed the chunk's frames to the detector; returns ``vad_start``/``vad_end`` events
        (capture times in ns, segment length in s) for segments that started or ended.

        A duplicate seq (after a group handover) is skipped; a gap resets the partial frame."""
        events: list[dict[str, Any]] = []
        if self._next_seq is not None and chunk.seq != self._next_seq:
            if chunk.seq < self._next_seq:
                return events  # a duplicate after a handover: already analysed
            self._pending = np.zeros(0)
            self._run = 0
            if self._active:
                events.append(self._end())
        self._next_seq = chunk.seq + 1
        mono = normalized(chunk).mean(axis=1)
        carried = len(self._pending)
        buf = np.concatenate((self._pending, mono)) if carried else mono
        n = len(buf) // self.frame
        if n:
            frames = buf[: n * self.frame].reshape(n, self.frame)
            levels = dbfs(np.sqrt(np.mean(frames * frames, axis=1)))
            ns_per_sample = 1e9 / self.rate
            for i, level in enumerate(levels):
                start_ns = chunk.captured_ns + round((i * self.frame - carried) * ns_per_sample)
                end_ns = chunk.captured_ns + round(((i + 1) * self.frame - carried) * ns_per_sample)
                event = self._step(bool(level > self.threshold_dbfs), start_ns, end_ns)
                if event is not None:
                    events.append(event)
        self._pending = buf[n * self.frame :].copy()
        return events

    def _step(self, active: bool, start_ns: int, end_ns: int) -> dict[str, Any] | None:
        if not self._active:
            if not active:
                self._run = 0
                return None
            if self._run == 0:
                self._run_start_ns = start_ns
            self._run += 1
            self._last_active_end_ns = end_ns
            if self._run < self.onset_frames:
                return None
            self._active, self._run = True, 0
            self._seg_start_ns = self._run_start_ns
            self.ctx.sink.set("vad_active", (self.ctx.stream,), 1)
            self.ctx.sink.inc("vad_segments", (self.ctx.stream,))
            return {
                "event": "vad_start",
                "time_ns": self._seg_start_ns,
                "time": self._seg_start_ns / 1e9,
            }
        if active:
            self._run = 0
            self._last_active_end_ns = end_ns
            return None
        self._run += 1
        if self._run < self.hangover_frames:
            return None
        return self._end()

    def _end(self) -> dict[str, Any]:
        self._active, self._run = False, 0
        self.ctx.sink.set("vad_active", (self.ctx.stream,), 0)
        end = self._last_active_end_ns
        return {
            "event": "vad_end",
            "time_ns": end,
            "time": end / 1e9,
            "start_ns": self._seg_start_ns,
            "duration": (end - self._seg_start_ns) / 1e9,
        }

    def teardown(self) -> list[dict[str, Any]]:
        """Close an open segment at its last active frame (the stream stopped)."""
        return [self._end()] if self._active else []
