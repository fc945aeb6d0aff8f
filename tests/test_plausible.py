"""Forged sequence numbers and capture times (issue 11, item 5): the pure
decisions, and a relay that refuses them without harm to anyone else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from _support import wait_until
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.errors import ErrorCode, RemoteProtocolError
from audiosockets.protocol import (
    Ack,
    ChunkData,
    CloseStream,
    NeedData,
    OpenStream,
    StartPosition,
    StreamAccepted,
    Subscribe,
    encode_chunk,
)
from audiosockets.relay import Relay, RelayConfig
from audiosockets.relay.plausible import (
    MAX_FIRST_SEQ,
    MAX_SEQ,
    SEQ_JUMP_SLACK_SECONDS,
    check_capture_time,
    check_seq,
)
from hostile.harness import RawSession, raw_session

MONO16 = AudioFormat(16000, 1, SampleType.INT16)
U64 = st.integers(0, 2**64 - 1)


def refused(call: object, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        call()  # type: ignore[operator]
    assert info.value.reason == reason
    assert info.value.code is ErrorCode.MALFORMED_FRAME


def test_sequence_numbers_a_real_publisher_sends_pass() -> None:
    check_seq(0, -1, 16000, 0.0)  # a new stream
    check_seq(5000, -1, 16000, 0.0)  # a relay that restarted empty, a spool resent
    check_seq(11, 10, 16000, 0.0)  # the next one
    check_seq(3, 10, 16000, 0.0)  # a duplicate: suppressed later, not refused
    # An hour's outage of a 16 kHz stream in 20 ms chunks: 180,000 missing.
    check_seq(10 + 180_001, 10, 16000, 3600.0)


def test_forged_sequence_numbers_are_refused() -> None:
    refused(lambda: check_seq(2**64 - 1, -1, 16000, 0.0), "seq_jump")
    refused(lambda: check_seq(MAX_FIRST_SEQ + 1, -1, 16000, 0.0), "seq_jump")
    refused(lambda: check_seq(10 + 2**63, 10, 16000, 0.0), "seq_jump")
    # One second of quiet: at most rate * (1 + slack) chunks can be missing.
    allowed = int(16000 * (1.0 + SEQ_JUMP_SLACK_SECONDS))
    check_seq(10 + allowed + 1, 10, 16000, 1.0)
    refused(lambda: check_seq(10 + allowed + 2, 10, 16000, 1.0), "seq_jump")


@given(seq=U64, last=st.integers(-1, MAX_SEQ), rate=st.integers(1, 768000), quiet=st.floats(0, 1e9))
def test_whatever_passes_keeps_next_seq_and_gaps_inside_u64(
    seq: int, last: int, rate: int, quiet: float
) -> None:
    try:
        check_seq(seq, last, rate, quiet)
    except RemoteProtocolError as exc:
        reason = exc.reason
    else:
        reason = ""
    if reason:
        assert reason == "seq_jump"
        return
    assert seq + 1 <= 2**64 - 1  # the next_seq a reopen is told fits the wire
    assert max(0, seq - last - 1) < 2**63  # a gap fits any counter


def test_capture_times_far_from_the_relay_clock_are_refused() -> None:
    now = time.time_ns()
    check_capture_time(now, now, 300, 86400)
    check_capture_time(now + 299 * 10**9, now, 300, 86400)
    check_capture_time(now - 86399 * 10**9, now, 300, 86400)
    refused(lambda: check_capture_time(2**63 - 1, now, 300, 86400), "capture_time")
    refused(lambda: check_capture_time(-(2**63), now, 300, 86400), "capture_time")
    refused(lambda: check_capture_time(now + 301 * 10**9, now, 300, 86400), "capture_time")
    refused(lambda: check_capture_time(now - 86401 * 10**9, now, 300, 86400), "capture_time")


def sample(relay: Relay, name: str, **labels: str) -> float:
    value = relay.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_a_relay_refuses_forged_chunks_and_counts_each_once(relay: Relay) -> None:
    now = time.time_ns()
    forgeries = [
        (2**64 - 1, now, "seq_jump"),  # the 36-byte CHUNK
        (5, now, "seq_jump"),  # then 2**63 after seq 5 (sent below)
        (0, 2**63 - 1, "capture_time"),
        (0, -(2**63), "capture_time"),
    ]
    for i, (seq, captured, reason) in enumerate(forgeries):
        session = await raw_session(relay.url, "publisher", f"rogue-{i}")
        session.send(OpenStream(1, f"rogue-{i}", MONO16))
        if i == 1:
            session.writer.write(encode_chunk(1, seq, captured, b"\0\0"))
            seq = 5 + 2**63
        session.writer.write(encode_chunk(1, seq, captured, b"\0\0"))
        answer = await session.farewell(timeout=10)
        session.close()
        assert answer is not None
        assert answer[0] == ErrorCode.MALFORMED_FRAME, answer
        assert sample(relay, "audiosockets_protocol_errors_total", reason=reason) >= 1
    assert sample(relay, "audiosockets_protocol_errors_total", reason="seq_jump") == 2
    assert sample(relay, "audiosockets_protocol_errors_total", reason="capture_time") == 2
    # Nothing forged was stored or counted: one real chunk (rogue-1's seq 5).
    assert sample(relay, "audiosockets_chunks_received_total", stream="rogue-0") == 0
    assert sample(relay, "audiosockets_chunks_received_total", stream="rogue-1") == 1
    assert sample(relay, "audiosockets_sequence_gaps_total", stream="rogue-1") == 0
    latency_sum = sample(relay, "audiosockets_end_to_end_latency_seconds_sum", stream="rogue-1")
    assert latency_sum < 60
    # The stream's real publisher reopens it and is told a next_seq that fits.
    session = await raw_session(relay.url, "publisher", "real")
    session.send(OpenStream(7, "rogue-0", MONO16))
    async with asyncio.timeout(10):
        while True:
            event = session.conn.next_event()
            if isinstance(event, StreamAccepted):
                break
            session.conn.receive_data(await session.reader.read(1 << 16))
    assert event.next_seq == 0
    session.close()


async def test_a_failed_open_stream_fails_that_stream_only(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = relay.open_stream

    def open_stream(publisher: object, name: str, fmt: AudioFormat) -> object:
        if name == "broken":
            raise RuntimeError("injected open_stream bug")
        return real_open(publisher, name, fmt)  # type: ignore[arg-type]

    monkeypatch.setattr(relay, "open_stream", open_stream)
    session = await raw_session(relay.url, "publisher", "two-streams")
    session.send(OpenStream(1, "broken", MONO16))
    session.send(OpenStream(2, "fine", MONO16))
    events: list[object] = []
    async with asyncio.timeout(10):
        while not any(isinstance(e, StreamAccepted) for e in events):
            event = session.conn.next_event()
            if type(event).__name__ == "NeedData":
                session.conn.receive_data(await session.reader.read(1 << 16))
            else:
                events.append(event)
    assert CloseStream(1) in events
    session.writer.write(encode_chunk(2, 0, time.time_ns(), b"\0\0"))
    await wait_until(
        lambda: sample(relay, "audiosockets_chunks_received_total", stream="fine") == 1,
        what="the other stream's chunk",
    )
    assert sample(relay, "audiosockets_protocol_errors_total", reason="open_stream_failed") == 1
    assert sample(relay, "audiosockets_connected_clients", role="publisher") == 1
    session.close()


# --------------------------------------------------------------------------
# Forged ACKs and resume points (item 6)
# --------------------------------------------------------------------------


async def _chunks_until(session: RawSession, last_seq: int, timeout: float = 10.0) -> list[int]:
    """Seqs of the CHUNKs ``session`` reads until one has ``last_seq``."""
    seqs: list[int] = []
    async with asyncio.timeout(timeout):
        while not seqs or seqs[-1] < last_seq:
            event = session.conn.next_event()
            if isinstance(event, NeedData):
                session.conn.receive_data(await session.reader.read(1 << 16))
            elif isinstance(event, ChunkData):
                seqs.append(event.seq)
    return seqs


class Reader:
    """A raw subscriber's view: stream names by id, CHUNK seqs by stream name."""

    def __init__(self, session: RawSession) -> None:
        self.session = session
        self.names: dict[int, str] = {}
        self.seqs: dict[str, list[int]] = {}

    async def until(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        conn = self.session.conn
        async with asyncio.timeout(timeout):
            while not done():
                event = conn.next_event()
                if isinstance(event, NeedData):
                    conn.receive_data(await self.session.reader.read(1 << 16))
                elif isinstance(event, OpenStream):
                    self.names[event.stream_id] = event.name
                elif isinstance(event, ChunkData):
                    self.seqs.setdefault(self.names[event.stream_id], []).append(event.seq)

    def last(self, stream: str) -> int:
        return self.seqs.get(stream, [-1])[-1]


async def test_a_forged_ack_cannot_make_the_next_owner_skip_audio(relay: Relay) -> None:
    publisher = await raw_session(relay.url, "publisher", "rec")
    publisher.send(OpenStream(1, "s1", MONO16))
    publisher.send(OpenStream(2, "s2", MONO16))

    def publish(seqs: range) -> None:
        for seq in seqs:
            for sid in (1, 2):
                publisher.writer.write(encode_chunk(sid, seq, time.time_ns(), b"\0\0"))

    publish(range(10))
    await wait_until(
        lambda: all(s in relay.streams and relay.streams[s].last_seq == 9 for s in ("s1", "s2"))
    )
    rightful = Reader(await raw_session(relay.url, "subscriber", "rightful"))
    rightful.session.send(Subscribe("s*", "g", StartPosition.EARLIEST, ()))
    await rightful.until(lambda: rightful.last("s1") == 9 and rightful.last("s2") == 9)
    # The rogue joins: the rebalance gives it one of the two streams.
    rogue = Reader(await raw_session(relay.url, "subscriber", "rogue"))
    rogue.session.send(Subscribe("s*", "g", StartPosition.EARLIEST, ()))
    await rogue.until(lambda: any(rogue.last(s) == 9 for s in ("s1", "s2")))
    (taken,) = [s for s in ("s1", "s2") if rogue.last(s) == 9]
    rogue.session.send(Ack(relay.streams[taken].id, 2**64 - 1))
    await wait_until(lambda: relay.groups["g"].acked.get(taken) is not None, what="the ACK")
    assert relay.groups["g"].acked[taken] == 9  # clamped to the highest seq sent to it
    assert sample(relay, "audiosockets_positions_clamped_total", reason="ack_beyond_sent") == 1
    rogue.session.close()
    await wait_until(lambda: len(relay.groups["g"].members) == 1, what="the rogue to leave")
    # The stream comes back to the rightful member, which resumes after seq 9.
    before = len(rightful.seqs[taken])
    publish(range(10, 20))
    await rightful.until(lambda: rightful.last(taken) == 19 and rightful.last("s1") == 19)
    assert rightful.seqs[taken][before:] == list(range(10, 20))
    rightful.session.close()
    publisher.close()


async def test_a_resume_point_beyond_the_stream_is_clamped_and_counted(relay: Relay) -> None:
    publisher = await raw_session(relay.url, "publisher", "rec")
    publisher.send(OpenStream(1, "s", MONO16))
    for seq in range(5):
        publisher.writer.write(encode_chunk(1, seq, time.time_ns(), b"\0\0"))
    await wait_until(lambda: "s" in relay.streams and relay.streams["s"].last_seq == 4)
    sub = await raw_session(relay.url, "subscriber", "resumer")
    sub.send(Subscribe("s", "", StartPosition.LIVE, (("s", 2**64 - 1),)))
    reason = "resume_beyond_stream"
    await wait_until(
        lambda: sample(relay, "audiosockets_positions_clamped_total", reason=reason) == 1,
        what="the resume point to be clamped",
    )
    for seq in range(5, 8):
        publisher.writer.write(encode_chunk(1, seq, time.time_ns(), b"\0\0"))
    assert await _chunks_until(sub, 7) == [5, 6, 7]  # not silenced by the forged point
    sub.close()
    publisher.close()


class FakeClock:
    """The relay's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


GRACE_CLOCK = FakeClock()


@pytest.mark.parametrize("relay_clock", [GRACE_CLOCK])
@pytest.mark.parametrize("relay_config", [RelayConfig(port=0, stream_grace_seconds=5.0)])
async def test_an_empty_group_keeps_its_acks_for_the_grace_then_is_forgotten(
    relay: Relay,
) -> None:
    """Members that all restart at once resume after the group's ACK; a group
    nobody comes back to is forgotten after ``stream_grace_seconds``."""
    publisher = await raw_session(relay.url, "publisher", "rec")
    publisher.send(OpenStream(1, "s", MONO16))
    for seq in range(10):
        publisher.writer.write(encode_chunk(1, seq, time.time_ns(), b"\0\0"))
    await wait_until(lambda: "s" in relay.streams and relay.streams["s"].last_seq == 9)
    first = await raw_session(relay.url, "subscriber", "member-a")
    first.send(Subscribe("s", "g", StartPosition.EARLIEST, ()))
    assert await _chunks_until(first, 9) == list(range(10))
    first.send(Ack(relay.streams["s"].id, 4))
    await wait_until(lambda: relay.groups["g"].acked.get("s") == 4, what="the ACK")
    first.close()
    await wait_until(lambda: not relay.groups["g"].members, what="the member to leave")
    GRACE_CLOCK.now += 4.0  # within the grace: the group and its point stay
    relay.housekeeping.forget_empty_groups(GRACE_CLOCK.now)
    assert relay.groups["g"].acked == {"s": 4}
    second = await raw_session(relay.url, "subscriber", "member-b")
    second.send(Subscribe("s", "g", StartPosition.EARLIEST, ()))
    assert await _chunks_until(second, 9) == list(range(5, 10))  # after the ACK
    second.close()
    await wait_until(lambda: not relay.groups["g"].members, what="the member to leave")
    GRACE_CLOCK.now += 4.9
    relay.housekeeping.forget_empty_groups(GRACE_CLOCK.now)
    assert "g" in relay.groups
    GRACE_CLOCK.now += 0.2
    relay.housekeeping.forget_empty_groups(GRACE_CLOCK.now)
    assert "g" not in relay.groups
    publisher.close()
