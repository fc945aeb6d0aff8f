"""The publisher counts every chunk lost before the relay, once (issue 17).

Chunks never sent are counted ``spool_full`` as the spool drops them. Chunks
written to a connection that broke before the relay read them are not known
lost until a new session says what the relay holds; if they have left the
spool by then they cannot be resent and are counted ``spool_full`` too.
Without sockets: the stream's spool is driven directly.
"""

from __future__ import annotations

import tracemalloc

import numpy as np

from audiosockets.audio import AudioFormat, SampleType
from audiosockets.client import PublishedStream, Publisher
from audiosockets.metrics import Metrics

FMT = AudioFormat(16000, 1, SampleType.INT16)
BLOCK = 320  # 20 ms


def block(seq: int) -> np.ndarray:
    return np.full((BLOCK, 1), seq % 30000, dtype=np.int16)


def sent_then_cut(history_chunks: int, written: int) -> tuple[Publisher, PublishedStream]:
    """A stream that wrote ``written`` chunks to a session which then broke."""
    pub = Publisher(
        "tcp://127.0.0.1:1", name="rec", history_seconds=history_chunks * 0.02, metrics=Metrics()
    )
    stream = pub.stream("mic", FMT)
    stream.resume_from(0)  # a session: the relay holds nothing yet
    for seq in range(written):
        stream.send(block(seq))
    assert [e.seq for e in stream.take(1 << 30)] == list(range(written))
    pub._session_ended()  # the connection broke
    return pub, stream


def spool_full(pub: Publisher) -> float:
    value = pub.metrics.registry.get_sample_value(
        "audiosockets_chunks_dropped_total", {"stream": "mic", "reason": "spool_full"}
    )
    return value or 0.0


def test_chunks_written_to_a_broken_connection_and_trimmed_are_lost_at_the_source() -> None:
    pub, stream = sent_then_cut(history_chunks=50, written=50)
    for seq in range(50, 120):  # the outage outlasts the spool
        stream.send(block(seq))
    assert spool_full(pub) == 20  # 50..69 never sent
    # The relay (still up) read up to seq 44: 45..49 went down with the connection.
    stream.resume_from(45)
    assert spool_full(pub) == 20 + 5
    assert stream.dropped == 25
    # The relay's view: it holds ..44 and gets 70..119; the gap 45..69 is all counted here.
    assert [e.seq for e in stream.take(1 << 30)] == list(range(70, 120))


def test_nothing_is_counted_when_the_relay_got_everything_or_cannot_say() -> None:
    pub, stream = sent_then_cut(history_chunks=50, written=50)
    for seq in range(50, 120):
        stream.send(block(seq))
    stream.resume_from(50)  # read all 0..49
    assert spool_full(pub) == 20
    pub, stream = sent_then_cut(history_chunks=50, written=50)
    for seq in range(50, 120):
        stream.send(block(seq))
    stream.resume_from(0)  # a restarted relay: unknown
    assert spool_full(pub) == 20


def test_an_outage_within_the_spool_resends_instead_of_counting() -> None:
    pub, stream = sent_then_cut(history_chunks=50, written=30)
    for seq in range(30, 45):
        stream.send(block(seq))
    stream.resume_from(25)
    assert spool_full(pub) == 0
    assert [e.seq for e in stream.take(1 << 30)] == list(range(25, 45))


def test_the_spool_is_bounded_in_bytes_too_whichever_is_reached_first() -> None:
    """A wide stream must not fill memory within its seconds (640 B a chunk here)."""
    pub = Publisher(
        "tcp://127.0.0.1:1",
        name="rec",
        history_seconds=60,
        history_bytes=10 * 640,
        metrics=Metrics(),
    )
    stream = pub.stream("mic", FMT)
    for seq in range(25):  # 0.5 s, far within 60 s: only the byte bound applies
        stream.send(block(seq))
    assert [e.seq for e in stream.history] == list(range(15, 25))
    assert stream.history_bytes == 10 * 640
    assert spool_full(pub) == 15 == stream.dropped  # never sent: counted
    # The seconds bound still holds when it is reached first.
    pub.history_seconds = 0.1  # 5 chunks
    stream.send(block(25))
    assert [e.seq for e in stream.history] == list(range(21, 26))
    assert spool_full(pub) == 15 + 6


def test_what_the_spool_dropped_is_freed_at_once() -> None:
    """Trimmed chunks must not linger until the history compacts (1024 chunks later)."""
    pub = Publisher(
        "tcp://127.0.0.1:1",
        name="rec",
        history_seconds=60,
        history_bytes=1 << 20,
        metrics=Metrics(),
    )
    stream = pub.stream("mic", FMT)
    tracemalloc.start()
    try:
        for seq in range(600):
            stream.send(bytes([seq % 256]) * (64 << 10))  # 2 s of FMT: 16 fill the bound
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stream.history_bytes <= 1 << 20
    assert held < 4 << 20  # the bound, not 600 - 16 dropped chunks of 64 KiB
