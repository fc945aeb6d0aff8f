"""``level``: RMS and peak level per channel, clipping, time since last sound.

Convention: dBFS relative to the full-scale *peak* (int16 full scale is 32768,
float full scale is 1.0). A full-scale sine therefore reads ``peak = 0 dBFS``
and ``rms = -3.01 dBFS``; a full-scale square wave reads 0 dBFS for both.
Digital silence reads ``FLOOR_DBFS`` (-120) rather than -inf.

State (one instance per stream): the capture time at which the current
stretch of silence began. "Seconds since sound" is measured in capture time
(end of the newest chunk minus end of the newest chunk whose RMS on any channel
was above ``silence_dbfs``), so it is exact for replayed or delayed audio; a
stream that stops arriving altogether is the relay's
``audiosockets_last_chunk_timestamp_seconds`` to alert on.

Spec: ``level`` or ``level:silence_dbfs=-50``.
"""

from __future__ import annotations

import numpy as np

from ..audio import AudioFormat, Chunk, SampleType
from . import HandlerContext, dbfs, normalized, parse_params

DEFAULTS = {"silence_dbfs": -60.0}


class Level:
    """Per-channel RMS/peak gauges, a clipping counter and a silence timer."""

    def __init__(self, ctx: HandlerContext) -> None:
        self.ctx = ctx
        self.silence_dbfs = parse_params("level", ctx.arg, DEFAULTS)["silence_dbfs"]
        self._sound_end_ns: int | None = None

    def setup(self, fmt: AudioFormat) -> None:
        """Take the stream's format: full scale and clipping thresholds follow its sample type."""
        self._fmt = fmt
        if fmt.sample_type is SampleType.FLOAT32:
            self._clip_hi, self._clip_lo = 1.0, -1.0
        else:
            info = np.iinfo(np.int16 if fmt.sample_type is SampleType.INT16 else np.int32)
            self._clip_hi, self._clip_lo = float(info.max), float(info.min)

    def handle(self, chunk: Chunk) -> None:
        """Set ``level_dbfs`` (rms and peak per channel, dBFS, floor -120), count
        ``clipped_samples`` (samples at or beyond full scale) and set
        ``seconds_since_sound`` (capture-time seconds since a chunk whose rms exceeded
        ``silence_dbfs``). Returns no events."""
        stream, sink = chunk.stream, self.ctx.sink
        raw = np.asarray(chunk.samples, dtype=np.float64)
        if raw.shape[0] == 0:
            return
        x = normalized(chunk)
        rms = dbfs(np.sqrt(np.mean(x * x, axis=0)))
        peak = dbfs(np.max(np.abs(x), axis=0))
        clipped = np.count_nonzero((raw >= self._clip_hi) | (raw <= self._clip_lo), axis=0)
        for ch in range(x.shape[1]):
            label = str(ch)
            sink.set("level_dbfs", (stream, label, "rms"), float(rms[ch]))
            sink.set("level_dbfs", (stream, label, "peak"), float(peak[ch]))
            if clipped[ch]:
                sink.inc("clipped_samples", (stream, label), float(clipped[ch]))
        end_ns = chunk.captured_ns + round(chunk.seconds * 1e9)
        if self._sound_end_ns is None:
            self._sound_end_ns = chunk.captured_ns  # silence counts from the first chunk seen
        if float(np.max(rms)) > self.silence_dbfs:
            self._sound_end_ns = end_ns
        sink.set("seconds_since_sound", (stream,), (end_ns - self._sound_end_ns) / 1e9)

    def teardown(self) -> None:
        """Nothing to release; no events."""
        pass
