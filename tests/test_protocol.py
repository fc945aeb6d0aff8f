"""Wire protocol v1, byte for byte: codec round trips, a whole session between
two ``Connection`` objects (no sockets), every way of slicing the input, and
the state machine's rules. Property tests live in ``test_protocol_fuzz.py``.
"""

from __future__ import annotations

import ast
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

import audiosockets
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from audiosockets.protocol import (
    END_OF_STREAM,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    NEED_DATA,
    PROTOCOL_VERSION,
    Ack,
    ChunkData,
    CloseReason,
    CloseStream,
    Connection,
    ErrorFrame,
    Event,
    FrameDecoder,
    FrameType,
    Goodbye,
    Hello,
    Limits,
    OpenStream,
    Ping,
    Pong,
    Role,
    StartPosition,
    State,
    Status,
    StatusRequest,
    StreamAccepted,
    Subscribe,
    Welcome,
    decode_payload,
    encode,
)
from audiosockets.protocol.frames import payload_limits

MONO16 = AudioFormat(16000, 1, SampleType.INT16)
STEREO16 = AudioFormat(48000, 2, SampleType.INT16)  # 4-byte frames
WELCOME = Welcome("test-relay", 2000, 1 << 20, 30_000)
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1

#: At least one example of every frame type, with edge values.
EXAMPLES: list[Event] = [
    Hello(Role.PUBLISHER, "rec-1"),
    Hello(Role.SUBSCRIBER, "proc-ü", token="s3cret"),
    Hello(Role.OBSERVER, ""),
    Hello(Role.PUBLISHER, "rec-2", instance=1),
    Hello(Role.PUBLISHER, "rec-3", token="t", instance=U64_MAX),
    WELCOME,
    Welcome("", U32_MAX, U32_MAX, 0),
    OpenStream(7, "mic-1", MONO16),
    OpenStream(U32_MAX, "日本語-🎤", AudioFormat(768_000, 64, SampleType.FLOAT32)),
    StreamAccepted(7, 0),
    StreamAccepted(0, U64_MAX),
    ChunkData(7, 0, 0, b""),
    ChunkData(7, U64_MAX, -(2**63), b"\x01\x02" * 160),
    ChunkData(U32_MAX, 5, 2**63 - 1, b"\x00"),
    Subscribe("mic-*"),
    Subscribe("*", group="g", start=StartPosition.EARLIEST, resume=(("mic-1", 41), ("é", U64_MAX))),
    Ack(7, 41),
    CloseStream(7),
    CloseStream(0, CloseReason.PUBLISHER_LOST),
    Ping(0),
    Ping(U64_MAX),
    Pong(1),
    StatusRequest(),
    Status('{"streams": [], "name": "ü"}'),
    Status(""),
    Goodbye(),
    Goodbye(ErrorCode.SHUTTING_DOWN, "relay shutting down"),
    ErrorFrame(ErrorCode.BAD_FORMAT, "chunk payload is not a whole number of frames"),
]


def decode_all(data: bytes, limits: Limits | None = None) -> list[Event]:
    """Decode complete frames with the codec alone (no state machine)."""
    decoder = FrameDecoder(limits)
    decoder.receive_data(data)
    events = []
    while (frame := decoder.next_frame()) is not None:
        events.append(decode_payload(*frame, decoder.limits))
    assert decoder.buffered == 0
    return events


def drain(conn: Connection) -> list[object]:
    events: list[object] = []
    while (event := conn.next_event()) is not NEED_DATA and event is not END_OF_STREAM:
        events.append(event)
    return events


def handshake(role: Role, limits: Limits | None = None) -> tuple[Connection, Connection]:
    """A client and a relay connection, through HELLO/WELCOME, both OPEN."""
    client = Connection("client", limits)
    relay = Connection("relay", limits)
    relay.receive_data(client.send(Hello(role, "client-1")))
    assert drain(relay) == [Hello(role, "client-1")]
    assert relay.role is role
    assert relay.peer_name == "client-1"
    client.receive_data(relay.send(WELCOME))
    assert drain(client) == [WELCOME]
    assert client.welcome == WELCOME
    assert client.state is State.OPEN
    assert relay.state is State.OPEN
    return client, relay


def transfer(sender: Connection, receiver: Connection, *events: Event) -> list[object]:
    receiver.receive_data(b"".join(sender.send(e) for e in events))
    return drain(receiver)


def raw_frame(
    ftype: int, payload: bytes, *, version: int = PROTOCOL_VERSION, magic: bytes = MAGIC
) -> bytes:
    return HEADER.pack(magic, version, ftype, len(payload)) + payload


def u16_str(raw: bytes) -> bytes:
    return struct.pack(">H", len(raw)) + raw


def remote_error(conn: Connection, data: bytes) -> RemoteProtocolError:
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        drain(conn)
    return info.value


# --------------------------------------------------------------------------
# Codec
# --------------------------------------------------------------------------


def test_examples_cover_every_frame_type() -> None:
    assert {encode(e)[3] for e in EXAMPLES} == set(FrameType)


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: type(e).__name__)
def test_every_event_round_trips_through_the_codec(event: Event) -> None:
    frame = encode(event)
    magic, version, _ftype, length = HEADER.unpack_from(frame)
    assert (magic, version) == (b"AS", 1)
    assert length == len(frame) - HEADER_SIZE
    assert decode_all(frame) == [event]


def test_header_layout_is_as_documented() -> None:
    # PROTOCOL.md: magic "AS", version u8, type u8, payload length u32 big-endian.
    assert encode(Ping(0x0102030405060708)) == (
        b"AS\x01\x09\x00\x00\x00\x08" + bytes([1, 2, 3, 4, 5, 6, 7, 8])
    )
    assert encode(Hello(Role.PUBLISHER, "rec")) == (
        b"AS\x01\x01\x00\x00\x00\x09" + b"\x01\x00" + b"\x00\x03rec" + b"\x00\x00"
    )
    assert encode(ChunkData(2, 3, -1, b"\xaa\xbb")) == (
        b"AS\x01\x05\x00\x00\x00\x16"
        + b"\x00\x00\x00\x02"
        + b"\x00" * 7
        + b"\x03"
        + b"\xff" * 8
        + b"\xaa\xbb"
    )
    assert encode(OpenStream(1, "m", STEREO16)) == (
        b"AS\x01\x03\x00\x00\x00\x0e"
        + b"\x00\x00\x00\x01"
        + (48000).to_bytes(4, "big")
        + b"\x00\x02"
        + b"\x01"
        + b"\x00\x01m"
    )


def test_hello_carries_the_publisher_instance_after_the_token_when_flag_bit_0_is_set() -> None:
    assert encode(Hello(Role.PUBLISHER, "rec", instance=0x0102030405060708)) == (
        b"AS\x01\x01\x00\x00\x00\x11"
        + b"\x01\x01"  # role publisher, flags: instance follows
        + b"\x00\x03rec"
        + b"\x00\x00"
        + b"\x01\x02\x03\x04\x05\x06\x07\x08"
    )
    # Reserved flag bits are ignored; bit 0 without the 8 bytes is a truncated frame.
    body = b"\x01\xfe" + u16_str(b"rec") + u16_str(b"")
    assert decode_all(raw_frame(FrameType.HELLO, body)) == [Hello(Role.PUBLISHER, "rec")]
    truncated = raw_frame(FrameType.HELLO, b"\x01\x01" + u16_str(b"rec") + u16_str(b"") + b"\x00")
    assert remote_error(Connection("relay"), truncated).code is ErrorCode.MALFORMED_FRAME
    with pytest.raises(LocalProtocolError, match="instance"):
        Hello(Role.PUBLISHER, "rec", instance=2**64)


def test_hello_with_the_instance_flag_and_instance_0_is_a_malformed_frame() -> None:
    body = b"\x01\x01" + u16_str(b"rec") + u16_str(b"") + b"\x00" * 8
    error = remote_error(Connection("relay"), raw_frame(FrameType.HELLO, body))
    assert error.code is ErrorCode.MALFORMED_FRAME
    assert "instance is 0" in str(error)


def test_unknown_error_code_from_a_newer_peer_reads_as_internal() -> None:
    frame = raw_frame(FrameType.GOODBYE, struct.pack(">H", 999) + u16_str(b"why"))
    assert decode_all(frame) == [Goodbye(ErrorCode.INTERNAL, "why")]


def test_events_reject_values_that_do_not_fit_the_wire() -> None:
    bad: list[Callable[[], object]] = [
        lambda: Ping(-1),
        lambda: Pong(2**64),
        lambda: StreamAccepted(2**32, 0),
        lambda: ChunkData(1, 0, 2**63, b""),
        lambda: OpenStream(1, "", MONO16),
        lambda: Subscribe(""),
        lambda: Subscribe("*", resume=(("", 1),)),
        lambda: Welcome("r", 0, 1 << 20, 0),
        lambda: Ack(1, -1),
    ]
    for make in bad:
        with pytest.raises(LocalProtocolError):
            make()


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        Limits(max_frame_size=10)
    with pytest.raises(ValueError, match="max_name_length"):
        Limits(max_name_length=0)


# --------------------------------------------------------------------------
# A whole session between two Connections
# --------------------------------------------------------------------------


def test_publisher_session() -> None:
    client, relay = handshake(Role.PUBLISHER)
    payload = b"\x00\x01" * 320
    got = transfer(
        client,
        relay,
        OpenStream(1, "mic-1", MONO16),
        ChunkData(1, 0, 1_000, payload),
        ChunkData(1, 1, 2_000, payload),
        Ping(9),
    )
    assert got == [
        OpenStream(1, "mic-1", MONO16),
        ChunkData(1, 0, 1_000, payload),
        ChunkData(1, 1, 2_000, payload),
        Ping(9),
    ]
    assert transfer(
        relay, client, StreamAccepted(1, 2), Pong(9), CloseStream(1, CloseReason.REPLACED)
    ) == [
        StreamAccepted(1, 2),
        Pong(9),
        CloseStream(1, CloseReason.REPLACED),
    ]
    # The fast path writes the same bytes as the event path.
    fast = client.chunk_frame(1, 2, 3_000, memoryview(payload))
    assert fast == encode(ChunkData(1, 2, 3_000, payload))
    relay.receive_data(fast)
    assert drain(relay) == [ChunkData(1, 2, 3_000, payload)]
    assert transfer(client, relay, CloseStream(1), Goodbye(ErrorCode.NORMAL, "bye")) == [
        CloseStream(1),
        Goodbye(ErrorCode.NORMAL, "bye"),
    ]
    assert client.state is State.CLOSED
    assert relay.state is State.CLOSED


def test_subscriber_session() -> None:
    client, relay = handshake(Role.SUBSCRIBER)
    sub = Subscribe("mic-*", group="level", start=StartPosition.EARLIEST, resume=(("mic-1", 41),))
    assert transfer(client, relay, sub, StatusRequest()) == [sub, StatusRequest()]
    assert sub.matches("mic-7")
    assert not sub.matches("line-1")
    frames: list[Event] = [
        OpenStream(3, "mic-1", STEREO16),
        ChunkData(3, 42, 5, b"\x00" * 16),
        Status("{}"),
        CloseStream(3, CloseReason.UNASSIGNED),
    ]
    assert transfer(relay, client, *frames) == frames
    assert transfer(client, relay, Ack(3, 42)) == [Ack(3, 42)]
    assert transfer(relay, client, Goodbye(ErrorCode.SHUTTING_DOWN, "relay shutting down")) == [
        Goodbye(ErrorCode.SHUTTING_DOWN, "relay shutting down")
    ]
    assert client.state is State.CLOSED


def test_observer_session() -> None:
    client, relay = handshake(Role.OBSERVER)
    assert transfer(client, relay, StatusRequest()) == [StatusRequest()]
    assert transfer(relay, client, Status('{"server": "r"}')) == [Status('{"server": "r"}')]
    with pytest.raises(LocalProtocolError):
        client.send(Subscribe("*"))


def test_refusal_during_the_handshake_closes_the_session() -> None:
    client = Connection("client")
    relay = Connection("relay")
    relay.receive_data(client.send(Hello(Role.PUBLISHER, "rec", token="wrong")))
    assert drain(relay) == [Hello(Role.PUBLISHER, "rec", token="wrong")]
    assert relay.token == "wrong"
    refusal = ErrorFrame(ErrorCode.UNAUTHORIZED, "missing or wrong token")
    assert transfer(relay, client, refusal) == [refusal]
    assert client.state is State.CLOSED
    assert relay.state is State.CLOSED


def test_a_closed_connection_ignores_input_and_refuses_to_send() -> None:
    client, relay = handshake(Role.PUBLISHER)
    relay.receive_data(client.send(Goodbye()) + encode(Ping(1)))
    assert drain(relay) == [Goodbye()]
    assert relay.next_event() is NEED_DATA
    for conn in (client, relay):
        with pytest.raises(LocalProtocolError, match="closed"):
            conn.send(Ping(2))


# --------------------------------------------------------------------------
# Slicing the input: whole, byte by byte, every split, trailing data
# --------------------------------------------------------------------------

PCM = bytes(range(256)) * 2
PUBLISHER_EVENTS: list[Event] = [
    Hello(Role.PUBLISHER, "rec-1"),
    OpenStream(1, "mic-1", MONO16),
    ChunkData(1, 0, 10, PCM),
    Ping(5),
    ChunkData(1, 1, 20, PCM[:2]),
    CloseStream(1),
    Goodbye(ErrorCode.NORMAL, "bye"),
]
PUBLISHER_BYTES = b"".join(encode(e) for e in PUBLISHER_EVENTS)
NEXT_FRAME = encode(ChunkData(1, 2, 30, PCM))


def relay_events(pieces: Iterable[bytes]) -> tuple[list[object], Connection]:
    """Feed a relay connection piece by piece, answering HELLO as the relay does."""
    relay = Connection("relay")
    events: list[object] = []
    for piece in pieces:
        relay.receive_data(piece)
        # One event at a time: the relay answers HELLO before it reads on.
        while (event := relay.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, Hello):
                relay.send(WELCOME)
    return events, relay


def test_input_whole_byte_by_byte_and_split_anywhere_gives_the_same_events() -> None:
    whole, _ = relay_events([PUBLISHER_BYTES])
    assert whole == PUBLISHER_EVENTS
    data = PUBLISHER_BYTES
    assert relay_events(data[i : i + 1] for i in range(len(data)))[0] == whole
    for cut in range(1, len(data)):
        assert relay_events([data[:cut], data[cut:]])[0] == whole, f"split at {cut}"


@pytest.mark.parametrize(
    "cut", [1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 5, len(NEXT_FRAME) - 1]
)
def test_trailing_partial_frame_is_held_until_complete(cut: int) -> None:
    # Everything but the GOODBYE, so the session stays open.
    data = PUBLISHER_BYTES[: -len(encode(Goodbye(ErrorCode.NORMAL, "bye")))]
    expected, _ = relay_events([data])
    events, relay = relay_events([data + NEXT_FRAME[:cut]])
    assert events == expected
    assert relay.buffered == cut
    relay.receive_data(NEXT_FRAME[cut:])
    assert drain(relay) == [ChunkData(1, 2, 30, PCM)]
    assert relay.buffered == 0


# --------------------------------------------------------------------------
# State machine rules
# --------------------------------------------------------------------------


def test_client_must_send_hello_first() -> None:
    # A refused send puts the connection in ERROR: each case gets a fresh one.
    for event in (Subscribe("*"), Ping(1), OpenStream(1, "m", MONO16)):
        with pytest.raises(LocalProtocolError):
            Connection("client").send(event)

    def hello_sent() -> Connection:
        client = Connection("client")
        client.send(Hello(Role.SUBSCRIBER, "s"))
        client.send(Ping(1))  # heartbeats may flow while waiting for WELCOME
        return client

    with pytest.raises(LocalProtocolError):
        hello_sent().send(Subscribe("*"))  # not before WELCOME
    with pytest.raises(LocalProtocolError):
        hello_sent().send(Hello(Role.SUBSCRIBER, "s"))  # HELLO only once


def test_relay_cannot_welcome_before_hello() -> None:
    with pytest.raises(LocalProtocolError):
        Connection("relay").send(WELCOME)


def test_relay_receiving_chunk_before_hello() -> None:
    err = remote_error(Connection("relay"), encode(ChunkData(1, 0, 0, b"")))
    assert err.code is ErrorCode.UNEXPECTED_FRAME


def test_client_receiving_anything_but_welcome_during_handshake() -> None:
    client = Connection("client")
    client.send(Hello(Role.SUBSCRIBER, "s"))
    err = remote_error(client, encode(OpenStream(1, "m", MONO16)))
    assert err.code is ErrorCode.UNEXPECTED_FRAME


def test_welcome_before_hello_was_sent_is_the_peers_error() -> None:
    # Regression: this used to open a session with no role and then fail an
    # assert (AssertionError) on the next frame.
    client = Connection("client")
    err = remote_error(client, encode(WELCOME) + encode(Ping(1)))
    assert err.code is ErrorCode.UNEXPECTED_FRAME
    assert client.state is State.ERROR
    assert client.welcome is None


@pytest.mark.parametrize(
    ("role", "event"),
    [
        (Role.SUBSCRIBER, ChunkData(1, 0, 0, b"")),
        (Role.SUBSCRIBER, OpenStream(1, "m", MONO16)),
        (Role.PUBLISHER, Subscribe("*")),
        (Role.PUBLISHER, Ack(1, 1)),
        (Role.OBSERVER, Subscribe("*")),
        (Role.OBSERVER, ChunkData(1, 0, 0, b"")),
        (Role.SUBSCRIBER, Hello(Role.SUBSCRIBER, "again")),
        (Role.PUBLISHER, Welcome("x", 1, 64, 0)),
    ],
    ids=lambda v: v.label if isinstance(v, Role) else type(v).__name__,
)
def test_client_frames_not_allowed_for_its_role(role: Role, event: Event) -> None:
    client, relay = handshake(role)
    with pytest.raises(LocalProtocolError):
        client.send(event)
    assert remote_error(relay, encode(event)).code is ErrorCode.UNEXPECTED_FRAME


@pytest.mark.parametrize(
    ("role", "event"),
    [
        (Role.PUBLISHER, ChunkData(1, 0, 0, b"")),
        (Role.PUBLISHER, Status("{}")),
        (Role.SUBSCRIBER, StreamAccepted(1, 0)),
        (Role.OBSERVER, OpenStream(1, "m", MONO16)),
        (Role.SUBSCRIBER, WELCOME),
    ],
    ids=lambda v: v.label if isinstance(v, Role) else type(v).__name__,
)
def test_relay_frames_not_allowed_for_the_clients_role(role: Role, event: Event) -> None:
    client, relay = handshake(role)
    with pytest.raises(LocalProtocolError):
        relay.send(event)
    assert remote_error(client, encode(event)).code is ErrorCode.UNEXPECTED_FRAME


def test_chunk_for_undeclared_stream() -> None:
    client, relay = handshake(Role.PUBLISHER)
    with pytest.raises(LocalProtocolError):
        client.send(ChunkData(9, 0, 0, b""))
    with pytest.raises(LocalProtocolError):
        client.chunk_frame(9, 0, 0, b"")
    assert remote_error(relay, encode(ChunkData(9, 0, 0, b""))).code is ErrorCode.UNKNOWN_STREAM


def test_chunk_payload_must_be_whole_frames() -> None:
    client, relay = handshake(Role.PUBLISHER)
    transfer(client, relay, OpenStream(1, "stereo", STEREO16))
    with pytest.raises(LocalProtocolError):
        client.send(ChunkData(1, 0, 0, b"\x00" * 6))
    with pytest.raises(LocalProtocolError):
        client.chunk_frame(1, 0, 0, b"\x00" * 6)
    err = remote_error(relay, encode(ChunkData(1, 0, 0, b"\x00" * 6)))
    assert err.code is ErrorCode.BAD_FORMAT


def test_subscriber_rejects_bad_chunks_from_the_relay_too() -> None:
    client, _ = handshake(Role.SUBSCRIBER)
    assert remote_error(client, encode(ChunkData(4, 0, 0, b""))).code is ErrorCode.UNKNOWN_STREAM


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (struct.pack(">IIHB", 1, 0, 1, 1) + u16_str(b"m"), ErrorCode.BAD_FORMAT),  # rate 0
        (struct.pack(">IIHB", 1, 16000, 65, 1) + u16_str(b"m"), ErrorCode.BAD_FORMAT),  # channels
        (struct.pack(">IIHB", 1, 16000, 1, 9) + u16_str(b"m"), ErrorCode.BAD_FORMAT),  # sample type
        (struct.pack(">IIHB", 1, 16000, 1, 1) + u16_str(b""), ErrorCode.MALFORMED_FRAME),  # empty
    ],
)
def test_bad_open_stream(payload: bytes, code: ErrorCode) -> None:
    _, relay = handshake(Role.PUBLISHER)
    assert remote_error(relay, raw_frame(FrameType.OPEN_STREAM, payload)).code is code


def test_oversized_length_is_refused_from_the_header_alone() -> None:
    relay = Connection("relay")
    header = HEADER.pack(MAGIC, PROTOCOL_VERSION, FrameType.HELLO, (1 << 20) + 1)
    err = remote_error(relay, header)  # no payload byte has arrived
    assert err.code is ErrorCode.FRAME_TOO_LARGE
    assert relay.buffered == HEADER_SIZE  # and none was waited for
    # A HELLO is awaited up to what its layout can need (issue 11: a few
    # hundred bytes before the handshake, not the frame limit).
    at_limit = Connection("relay")
    hello_max = payload_limits(Limits())[FrameType.HELLO]
    at_limit.receive_data(HEADER.pack(MAGIC, PROTOCOL_VERSION, FrameType.HELLO, hello_max))
    assert at_limit.next_event() is NEED_DATA


def test_custom_frame_size_limit_is_honoured() -> None:
    limits = Limits(max_frame_size=100)
    client, relay = handshake(Role.PUBLISHER, limits)
    transfer(client, relay, OpenStream(1, "m", MONO16))
    fits = ChunkData(1, 0, 0, b"\x00" * 80)  # 20-byte chunk head + 80 = 100
    assert transfer(client, relay, fits) == [fits]
    err = remote_error(relay, encode(ChunkData(1, 1, 0, b"\x00" * 82)))
    assert err.code is ErrorCode.FRAME_TOO_LARGE
    decoder = FrameDecoder(limits)
    decoder.receive_data(encode(Status("x" * 101))[:HEADER_SIZE])
    with pytest.raises(RemoteProtocolError):
        decoder.next_frame()


def test_wrong_version() -> None:
    frame = raw_frame(FrameType.HELLO, b"", version=PROTOCOL_VERSION + 1)
    err = remote_error(Connection("relay"), frame)
    assert err.code is ErrorCode.UNSUPPORTED_VERSION
    assert "version 2" in str(err)


def test_bad_magic() -> None:
    err = remote_error(Connection("relay"), b"GET / HTTP/1.1\r\n\r\n")
    assert err.code is ErrorCode.MALFORMED_FRAME
    assert "magic" in str(err)


def test_unknown_frame_type() -> None:
    err = remote_error(Connection("relay"), raw_frame(0x7F, b""))
    assert err.code is ErrorCode.MALFORMED_FRAME


def test_name_too_long() -> None:
    name_ok = "é" * 100  # exactly 200 UTF-8 bytes
    name_long = name_ok + "a"
    client, relay = handshake(Role.PUBLISHER)
    assert transfer(client, relay, OpenStream(1, name_ok, MONO16)) == [
        OpenStream(1, name_ok, MONO16)
    ]
    err = remote_error(relay, encode(OpenStream(2, name_long, MONO16)))
    assert err.code is ErrorCode.NAME_TOO_LONG
    err = remote_error(Connection("relay"), encode(Hello(Role.SUBSCRIBER, name_long)))
    assert err.code is ErrorCode.NAME_TOO_LONG
    _, relay = handshake(Role.SUBSCRIBER)
    err = remote_error(relay, encode(Subscribe("*", resume=((name_long, 1),))))
    assert err.code is ErrorCode.NAME_TOO_LONG


def test_custom_name_limit_is_honoured() -> None:
    limits = Limits(max_name_length=10)  # "test-relay" in WELCOME is 10 bytes
    client, relay = handshake(Role.SUBSCRIBER, limits)
    assert transfer(client, relay, Subscribe("1234567890")) == [Subscribe("1234567890")]
    _, relay = handshake(Role.SUBSCRIBER, limits)
    err = remote_error(relay, encode(Subscribe("*", group="12345678901")))
    assert err.code is ErrorCode.NAME_TOO_LONG


def test_invalid_utf8() -> None:
    hello = raw_frame(FrameType.HELLO, b"\x01\x00" + u16_str(b"\xff\xfe") + u16_str(b""))
    err = remote_error(Connection("relay"), hello)
    assert err.code is ErrorCode.MALFORMED_FRAME
    assert "UTF-8" in str(err)
    client, _ = handshake(Role.OBSERVER)
    assert "UTF-8" in str(remote_error(client, raw_frame(FrameType.STATUS, b"{\xc3")))


@pytest.mark.parametrize(
    "frame",
    [
        raw_frame(FrameType.PING, b"\x00" * 7),  # u64 nonce cut short
        raw_frame(FrameType.HELLO, b"\x01\x00" + b"\x00\x05abc"),  # string longer than the payload
        raw_frame(FrameType.HELLO, b"\x01"),
        raw_frame(FrameType.CHUNK, b"\x00" * 19),  # chunk head is 20 bytes
    ],
)
def test_truncated_payload(frame: bytes) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(frame)
    ftype_payload = decoder.next_frame()
    assert ftype_payload is not None
    with pytest.raises(RemoteProtocolError, match="truncated") as info:
        decode_payload(*ftype_payload, decoder.limits)
    assert info.value.code is ErrorCode.MALFORMED_FRAME


@pytest.mark.parametrize(
    "event",
    [Ping(1), StatusRequest(), Hello(Role.OBSERVER, "o"), OpenStream(1, "m", MONO16)],
    ids=lambda e: type(e).__name__,
)
def test_extra_bytes_in_payload(event: Event) -> None:
    frame = encode(event)
    payload = frame[HEADER_SIZE:] + b"\x00"
    with pytest.raises(RemoteProtocolError, match="1 extra bytes"):
        decode_payload(FrameType(frame[3]), payload, Limits())


def test_bad_enum_values_in_payloads() -> None:
    limits = Limits()
    cases = [
        (FrameType.HELLO, b"\x09\x00" + u16_str(b"x") + u16_str(b"")),  # role
        (FrameType.SUBSCRIBE, b"\x07" + u16_str(b"*") + u16_str(b"") + b"\x00\x00"),  # start
        (FrameType.CLOSE_STREAM, b"\x00\x00\x00\x01\x09"),  # reason
        (FrameType.WELCOME, b"\x00" * 12 + u16_str(b"r")),  # heartbeat interval 0
    ]
    for ftype, payload in cases:
        with pytest.raises(RemoteProtocolError):
            decode_payload(ftype, payload, limits)


def test_resume_entry_limit() -> None:
    limits = Limits(max_resume_entries=2)
    client, relay = handshake(Role.SUBSCRIBER, limits)
    two = Subscribe("*", resume=(("a", 1), ("b", 2)))
    assert transfer(client, relay, two) == [two]
    _, relay = handshake(Role.SUBSCRIBER, limits)
    relay.receive_data(encode(Subscribe("*", resume=(("a", 1), ("b", 2), ("c", 3)))))
    with pytest.raises(RemoteProtocolError, match="resume entries"):
        drain(relay)


def test_stream_count_limit() -> None:
    client, relay = handshake(Role.PUBLISHER, Limits(max_streams=2))
    transfer(client, relay, OpenStream(1, "a", MONO16), OpenStream(2, "b", MONO16))
    # Re-declaring a known id is not a new stream.
    assert transfer(client, relay, OpenStream(2, "b", STEREO16)) == [OpenStream(2, "b", STEREO16)]
    with pytest.raises(LocalProtocolError):
        client.send(OpenStream(3, "c", MONO16))
    relay.receive_data(encode(OpenStream(3, "c", MONO16)))
    with pytest.raises(RemoteProtocolError, match="more than 2 streams"):
        drain(relay)


def test_redeclared_stream_checks_chunks_against_the_new_format() -> None:
    client, relay = handshake(Role.SUBSCRIBER)
    transfer(relay, client, OpenStream(1, "m", MONO16))
    transfer(relay, client, OpenStream(1, "m", STEREO16))
    err = remote_error(client, encode(ChunkData(1, 0, 0, b"\x00\x00")))
    assert err.code is ErrorCode.BAD_FORMAT


def test_protocol_page_matches_the_code() -> None:
    # services/PROTOCOL.md is the spec humans read; keep it in step.
    page = (Path(__file__).resolve().parents[1] / "services" / "PROTOCOL.md").read_text()
    for ftype in FrameType:
        assert f"| 0x{ftype:02X} | {ftype.name} |" in page, ftype
    for code in ErrorCode:
        assert f"| {code.value} | {code.name} |" in page, code
    limits = Limits()
    assert f"| `max_frame_size` | 1 MiB ({limits.max_frame_size}) of payload" in page
    assert f"| `max_name_length` | {limits.max_name_length} UTF-8 bytes" in page
    assert f"| `max_streams` | {limits.max_streams} " in page
    assert f"| `max_resume_entries` | {limits.max_resume_entries} " in page
    assert f"| `handshake_timeout` | {limits.handshake_timeout:g} s " in page
    assert "| 3 | 1 | type |" in page
    assert "| 4 | 4 | length |" in page


# --------------------------------------------------------------------------
# End of stream is an input; a protocol error leaves the connection in ERROR
# --------------------------------------------------------------------------


def publisher_frames() -> tuple[list[Event], bytes]:
    """A publisher's session after the handshake, as events and as bytes."""
    events: list[Event] = [
        OpenStream(1, "mic", MONO16),
        ChunkData(1, 0, 1_000, b"\x01\x00" * 4),
        ChunkData(1, 1, 2_000, b"\x02\x00" * 4),
        CloseStream(1),
    ]
    return events, b"".join(encode(e) for e in events)


def test_eof_between_frames_ends_the_stream_cleanly() -> None:
    events, data = publisher_frames()
    for split in (len(data), 1):  # whole, then byte by byte
        _, relay = handshake(Role.PUBLISHER)
        got: list[object] = []
        for i in range(0, len(data), split):
            relay.receive_data(data[i : i + split])
            got += drain(relay)
        assert relay.next_event() is NEED_DATA
        relay.receive_eof()
        assert relay.eof_received
        assert relay.next_event() is END_OF_STREAM
        assert relay.next_event() is END_OF_STREAM  # and stays so
        assert got == events
        assert relay.state is State.OPEN


def test_frames_buffered_before_eof_are_delivered_first() -> None:
    events, data = publisher_frames()
    _, relay = handshake(Role.PUBLISHER)
    relay.receive_data(data)
    relay.receive_eof()
    assert [relay.next_event() for _ in events] == events
    assert relay.next_event() is END_OF_STREAM


def test_eof_before_the_first_byte_is_clean() -> None:
    relay = Connection("relay")
    relay.receive_eof()
    assert relay.next_event() is END_OF_STREAM
    assert relay.state is State.HANDSHAKE


def test_eof_mid_frame_is_the_peers_error_at_every_cut() -> None:
    events, data = publisher_frames()
    last = encode(ChunkData(1, 2, 3_000, b"\x03\x00" * 4))
    for cut in range(1, len(last)):
        _, relay = handshake(Role.PUBLISHER)
        relay.receive_data(data + last[:cut])
        relay.receive_eof()
        # Everything whole is delivered before the truncation is reported.
        assert [relay.next_event() for _ in events] == events
        with pytest.raises(RemoteProtocolError, match="connection closed mid-frame") as info:
            relay.next_event()
        assert f"({cut} bytes of it arrived)" in str(info.value)
        assert info.value.code is ErrorCode.MALFORMED_FRAME
        assert relay.state is State.ERROR
        assert relay.error is info.value


def test_eof_after_goodbye_is_clean_even_with_bytes_left() -> None:
    client, relay = handshake(Role.PUBLISHER)
    relay.receive_data(client.send(Goodbye(ErrorCode.NORMAL, "bye")) + b"AS\x01")
    assert drain(relay) == [Goodbye(ErrorCode.NORMAL, "bye")]
    assert relay.state is State.CLOSED
    relay.receive_eof()
    assert relay.next_event() is END_OF_STREAM


def test_data_after_eof_is_our_error() -> None:
    _, relay = handshake(Role.PUBLISHER)
    relay.receive_eof()
    with pytest.raises(LocalProtocolError, match="after the end of the stream"):
        relay.receive_data(b"AS")
    with pytest.raises(LocalProtocolError, match="twice"):
        relay.receive_eof()
    assert relay.buffered == 0  # the refused bytes were not buffered
    assert relay.next_event() is END_OF_STREAM


def _bad_chunk_received() -> tuple[Connection, RemoteProtocolError]:
    client, relay = handshake(Role.PUBLISHER)
    transfer(client, relay, OpenStream(1, "mic", MONO16))
    # A chunk for a stream the publisher never declared, then a good PING.
    relay.receive_data(encode(ChunkData(9, 0, 0, b"")) + encode(Ping(1)))
    with pytest.raises(RemoteProtocolError) as info:
        relay.next_event()
    assert info.value.code is ErrorCode.UNKNOWN_STREAM
    return relay, info.value


def test_every_receive_after_a_remote_error_raises() -> None:
    relay, err = _bad_chunk_received()
    assert relay.state is State.ERROR
    assert relay.error is err
    for _ in range(2):  # the buffered PING is never returned
        with pytest.raises(RemoteProtocolError) as again:
            relay.next_event()
        assert (str(again.value), again.value.code) == (str(err), err.code)
    with pytest.raises(LocalProtocolError, match="failed with a protocol error"):
        relay.receive_data(encode(Ping(2)))
    with pytest.raises(LocalProtocolError, match="failed with a protocol error"):
        relay.receive_eof()


def test_every_send_after_a_remote_error_raises_but_one_farewell() -> None:
    relay, err = _bad_chunk_received()
    with pytest.raises(LocalProtocolError, match="cannot send STREAM_ACCEPTED"):
        relay.send(StreamAccepted(1, 0))
    with pytest.raises(LocalProtocolError, match="cannot send PING"):
        relay.send(Ping(5))
    # The peer may still learn why: one ERROR (or GOODBYE) frame.
    farewell = relay.send(ErrorFrame(err.code, str(err)))
    assert decode_all(farewell) == [ErrorFrame(err.code, str(err))]
    with pytest.raises(LocalProtocolError):
        relay.send(Goodbye(ErrorCode.NORMAL, "bye"))
    assert relay.state is State.ERROR


def test_every_call_after_a_local_error_raises() -> None:
    client, relay = handshake(Role.PUBLISHER)
    transfer(client, relay, OpenStream(1, "mic", MONO16))
    with pytest.raises(LocalProtocolError, match="undeclared stream id 9") as info:
        client.send(ChunkData(9, 0, 0, b""))
    assert client.state is State.ERROR
    assert client.error is info.value
    with pytest.raises(LocalProtocolError):
        client.send(ChunkData(1, 0, 0, b"\x00\x00"))  # valid before the error
    with pytest.raises(LocalProtocolError):
        client.chunk_frame(1, 0, 0, b"\x00\x00")
    with pytest.raises(LocalProtocolError):
        client.send(OpenStream(2, "other", MONO16))
    with pytest.raises(LocalProtocolError):
        client.receive_data(relay.send(StreamAccepted(1, 0)))
    with pytest.raises(LocalProtocolError):
        client.next_event()
    with pytest.raises(LocalProtocolError):
        client.receive_eof()
    assert decode_all(client.send(Goodbye(ErrorCode.INTERNAL, "bug"))) == [
        Goodbye(ErrorCode.INTERNAL, "bug")
    ]


def _refused_chunk(fast: bool, stream_id: int, payload: bytes) -> tuple[str, ErrorCode]:
    client, relay = handshake(Role.PUBLISHER)
    transfer(client, relay, OpenStream(1, "mic", MONO16))
    send = client.chunk_frame if fast else lambda *args: client.send(ChunkData(*args))
    with pytest.raises(LocalProtocolError) as info:
        send(stream_id, 0, 0, payload)
    assert client.state is State.ERROR
    return str(info.value), info.value.code


@pytest.mark.parametrize(("stream_id", "payload"), [(9, b""), (1, b"\x00" * 3)])
def test_chunk_frame_fast_path_errors_like_send(stream_id: int, payload: bytes) -> None:
    # One check for every CHUNK sent: same refusals, same codes, same ERROR state.
    assert _refused_chunk(True, stream_id, payload) == _refused_chunk(False, stream_id, payload)


def test_chunk_frame_checks_the_role() -> None:
    client, _ = handshake(Role.SUBSCRIBER)
    with pytest.raises(LocalProtocolError, match="not allowed in a subscriber session"):
        client.chunk_frame(1, 0, 0, b"")


# --------------------------------------------------------------------------
# Sans-I/O: the codec imports no I/O, transitively within the package
# --------------------------------------------------------------------------

PACKAGE_DIR = Path(audiosockets.__file__).parent
FORBIDDEN = {"asyncio", "socket", "sounddevice", "selectors", "threading"}


def _module_file(name: str) -> Path:
    """Path of package-internal module ``name`` ('audio', 'handlers.level')."""
    base = PACKAGE_DIR.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return PACKAGE_DIR / "__init__.py"  # `from . import __version__`: an attribute


def _imports(path: Path) -> tuple[set[str], set[Path]]:
    """(top-level external modules, package-internal files) ``path`` imports."""
    external: set[str] = set()
    internal: set[Path] = set()
    # The dotted package ``path`` lives in, relative to audiosockets ("" or "protocol").
    package = path.parent.relative_to(PACKAGE_DIR).parts
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):  # function-level and TYPE_CHECKING imports count too
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "audiosockets":
                    internal.add(_module_file(alias.name.partition(".")[2] or "__init__"))
                else:
                    external.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").split(".")[0] != "audiosockets":
                external.add((node.module or "").split(".")[0])
                continue
            if node.level == 0:
                base: tuple[str, ...] = ()
                module = (node.module or "").partition(".")[2]
            else:
                assert node.level - 1 <= len(package), f"{path} imports above the package"
                base = package[: len(package) - (node.level - 1)]
                module = node.module or ""
            if module:
                internal.add(_module_file(".".join((*base, module))))
            else:
                internal.add(_module_file(".".join((*base, "__init__"))))
                internal.update(_module_file(".".join((*base, a.name))) for a in node.names)
    return external, internal


def _transitive_imports(start: str) -> dict[Path, set[str]]:
    # Importing any submodule runs the package's __init__ first.
    todo = [_module_file(start), PACKAGE_DIR / "__init__.py"]
    seen: dict[Path, set[str]] = {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        external, internal = _imports(path)
        seen[path] = external
        todo.extend(internal - seen.keys())
    return seen


def test_protocol_imports_no_io() -> None:
    graph = _transitive_imports("protocol")
    names = {str(p.relative_to(PACKAGE_DIR)) for p in graph}
    assert names >= {
        "protocol/__init__.py",
        "protocol/connection.py",
        "protocol/frames.py",
        "protocol/events.py",
        "protocol/limits.py",
        "audio.py",
        "errors.py",
        "__init__.py",
    }
    offenders = {p.name: sorted(ext & FORBIDDEN) for p, ext in graph.items() if ext & FORBIDDEN}
    assert offenders == {}


def test_import_check_catches_io() -> None:
    # The checker above must be able to fail: transport.py is the I/O adapter.
    graph = _transitive_imports("transport")
    found = set().union(*graph.values()) & FORBIDDEN
    assert {"asyncio", "socket"} <= found
