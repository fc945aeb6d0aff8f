"""``archive:DIR``: gapless WAV segments per stream, written atomically.

A segment holds consecutive chunks only: it is closed (and a new one opened)
when adding the next chunk would pass ``--segment-seconds``, when the next
chunk's seq is not the previous seq + 1 (a gap), when the format changes, and
when the handler is torn down (processor shutdown, or the relay closed the
stream for this processor). A gap is never papered over: it is logged, and
the sidecar ``<segment>.json`` of the segment before it says
``ended_by: "gap"`` with the missing seq range, the next one carries the same
range as ``gap_before``.

File names: ``<stem>_<UTC capture time of the first frame>_<first seq>.wav``
with a fixed-width ``YYYYMMDDTHHMMSS.ffffffZ`` stamp, so names sort in
capture order within a stream. ``<stem>`` is ``filenames.stream_stem``: the
stream name itself when it is plain (``mic-1``), else a readable prefix plus
``~`` and a hash of the exact name (``mic 1`` -> ``mic_1~3c9e…``), so two
streams never share a file, and every name the archive creates fits the file
system's ``NAME_MAX`` (the stem's budget is that limit minus the longest
suffix, ``RESERVED_BYTES``). While open, a segment is ``.<name>.<writer>.part``
(a dot file not ending in ``.wav``); closing patches the RIFF sizes, fsyncs
and renames it, so a crash never leaves a half file under a final name. Group
replicas may share DIR: temp names carry the writer, and a final name another
replica already took gets ``_<writer>`` appended instead of being replaced.
Duplicates (seq already written, e.g. after a group handover) are skipped.

Continuity: a new instance (processor restart, stream handed back) reads the
newest sidecar of its stream in DIR, matched on the exact stream name stored
inside it (not on the file name); chunks that end before that segment's end
are skipped as already archived, and the seq carries on from its
``last_seq``, so chunks lost in between are a recorded gap like any other.
Sidecars written by earlier versions under the old name scheme (every
character outside ``A-Za-z0-9._-`` replaced by ``_``) are found too.

State (one instance per stream): the open segment's file object and counters.
Open files are bounded (``HandlerOptions.max_open_segments``): the instances
one handler thread runs share an LRU of open segments, and opening one past
the cap completes the least recently written (``ended_by: "open_file_cap"``,
``audiosockets_archive_evictions_total``); that stream goes on in a new
segment with its next chunk, with no gap.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import socket
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

from ..audio import AudioFormat, Chunk, SampleType
from ..durable import write_durably
from ..errors import HandlerError
from ..filenames import stem_budget, stream_stem
from . import HandlerContext

log = logging.getLogger("audiosockets.handlers.archive")

EndReason = Literal["rotation", "gap", "format_change", "closed", "open_file_cap"]
#: RIFF sizes are 32-bit: rotate well before that whatever --segment-seconds says.
MAX_DATA_BYTES = 2**32 - 1024
#: How names were made before ``filenames.stream_stem`` (read for continuity only).
_LEGACY_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def wav_header(fmt: AudioFormat, data_bytes: int) -> bytes:
    """A canonical RIFF/WAVE header: PCM for ints, IEEE float (+ fact chunk) for float32."""
    width = fmt.sample_type.width
    block = fmt.channels * width
    fmt_fields = struct.pack(
        "<HHIIHH",
        3 if fmt.sample_type is SampleType.FLOAT32 else 1,
        fmt.channels,
        fmt.rate,
        fmt.rate * block,
        block,
        width * 8,
    )
    if fmt.sample_type is SampleType.FLOAT32:
        fmt_chunk = b"fmt " + struct.pack("<I", 18) + fmt_fields + struct.pack("<H", 0)
        fmt_chunk += b"fact" + struct.pack("<II", 4, data_bytes // block)
    else:
        fmt_chunk = b"fmt " + struct.pack("<I", 16) + fmt_fields
    body = b"WAVE" + fmt_chunk + b"data" + struct.pack("<I", data_bytes)
    return b"RIFF" + struct.pack("<I", len(body) + data_bytes) + body


def segment_name(stem: str, captured_ns: int, seq: int) -> str:
    """File name of a segment: ``STEM_YYYYmmddTHHMMSS.uuuuuuZ_SEQ.wav``.

    ``stem`` is ``filenames.stream_stem`` of the stream; ``captured_ns`` (ns since
    the epoch, UTC) is the capture time of its first chunk, ``seq`` that chunk's
    seq (at least 10 digits, so names sort in order)."""
    stamp = datetime.fromtimestamp(captured_ns // 1_000_000_000, UTC).strftime("%Y%m%dT%H%M%S")
    micros = (captured_ns % 1_000_000_000) // 1000
    return f"{stem}_{stamp}.{micros:06d}Z_{seq:010d}.wav"


def part_name(name: str, writer: str) -> str:
    """The temporary name of ``name`` while ``writer`` writes it: a dot file ending ``.part``."""
    return f".{name}.{writer}.part"


def claimed_name(name: str, writer: str) -> str:
    """``name`` with ``_<writer>`` before its suffix: a final name another writer took."""
    path = Path(name)
    return f"{path.stem}_{writer}{path.suffix}"


#: Who writes, in temp names: replicas of a group may share DIR (containers
#: can even share a pid), and two of them can hold the same segment during an
#: at-least-once handover. Neither may truncate or overwrite the other's file.
WRITER_MAX = 48
WRITER = re.sub(r"[^A-Za-z0-9_-]", "_", f"{socket.gethostname()}-{os.getpid()}")[:WRITER_MAX]
#: A writer id with its instance number (``WRITER-N``), as long as it may get.
WRITER_ID_MAX = WRITER_MAX + 1 + 10
_instances = itertools.count(1)


def _longest_name(stem: str) -> str:
    """The longest name the archive can create for ``stem``: the temp file of the
    sidecar of a segment renamed for its writer, with a 20-digit (u64) seq."""
    segment = claimed_name(segment_name(stem, 0, 2**64 - 1), "w" * WRITER_ID_MAX)
    return part_name(str(Path(segment).with_suffix(".json")), "w" * WRITER_MAX)


#: Bytes every file name adds around the stream's stem, at most.
RESERVED_BYTES = len(_longest_name(""))


def _publish(tmp: Path, path: Path, writer: str) -> Path:
    """Give ``tmp`` its final name without ever replacing an existing file.

    A name already taken (another replica archived the same first chunk)
    gets this writer's id appended; the duplicate audio stays visible.
    """
    ours = path.with_name(claimed_name(path.name, writer))
    try:
        os.link(tmp, path)  # atomic, and fails rather than replace
    except FileExistsError:
        os.replace(tmp, ours)  # only this writer ever uses this name
        return ours
    except OSError:  # a filesystem without hard links: check, then rename
        target = ours if path.exists() else path
        os.replace(tmp, target)
        return target
    os.unlink(tmp)
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    write_durably(path, data, tmp=path.with_name(part_name(path.name, WRITER)))


@dataclass(slots=True)
class _Segment:
    path: Path
    tmp: Path
    file: BinaryIO
    fmt: AudioFormat
    first_seq: int
    captured_ns: int
    last_seq: int = -1
    chunks: int = 0
    data_bytes: int = 0
    gap_before: dict[str, int] | None = None


def _not_writable(directory: Path) -> str:
    """Who we are, who owns ``directory``, and the fix: the usual bind-mount mistake."""
    uid, gid = os.getuid(), os.getgid()
    try:
        st = directory.stat()
        owner = f"owned by uid {st.st_uid} gid {st.st_gid}, mode {st.st_mode & 0o7777:04o}"
    except OSError as exc:
        owner = exc.strerror or str(exc)
    return (
        f"archive directory {directory} is not writable by uid {uid} gid {gid} ({owner}): "
        f"make it theirs, e.g. `chown {uid}:{gid} HOST_DIR` for a bind-mounted directory "
        "(the images run as uid 10001)"
    )


class _OpenSegments(threading.local):
    """The archives with an open segment, least recently written first: per
    handler thread, since one thread runs all of a processor's instances and
    only it may close their files."""

    def __init__(self) -> None:
        self.lru: OrderedDict[Archive, None] = OrderedDict()


_OPEN = _OpenSegments()


class Archive:
    """Writes each stream to rotating WAV segments under ``DIR``."""

    def __init__(self, ctx: HandlerContext) -> None:
        self.ctx = ctx
        if not ctx.arg:
            raise HandlerError("handler archive needs a directory: archive:DIR")
        self.dir = Path(ctx.arg)
        if ctx.options.segment_seconds <= 0:
            raise HandlerError("--segment-seconds must be > 0")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HandlerError(f"archive directory {self.dir}: {exc.strerror or exc}") from exc
        if not os.access(self.dir, os.W_OK):
            raise HandlerError(_not_writable(self.dir))
        try:
            self._stem = stream_stem(ctx.stream, stem_budget(self.dir, RESERVED_BYTES))
        except ValueError as exc:
            raise HandlerError(f"archive: {exc}") from exc
        self._seg: _Segment | None = None
        self._writer = f"{WRITER}-{next(_instances)}"
        self._next_seq: int | None = None
        self._pending_gap: dict[str, int] | None = None
        self._prior: tuple[int, int] | None = None

    def setup(self, fmt: AudioFormat) -> None:
        """Declare the stream's archive series and find the last segment an earlier run
        (or another group member) archived, to continue after it without overlap."""
        self.ctx.sink.inc("archive_segments", (self.ctx.stream,), 0)
        self.ctx.sink.inc("archive_bytes", (self.ctx.stream,), 0)
        self._prior = self._last_archived()

    def _last_archived(self) -> tuple[int, int] | None:
        """(last seq, capture end ns) of this stream's newest complete segment in DIR.

        Sidecars are matched on the exact stream name inside them: a file name
        only narrows the search (and earlier versions gave ``mic 1`` and ``mic_1``
        the same names).
        """
        stems = {self._stem, _LEGACY_UNSAFE.sub("_", self.ctx.stream)}
        try:
            listing = [p.name for p in self.dir.iterdir()]
        except OSError:
            return None
        newest: tuple[int, int] | None = None
        for stem in stems:
            pattern = re.compile(
                re.escape(stem) + r"_\d{8}T\d{6}\.\d{6}Z_\d{10,}(_[A-Za-z0-9_-]+)?\.json"
            )
            # Within one stem, names sort in capture order: the first readable match
            # from the end is that stem's newest.
            for name in sorted((n for n in listing if pattern.fullmatch(n)), reverse=True):
                found = self._read_sidecar(self.dir / name)
                if found is not None:
                    if newest is None or found[1] > newest[1]:
                        newest = found
                    break
        return newest

    def _read_sidecar(self, path: Path) -> tuple[int, int] | None:
        """(last seq, capture end ns) from a sidecar of this very stream, else None."""
        try:
            meta = json.loads(path.read_text())
            if meta["stream"] != self.ctx.stream:
                return None  # another stream whose name maps to a similar file name
            return int(meta["last_seq"]), int(meta["captured_ns"]) + round(meta["seconds"] * 1e9)
        except (OSError, ValueError, KeyError, TypeError):
            return None  # an unreadable sidecar: the caller tries the one before

    def _continue_prior(self, chunk: Chunk) -> bool:
        """First chunk after a restart or handover: skip what DIR already holds, and
        carry the sequence on so a hole across the restart is still a recorded gap."""
        assert self._prior is not None
        last_seq, end_ns = self._prior
        if chunk.captured_ns + round(chunk.seconds * 1e9) <= end_ns + 1_000_000:
            return False  # ends before the archived audio does: already written
        self._prior = None
        if chunk.seq > last_seq:
            self._next_seq = last_seq + 1  # a hole is handled as any other gap below
        else:
            log.info(
                "archive %s: sequence restarted at %d (was %d)", chunk.stream, chunk.seq, last_seq
            )
        return True

    def handle(self, chunk: Chunk) -> None:
        """Append the chunk to the open WAV segment, rotating after ``segment_seconds``
        and on a gap or format change; chunks already archived (at-least-once
        delivery after a handover) are skipped. Raises ``OSError`` if the disk fails."""
        if self._prior is not None and not self._continue_prior(chunk):
            return
        if self._next_seq is not None and chunk.seq < self._next_seq:
            return  # already written (at-least-once delivery after a handover)
        seg = self._seg
        if self._next_seq is not None and chunk.seq != self._next_seq:
            gap = {
                "expected_seq": self._next_seq,
                "next_seq": chunk.seq,
                "missing_chunks": chunk.seq - self._next_seq,
            }
            log.warning(
                "archive %s: gap in sequence, %d chunk(s) missing (seq %d..%d); segment closed",
                chunk.stream,
                gap["missing_chunks"],
                gap["expected_seq"],
                chunk.seq - 1,
            )
            if seg is not None:
                self._close(seg, "gap", gap_after=gap)
                seg = None
            self._pending_gap = gap
        payload = chunk.payload
        if seg is not None:
            limit = min(
                round(self.ctx.options.segment_seconds * seg.fmt.rate) * seg.fmt.frame_bytes,
                MAX_DATA_BYTES,
            )
            if seg.fmt != chunk.format:
                self._close(seg, "format_change")
                seg = None
            elif seg.data_bytes + len(payload) > limit and seg.data_bytes > 0:
                self._close(seg, "rotation")
                seg = None
        if seg is None:
            seg = self._open(chunk)
        seg.file.write(payload)
        # Into the kernel before handle() returns: the processor ACKs the chunk
        # to the relay once we return, so a killed process must not take it
        # with it in a user-space buffer (the next owner will not re-send it).
        seg.file.flush()
        _OPEN.lru.move_to_end(self)
        seg.data_bytes += len(payload)
        seg.chunks += 1
        seg.last_seq = chunk.seq
        self._next_seq = chunk.seq + 1
        self.ctx.sink.inc("archive_bytes", (chunk.stream,), len(payload))

    def _open(self, chunk: Chunk) -> _Segment:
        lru = _OPEN.lru
        while len(lru) >= self.ctx.options.max_open_segments:
            oldest, _ = lru.popitem(last=False)
            if oldest._seg is not None:
                log.info(
                    "archive %s: %d segment files open, completing the least recently written",
                    oldest.ctx.stream,
                    self.ctx.options.max_open_segments,
                )
                oldest._close(oldest._seg, "open_file_cap")
                self.ctx.sink.inc("archive_evictions", (oldest.ctx.stream,))
        name = segment_name(self._stem, chunk.captured_ns, chunk.seq)
        path = self.dir / name
        tmp = self.dir / part_name(name, self._writer)
        f = open(tmp, "wb")  # noqa: SIM115 - lives until the segment is closed
        f.write(wav_header(chunk.format, 0))
        seg = _Segment(path, tmp, f, chunk.format, chunk.seq, chunk.captured_ns)
        seg.gap_before, self._pending_gap = self._pending_gap, None
        self._seg = seg
        lru[self] = None
        return seg

    def _close(
        self, seg: _Segment, reason: EndReason, gap_after: dict[str, int] | None = None
    ) -> None:
        self._seg = None
        _OPEN.lru.pop(self, None)
        f = seg.file
        f.seek(0)
        f.write(wav_header(seg.fmt, seg.data_bytes))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        seg.path = _publish(seg.tmp, seg.path, self._writer)
        fmt = seg.fmt
        sidecar: dict[str, Any] = {
            "stream": self.ctx.stream,
            "file": seg.path.name,
            "format": {
                "rate": fmt.rate,
                "channels": fmt.channels,
                "sample_type": fmt.sample_type.label,
            },
            "first_seq": seg.first_seq,
            "last_seq": seg.last_seq,
            "chunks": seg.chunks,
            "frames": seg.data_bytes // fmt.frame_bytes,
            "seconds": fmt.seconds(seg.data_bytes),
            "captured_ns": seg.captured_ns,
            "captured_at": datetime.fromtimestamp(seg.captured_ns / 1e9, UTC).isoformat(),
            "ended_by": reason,
            "gap_before": seg.gap_before,
            "gap_after": gap_after,
        }
        # The directory fsync in it also makes the segment's rename above durable.
        _write_atomic(seg.path.with_suffix(".json"), json.dumps(sidecar, indent=2).encode() + b"\n")
        self.ctx.sink.inc("archive_segments", (self.ctx.stream,))

    def teardown(self) -> None:
        """Complete the open segment (fsync, rename to its final name). No events."""
        if self._seg is not None:
            self._close(self._seg, "closed")
