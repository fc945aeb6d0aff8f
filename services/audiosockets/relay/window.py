"""The replay window: the recent encoded CHUNK frames of one stream, pure state."""

from __future__ import annotations

import bisect


class ReplayWindow:
    """The recent CHUNK frames of one stream, addressable by ordinal.

    Every appended chunk gets the next ordinal (0, 1, 2, ... over the life of
    the stream, never reused); ``base`` is the ordinal of the oldest one still
    held and ``end`` the ordinal the next one will get. Sequence numbers and
    arrival times are non-decreasing, so both can be searched with bisect.
    Trimmed entries are blanked at once and their list slots compacted away in
    bulk, so ``append`` and ``trim`` are amortised O(1). The sequence numbers
    trimmed are remembered as runs (``trimmed_after``): what a late subscriber
    lost *here*, as opposed to numbers that never reached the relay.
    """

    __slots__ = (
        "arrivals",
        "base",
        "durations",
        "frames",
        "head",
        "seqs",
        "total_bytes",
        "total_seconds",
        "trimmed_runs",
    )

    #: Runs of trimmed sequence numbers remembered: a new run starts only at a
    #: gap in the numbers (the publisher lost chunks), so this is a long time.
    MAX_TRIMMED_RUNS = 4096

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.frames: list[bytes] = []
        self.durations: list[float] = []
        self.arrivals: list[float] = []
        self.head = 0  # list index of the oldest live entry
        self.base = 0  # ordinal of the oldest live entry
        self.total_seconds = 0.0
        self.total_bytes = 0
        # [first, last] runs of sequence numbers held and trimmed, oldest first.
        self.trimmed_runs: list[list[int]] = []

    def __len__(self) -> int:
        """Number of chunks held."""
        return len(self.seqs) - self.head

    @property
    def end(self) -> int:
        """Ordinal the next appended chunk will get."""
        return self.base + len(self)

    def append(self, seq: int, frame: bytes, seconds: float, arrived: float) -> None:
        """Hold one encoded CHUNK frame.

        ``seq`` is the chunk's sequence number (not below the previous one),
        ``frame`` the whole encoded frame as sent to subscribers, ``seconds``
        the audio it carries (payload bytes / (frame bytes * rate)) and
        ``arrived`` the relay clock's reading when it arrived (seconds, not
        below the previous one). Does not trim: call ``trim`` after.
        """
        self.seqs.append(seq)
        self.frames.append(frame)
        self.durations.append(seconds)
        self.arrivals.append(arrived)
        self.total_seconds += seconds
        self.total_bytes += len(frame)

    def trim(self, max_seconds: float, max_bytes: int) -> None:
        """Drop the oldest chunks until at most ``max_seconds`` of audio and
        ``max_bytes`` of frames are held, but always keep the newest chunk
        (so a resume can always be answered). The limits come from
        ``RelayConfig.replay_seconds`` and ``RelayConfig.max_window_bytes``."""
        limit = max_seconds + 1e-9  # sums of float durations drift by ulps
        while len(self) > 1 and (self.total_seconds > limit or self.total_bytes > max_bytes):
            self._remember_trimmed(self.seqs[self.head])
            self.total_seconds -= self.durations[self.head]
            self.total_bytes -= len(self.frames[self.head])
            self.frames[self.head] = b""
            self.head += 1
            self.base += 1
        if self.head > 1024 and self.head * 2 > len(self.seqs):
            for lst in (self.seqs, self.frames, self.durations, self.arrivals):
                del lst[: self.head]
            self.head = 0

    def _remember_trimmed(self, seq: int) -> None:
        runs = self.trimmed_runs
        if runs and runs[-1][1] + 1 == seq:
            runs[-1][1] = seq
            return
        runs.append([seq, seq])
        if len(runs) > self.MAX_TRIMMED_RUNS:
            del runs[0]

    def trimmed_after(self, seq: int) -> tuple[int, int]:
        """How many chunks with a sequence number above ``seq`` this window held
        and trimmed, and the highest such number (``seq`` when none). Numbers
        in the gaps between runs never reached the relay and are not counted."""
        count = 0
        last = seq
        for first, end in reversed(self.trimmed_runs):
            if end <= seq:
                break
            count += end - max(first, seq + 1) + 1
            last = max(last, end)
        return count, last

    def clear(self) -> None:
        """Drop every chunk; ordinals keep counting from ``end``."""
        self.base = self.end
        for lst in (self.seqs, self.frames, self.durations, self.arrivals):
            lst.clear()
        self.head = 0
        self.total_seconds = 0.0
        self.total_bytes = 0

    def ordinal_after_seq(self, seq: int) -> int:
        """Ordinal of the first held chunk with a sequence number above ``seq``
        (``end`` when there is none)."""
        i = bisect.bisect_right(self.seqs, seq, lo=self.head)
        return self.base + (i - self.head)

    def ordinal_arrived_at(self, when: float) -> int:
        """Ordinal of the first held chunk that arrived at or after ``when``
        (relay clock seconds; ``end`` when there is none)."""
        i = bisect.bisect_left(self.arrivals, when, lo=self.head)
        return self.base + (i - self.head)

    def first_seq(self) -> int | None:
        """Sequence number of the oldest chunk held, None when empty."""
        return self.seqs[self.head] if len(self) else None
