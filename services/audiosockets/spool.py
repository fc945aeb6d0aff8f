"""The recorder's optional on-disk spool (``--spool-dir``): audio the relay has not
taken yet, beyond what the Publisher keeps in memory.

Layout: a directory of segment files ``000000000001.spool``, ... Each starts with a
header (magic, rate, channels, sample type) and holds records
``captured_ns:int64, frames:uint32, payload``, little-endian, appended and flushed
one per chunk. The oldest segment is read from the front; a segment is deleted when
it has been read to its end and is no longer being written.

Invariants:
- Order: ``pop`` returns chunks in the order ``append`` took them, across segments
  and across restarts (segments left by a previous run are read first).
- Bound: the audio held never exceeds ``max_seconds`` plus one segment; to make
  room, whole oldest segments are deleted and their chunks counted as dropped.
- A truncated last record (a crash mid-write) is ignored, never mis-parsed.
- State lives in the files and in ``_segments`` (per segment: path, chunks and
  seconds still unread); ``chunks``/``seconds`` are their sums.

All I/O is small buffered appends and sequential reads on the caller's thread.
Appends are flushed to the OS one by one but not fsynced (a process kill loses
nothing written, a power cut may lose the kernel's unwritten tail); ``prepend``
and ``close`` write durably (``durable.py``), so a clean stop survives a power cut.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .audio import AudioFormat, SampleType
from .durable import fsync_dir, fsync_path, write_durably
from .errors import ConfigError
from .sources import CapturedBlock

_MAGIC = b"ASSPOOL1"
_HEADER = struct.Struct("<8sIHB")  # magic, rate, channels, sample type
_RECORD = struct.Struct("<qI")  # captured_ns, frames
_SUFFIX = ".spool"
_FIRST_INDEX = 1_000_000


@dataclass(slots=True)
class _Segment:
    path: Path
    chunks: int = 0  # unread
    seconds: float = 0.0  # unread
    read_offset: int = _HEADER.size
    written_seconds: float = 0.0  # what rotation looks at


class DiskSpool:
    """A bounded FIFO of chunks on disk, for one stream."""

    def __init__(
        self,
        directory: Path,
        fmt: AudioFormat,
        max_seconds: float,
        *,
        segment_seconds: float = 10.0,
    ) -> None:
        if not max_seconds > 0:
            raise ConfigError(f"spool size must be positive, got {max_seconds:g} s")
        self.directory = directory
        self.format = fmt
        self.max_seconds = max_seconds
        self.segment_seconds = min(segment_seconds, max(max_seconds / 4, 0.001))
        #: Chunks deleted to stay within ``max_seconds`` since this object was made.
        self.dropped = 0
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for stale in directory.glob(f"*{_SUFFIX}.tmp"):  # a rewrite cut short
                stale.unlink()
            found = sorted(p for p in directory.iterdir() if p.suffix == _SUFFIX)
        except OSError as err:
            raise ConfigError(
                f"cannot use spool directory {directory}: {err.strerror or err}"
            ) from err
        self._segments: list[_Segment] = [self._scan(p) for p in found]
        indices = [int(p.stem) for p in found if p.stem.isdigit()]
        # Numbering starts high so ``prepend`` can put segments before the first.
        self._next_index = 1 + max(indices, default=_FIRST_INDEX - 1)
        self._first_index = min(indices, default=_FIRST_INDEX)
        self._writer: BinaryIO | None = None
        self._reader: BinaryIO | None = None
        self._reader_path: Path | None = None

    # --- state -----------------------------------------------------------------

    @property
    def chunks(self) -> int:
        return sum(s.chunks for s in self._segments)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self._segments)

    def __len__(self) -> int:
        return self.chunks

    # --- writing ---------------------------------------------------------------

    def append(self, samples: np.ndarray, captured_ns: int) -> int:
        """Store one chunk; returns how many old chunks were dropped to make room."""
        fmt = self.format
        payload = np.ascontiguousarray(samples, dtype=fmt.dtype).tobytes()
        frames = len(payload) // fmt.frame_bytes
        seconds = frames / fmt.rate
        current = self._segments[-1] if self._writer is not None else None
        if current is None or current.written_seconds + seconds > self.segment_seconds:
            current = self._start_segment()
        writer = self._writer
        assert writer is not None
        try:
            writer.write(_RECORD.pack(captured_ns, frames))
            writer.write(payload)
            writer.flush()
        except OSError as err:
            raise ConfigError(
                f"cannot write to spool {current.path}: {err.strerror or err}"
            ) from err
        current.chunks += 1
        current.seconds += seconds
        current.written_seconds += seconds
        return self._enforce_bound()

    def prepend(self, blocks: list[tuple[bytes, int]]) -> int:
        """Put ``(payload, captured_ns)`` chunks *before* everything stored.

        For the chunks a closing Publisher still held in memory: on disk they
        go out first on the next run. Returns chunks dropped to stay in bound.
        """
        if not blocks:
            return 0
        fmt = self.format
        self._first_index -= 1
        path = self.directory / f"{self._first_index:012d}{_SUFFIX}"
        segment = _Segment(path)
        parts = [_HEADER.pack(_MAGIC, fmt.rate, fmt.channels, int(fmt.sample_type))]
        for payload, captured_ns in blocks:
            frames = len(payload) // fmt.frame_bytes
            parts += [_RECORD.pack(captured_ns, frames), payload]
            segment.chunks += 1
            segment.seconds += frames / fmt.rate
        try:
            write_durably(path, b"".join(parts))
        except OSError as err:
            raise ConfigError(f"cannot write to spool {path}: {err.strerror or err}") from err
        segment.written_seconds = segment.seconds
        self._segments.insert(0, segment)
        return self._enforce_bound()

    def _start_segment(self) -> _Segment:
        if self._writer is not None:
            self._writer.close()
        path = self.directory / f"{self._next_index:012d}{_SUFFIX}"
        self._next_index += 1
        fmt = self.format
        self._writer = path.open("wb")
        self._writer.write(_HEADER.pack(_MAGIC, fmt.rate, fmt.channels, int(fmt.sample_type)))
        segment = _Segment(path)
        self._segments.append(segment)
        return segment

    def _enforce_bound(self) -> int:
        dropped = 0
        while (
            len(self._segments) > 1 and self.seconds - self._segments[0].seconds >= self.max_seconds
        ):
            oldest = self._segments.pop(0)
            dropped += oldest.chunks
            self._discard(oldest)
        self.dropped += dropped
        return dropped

    # --- reading ---------------------------------------------------------------

    def pop(self) -> CapturedBlock | None:
        """The oldest chunk, removed from the spool; ``None`` when empty."""
        while self._segments:
            segment = self._segments[0]
            if segment.chunks == 0:
                if self._is_writing(segment):
                    return None
                self._segments.pop(0)
                self._discard(segment)
                continue
            reader = self._open_reader(segment)
            reader.seek(segment.read_offset)
            head = reader.read(_RECORD.size)
            captured_ns, frames = _RECORD.unpack(head)
            payload = reader.read(frames * self.format.frame_bytes)
            segment.read_offset = reader.tell()
            segment.chunks -= 1
            segment.seconds = max(0.0, segment.seconds - frames / self.format.rate)
            samples = np.frombuffer(payload, dtype=self.format.dtype).reshape(
                -1, self.format.channels
            )
            return CapturedBlock(samples, captured_ns)
        return None

    def _open_reader(self, segment: _Segment) -> BinaryIO:
        if self._reader_path != segment.path or self._reader is None:
            if self._reader is not None:
                self._reader.close()
            self._reader = segment.path.open("rb")
            self._reader_path = segment.path
        return self._reader

    def _is_writing(self, segment: _Segment) -> bool:
        return self._writer is not None and segment is self._segments[-1]

    def _discard(self, segment: _Segment) -> None:
        # Never the segment being written: callers only discard older ones.
        if self._reader_path == segment.path and self._reader is not None:
            self._reader.close()
            self._reader = self._reader_path = None
        segment.path.unlink(missing_ok=True)

    # --- opening an existing spool ----------------------------------------------

    def _scan(self, path: Path) -> _Segment:
        """Count the complete records of a segment left by an earlier run."""
        fmt = self.format
        data = path.read_bytes()
        if len(data) < _HEADER.size:
            return _Segment(path)  # crashed before the header was written: empty
        magic, rate, channels, sample_type = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise ConfigError(f"{path} is not an audiosockets spool segment; remove it")
        try:
            found = AudioFormat(rate, channels, SampleType(sample_type))
        except ValueError:
            raise ConfigError(f"{path} has a corrupt header; remove it") from None
        if found != fmt:
            raise ConfigError(
                f"spool directory {self.directory} holds {found} audio but the stream is {fmt}; "
                "send it with the old settings or use another --spool-dir"
            )
        segment = _Segment(path)
        offset = _HEADER.size
        while offset + _RECORD.size <= len(data):
            _, frames = _RECORD.unpack_from(data, offset)
            end = offset + _RECORD.size + frames * fmt.frame_bytes
            if end > len(data):
                break  # a record cut short by a crash: ignore it
            segment.chunks += 1
            segment.seconds += frames / fmt.rate
            offset = end
        return segment

    def close(self) -> None:
        """Close the files; unread chunks stay on disk for the next run.

        A partly read segment is rewritten without its read part, so a clean stop
        never sends a chunk twice (after a crash, that segment's head may be).
        Everything is fsynced: what a clean stop leaves survives a power cut.
        """
        for handle in (self._writer, self._reader):
            if handle is not None:
                handle.close()
        self._writer = self._reader = None
        self._reader_path = None
        for segment in list(self._segments):
            if segment.chunks == 0:
                self._segments.remove(segment)
                segment.path.unlink(missing_ok=True)
            elif segment.read_offset > _HEADER.size:
                data = segment.path.read_bytes()
                write_durably(segment.path, data[: _HEADER.size] + data[segment.read_offset :])
                segment.read_offset = _HEADER.size
            else:
                fsync_path(segment.path)
        fsync_dir(self.directory)  # the unlinks, and the last segment's own entry
