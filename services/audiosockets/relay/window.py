"""The replay window: the recent encoded CHUNK frames of one stream, pure state.

Memory is accounted as it really is: ``memory_bytes`` counts each frame's
bytes plus ``ENTRY_OVERHEAD_BYTES`` per chunk (the bytes object's header, the
four list slots, the seq int and the two floats), so a flood of tiny chunks
costs what it costs. Every change is also applied to the relay-wide
``MemoryLedger`` the window was made with, so the relay's total is the sum of
its windows without a scan.
"""

from __future__ import annotations

import bisect

from .budget import ENTRY_OVERHEAD_BYTES, MemoryLedger


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
        "ledger",
        "memory_bytes",
        "seqs",
        "total_seconds",
        "trimmed_runs",
    )

    #: Runs of trimmed sequence numbers remembered: a new run starts only at a
    #: gap in the numbers (the publisher lost chunks), so this is a long time.
    MAX_TRIMMED_RUNS = 4096

    def __init__(self, ledger: MemoryLedger | None = None) -> None:
        self.ledger = ledger if ledger is not None else MemoryLedger()
        self.seqs: list[int] = []
        self.frames: list[bytes] = []
        self.durations: list[float] = []
        self.arrivals: list[float] = []
        self.head = 0  # list index of the oldest live entry
        self.base = 0  # ordinal of the oldest live entry
        self.total_seconds = 0.0
        self.memory_bytes = 0  # frames + ENTRY_OVERHEAD_BYTES per chunk held
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
        cost = len(frame) + ENTRY_OVERHEAD_BYTES
        self.memory_bytes += cost
        self.ledger.held += cost

    def trim(self, max_seconds: float, max_bytes: int) -> None:
        """Drop the oldest chunks until at most ``max_seconds`` of audio and
        ``max_bytes`` of memory (``memory_bytes``) are held, but always keep
        the newest chunk (so a resume can always be answered). The limits come
        from ``RelayConfig.replay_seconds`` and ``RelayConfig.max_window_bytes``."""
        limit = max_seconds + 1e-9  # sums of float durations drift by ulps
        n = 0
        seconds = self.total_seconds
        memory = self.memory_bytes
        i = self.head
        while len(self) - n > 1 and (seconds > limit or memory > max_bytes):
            seconds -= self.durations[i]
            memory -= len(self.frames[i]) + ENTRY_OVERHEAD_BYTES
            i += 1
            n += 1
        if n:
            self.drop_oldest(n)

    def drop_oldest(self, n: int) -> None:
        """Drop the ``n`` oldest chunks held (at most ``len(self)``)."""
        n = min(n, len(self))
        freed = 0
        for i in range(self.head, self.head + n):
            self._remember_trimmed(self.seqs[i])
            self.total_seconds -= self.durations[i]
            freed += len(self.frames[i]) + ENTRY_OVERHEAD_BYTES
            self.frames[i] = b""
        self.head += n
        self.base += n
        self.memory_bytes -= freed
        self.ledger.held -= freed
        if not len(self):
            self.total_seconds = 0.0  # no drift left behind in an empty window
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
        self.ledger.held -= self.memory_bytes
        self.memory_bytes = 0

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

    def seq_at(self, ordinal: int) -> int:
        """Sequence number of the held chunk with ``ordinal`` (IndexError if not held)."""
        if not self.base <= ordinal < self.end:
            raise IndexError(f"ordinal {ordinal} is not held")
        return self.seqs[ordinal - self.base + self.head]

    def first_seq(self) -> int | None:
        """Sequence number of the oldest chunk held, None when empty."""
        return self.seqs[self.head] if len(self) else None
