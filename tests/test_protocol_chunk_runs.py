"""``Connection.next_chunks``, the receiving hot path, decodes exactly what
``next_event`` would: the same chunks in the same order, and every frame it does
not take (another type, damaged, cut short) is left for ``next_event``, which
returns or refuses it as before, with the same error."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audiosockets.audio import AudioFormat, SampleType
from audiosockets.errors import ErrorCode, RemoteProtocolError
from audiosockets.protocol import (
    CHUNK_HEAD,
    NEED_DATA,
    ChunkData,
    CloseReason,
    CloseStream,
    Connection,
    Goodbye,
    Hello,
    Limits,
    OpenStream,
    Ping,
    Role,
    Welcome,
    encode,
)
from audiosockets.protocol.frames import max_chunk_payload

WELCOME = Welcome("relay", 1000, 1 << 20, 0)
LIMITS = Limits(max_chunk_seconds=0.01)  # chunks at and beyond the limit stay small
FMT = AudioFormat(16000, 1, SampleType.INT16)
FORMATS = [FMT, AudioFormat(48000, 2, SampleType.FLOAT32), AudioFormat(8000, 3, SampleType.INT32)]


def subscriber() -> Connection:
    conn = Connection("client", LIMITS)
    conn.send(Hello(Role.SUBSCRIBER, "sub"))
    conn.receive_data(encode(WELCOME))
    assert conn.next_event() == WELCOME
    return conn


@st.composite
def relay_to_subscriber(draw: st.DrawFn) -> bytes:
    """What a relay sends a subscriber: mostly chunks of declared streams, and
    now and then a frame that is damaged, cut short, or a chunk of the wrong size
    (beyond its stream's limit, or not whole frames)."""
    declared: dict[int, AudioFormat] = {}
    parts = []
    for _ in range(draw(st.integers(1, 24))):
        kind = draw(
            st.sampled_from(["open", "chunk", "chunk", "chunk", "chunk", "long", "other", "bad"])
        )
        if kind == "open" or not declared:
            sid = draw(st.integers(0, 3))
            declared[sid] = draw(st.sampled_from(FORMATS))
            parts.append(encode(OpenStream(sid, f"s{sid}", declared[sid])))
        elif kind == "chunk":
            sid = draw(st.sampled_from(sorted(declared)))
            pcm = bytes(declared[sid].frame_bytes * draw(st.integers(1, 4)))
            seq = draw(st.integers(0, 2**64 - 1))
            parts.append(encode(ChunkData(sid, seq, draw(st.integers(-(2**63), 2**63 - 1)), pcm)))
        elif kind == "long":  # at its stream's limit, or one frame beyond it
            sid = draw(st.sampled_from(sorted(declared)))
            fmt = declared[sid]
            most = (max_chunk_payload(fmt, LIMITS) - CHUNK_HEAD.size) // fmt.frame_bytes
            pcm = bytes(fmt.frame_bytes * (most + draw(st.integers(0, 1))))
            parts.append(encode(ChunkData(sid, 0, 0, pcm)))
        elif kind == "other":
            parts.append(
                encode(
                    draw(
                        st.sampled_from(
                            [
                                Ping(7),
                                CloseStream(0, CloseReason.ENDED),
                                Goodbye(ErrorCode.NORMAL, ""),
                            ]
                        )
                    )
                )
            )
        else:
            frame = bytearray(encode(ChunkData(draw(st.integers(0, 5)), 1, 2, bytes(7))))
            if draw(st.booleans()):  # or any byte of it changed
                frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
            parts.append(bytes(frame))
    return b"".join(parts)


@st.composite
def cuts(draw: st.DrawFn, data: bytes) -> list[bytes]:
    points = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def drain(conn: Connection, pieces: list[bytes], limits: list[int] | None) -> list[object]:
    """Events (and the error that ended them, as type, text and code) from
    ``pieces``: through ``next_event`` alone, or runs of ``next_chunks`` (up to
    each of ``limits`` in turn) before each ``next_event``."""
    out: list[object] = []
    turn = 0
    try:
        for piece in pieces:
            conn.receive_data(piece)
            while True:
                if limits is not None:
                    limit = limits[turn % len(limits)]
                    turn += 1
                    run = conn.next_chunks(limit)
                    assert len(run) <= limit
                    out.extend(ChunkData(*fields) for fields in run)
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                out.append(event)
    except RemoteProtocolError as exc:
        out.append((type(exc), str(exc), exc.code))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(relay_to_subscriber(), st.lists(st.integers(0, 5), min_size=1, max_size=4), st.data())
def test_runs_of_chunks_give_the_events_and_errors_of_next_event(
    wire: bytes, limits: list[int], draw: st.DataObject
) -> None:
    pieces = draw.draw(cuts(wire))
    expected = drain(subscriber(), pieces, None)
    assert drain(subscriber(), pieces, limits) == expected


def test_a_run_stops_at_a_bad_chunk_which_next_event_refuses() -> None:
    conn = subscriber()
    good = [ChunkData(1, seq, 5, bytes(640)) for seq in range(3)]
    conn.receive_data(
        encode(OpenStream(1, "mic", FMT))
        + b"".join(encode(c) for c in good)
        + encode(ChunkData(1, 3, 5, bytes(641)))  # half a sample at the end
        + encode(good[0])
    )
    assert conn.next_chunks(10) == []  # OPEN_STREAM first: next_event's
    assert isinstance(conn.next_event(), OpenStream)
    assert [ChunkData(*c) for c in conn.next_chunks(2)] == good[:2]
    assert [ChunkData(*c) for c in conn.next_chunks(10)] == good[2:]
    assert conn.next_chunks(10) == []
    with pytest.raises(RemoteProtocolError) as refused:
        conn.next_event()
    assert refused.value.code is ErrorCode.BAD_FORMAT
    assert conn.next_chunks(10) == []  # nothing more once in ERROR


def test_no_chunks_before_the_session_is_open_or_for_a_publisher() -> None:
    chunk = encode(OpenStream(1, "mic", FMT)) + encode(ChunkData(1, 0, 5, bytes(640)))
    early = Connection("client")
    early.send(Hello(Role.SUBSCRIBER, "sub"))
    early.receive_data(chunk)
    assert early.next_chunks(10) == []
    publisher = Connection("client")
    publisher.send(Hello(Role.PUBLISHER, "pub"))
    publisher.receive_data(encode(WELCOME) + chunk)
    assert publisher.next_event() == WELCOME
    assert publisher.next_chunks(10) == []
