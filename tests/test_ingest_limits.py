"""Per-frame limits of the codec (issue 11, items 1 and 2), byte by byte and
without sockets: what each frame type may weigh, empty chunks."""

from __future__ import annotations

import pytest

from audiosockets.audio import AudioFormat, SampleType
from audiosockets.errors import ErrorCode, LocalProtocolError
from audiosockets.protocol import (
    CHUNK_HEAD,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    NEED_DATA,
    PROTOCOL_VERSION,
    ChunkData,
    Connection,
    FrameType,
    Hello,
    Limits,
    OpenStream,
    Role,
    StartPosition,
    Subscribe,
    encode,
    encode_chunk,
)
from audiosockets.protocol.frames import max_chunk_payload, payload_limits
from test_protocol import handshake, remote_error

MONO16 = AudioFormat(16000, 1, SampleType.INT16)


def test_an_empty_chunk_is_refused_both_ways() -> None:
    client, relay = handshake(Role.PUBLISHER)
    relay.receive_data(client.send(OpenStream(1, "m", MONO16)))
    relay.next_event()
    with pytest.raises(LocalProtocolError):
        client.chunk_frame(1, 0, 0, b"")
    err = remote_error(relay, encode_chunk(1, 0, 0, b""))
    assert err.code is ErrorCode.BAD_FORMAT
    assert err.reason == "empty_chunk"
    # One frame is enough.
    client2, relay2 = handshake(Role.PUBLISHER)
    relay2.receive_data(client2.send(OpenStream(1, "m", MONO16)))
    relay2.next_event()
    relay2.receive_data(client2.send(ChunkData(1, 0, 0, b"\x00\x00")))
    assert relay2.next_event() == ChunkData(1, 0, 0, b"\x00\x00")


# --------------------------------------------------------------------------
# Every frame judged from its header (item 1)
# --------------------------------------------------------------------------


def test_before_the_handshake_only_a_small_hello_is_awaited() -> None:
    hello_max = payload_limits(Limits())[FrameType.HELLO]
    assert hello_max < 1024  # "a few hundred bytes"
    # The largest real HELLO fits.
    big = Hello(Role.PUBLISHER, "n" * 200, "t" * 200)
    relay = Connection("relay")
    relay.receive_data(encode(big))
    assert relay.next_event() == big
    # One byte more than any HELLO can need is refused with only the header in.
    relay = Connection("relay")
    err = remote_error(relay, HEADER.pack(MAGIC, PROTOCOL_VERSION, FrameType.HELLO, hello_max + 1))
    assert err.code is ErrorCode.FRAME_TOO_LARGE
    assert err.reason == "control_frame_too_large"
    assert relay.buffered == HEADER_SIZE
    # Any other frame type before HELLO: refused from the header, at any length.
    for ftype in (FrameType.CHUNK, FrameType.SUBSCRIBE, FrameType.STATUS):
        relay = Connection("relay")
        err = remote_error(relay, HEADER.pack(MAGIC, PROTOCOL_VERSION, ftype, 1 << 20))
        assert err.code is ErrorCode.UNEXPECTED_FRAME
        assert relay.buffered == HEADER_SIZE


@pytest.mark.parametrize(
    ("role", "ftype"),
    [
        (Role.PUBLISHER, FrameType.OPEN_STREAM),
        (Role.PUBLISHER, FrameType.CLOSE_STREAM),
        (Role.PUBLISHER, FrameType.PING),
        (Role.SUBSCRIBER, FrameType.ACK),
        (Role.SUBSCRIBER, FrameType.STATUS_REQUEST),
        (Role.OBSERVER, FrameType.PONG),
    ],
)
def test_control_frames_weigh_a_few_hundred_bytes_at_most(role: Role, ftype: FrameType) -> None:
    limit = payload_limits(Limits())[ftype]
    assert limit <= 512
    _, relay = handshake(role)
    err = remote_error(relay, HEADER.pack(MAGIC, PROTOCOL_VERSION, ftype, limit + 1))
    assert err.code is ErrorCode.FRAME_TOO_LARGE
    assert relay.buffered == HEADER_SIZE


def test_the_largest_legitimate_subscribe_and_open_stream_fit() -> None:
    limits = Limits()
    name = "s" * limits.max_name_length
    sub = Subscribe(
        "p" * 200, "g" * 200, StartPosition.LIVE, tuple((f"{i:0200d}", i) for i in range(4096))
    )
    client, relay = handshake(Role.SUBSCRIBER)
    relay.receive_data(client.send(sub))
    assert relay.next_event() == sub
    client, relay = handshake(Role.PUBLISHER)
    opened = OpenStream(2**32 - 1, name, MONO16)
    relay.receive_data(client.send(opened))
    assert relay.next_event() == opened


def test_a_chunk_may_weigh_what_its_streams_format_allows() -> None:
    limits = Limits()
    allowed = max_chunk_payload(MONO16, limits)
    assert allowed == CHUNK_HEAD.size + 2 * 16000 * 2  # 2 s of 16 kHz mono int16
    client, relay = handshake(Role.PUBLISHER)
    relay.receive_data(client.send(OpenStream(1, "m", MONO16)))
    relay.next_event()
    # The whole allowed chunk passes.
    longest = ChunkData(1, 0, 0, b"\x00" * (allowed - CHUNK_HEAD.size))
    relay.receive_data(client.send(longest))
    assert relay.next_event() == longest
    # One frame more is refused once the header and the stream id are in.
    head = HEADER.pack(MAGIC, PROTOCOL_VERSION, FrameType.CHUNK, allowed + 2)
    relay.receive_data(head + b"\x00\x00\x00")
    assert relay.next_event() is NEED_DATA  # the stream id is not complete yet
    err = remote_error(relay, b"\x01")
    assert err.code is ErrorCode.FRAME_TOO_LARGE
    assert err.reason == "chunk_too_long"
    assert relay.buffered == HEADER_SIZE + 4
    # An undeclared stream is refused from its id, before any audio is awaited.
    _, relay = handshake(Role.PUBLISHER)
    err = remote_error(
        relay, HEADER.pack(MAGIC, PROTOCOL_VERSION, FrameType.CHUNK, 1000) + b"\0\0\0\7"
    )
    assert err.code is ErrorCode.UNKNOWN_STREAM


def test_a_big_format_is_still_bound_by_the_frame_limit() -> None:
    huge = AudioFormat(192000, 8, SampleType.FLOAT32)
    assert max_chunk_payload(huge, Limits()) == 1 << 20
    low = AudioFormat(1, 1, SampleType.INT16)
    assert max_chunk_payload(low, Limits()) == CHUNK_HEAD.size + 4096  # the 4 KiB floor
