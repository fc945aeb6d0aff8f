"""The connection state machine: handshake, per-role frame rules, streams.

State lives in ``Connection``: the handshake state, the peer's role, and the
streams declared on this connection in each direction (id -> name and format).
Chunks refer to streams by id; the name and format travel once, in OPEN_STREAM.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final, Literal

from ..errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .events import (
    NEED_DATA,
    Ack,
    ChunkData,
    CloseStream,
    ErrorFrame,
    Event,
    Goodbye,
    Hello,
    NeedData,
    OpenStream,
    Ping,
    Pong,
    Role,
    Status,
    StatusRequest,
    StreamAccepted,
    Subscribe,
    Welcome,
)
from .frames import FrameDecoder, FrameType, decode_payload, encode, encode_chunk
from .limits import Limits


class State(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


Side = Literal["client", "relay"]

_ALWAYS: Final = frozenset({FrameType.PING, FrameType.PONG, FrameType.GOODBYE, FrameType.ERROR})

#: Frames each sender may send once the session is open, by its role.
_FROM_CLIENT: Final = {
    Role.PUBLISHER: _ALWAYS | {FrameType.OPEN_STREAM, FrameType.CHUNK, FrameType.CLOSE_STREAM},
    Role.SUBSCRIBER: _ALWAYS | {FrameType.SUBSCRIBE, FrameType.ACK, FrameType.STATUS_REQUEST},
    Role.OBSERVER: _ALWAYS | {FrameType.STATUS_REQUEST},
}
_FROM_RELAY: Final = {
    Role.PUBLISHER: _ALWAYS | {FrameType.STREAM_ACCEPTED, FrameType.CLOSE_STREAM},
    Role.SUBSCRIBER: _ALWAYS
    | {FrameType.OPEN_STREAM, FrameType.CHUNK, FrameType.CLOSE_STREAM, FrameType.STATUS},
    Role.OBSERVER: _ALWAYS | {FrameType.STATUS},
}

_TYPE_OF: Final[dict[type, FrameType]] = {
    Hello: FrameType.HELLO,
    Welcome: FrameType.WELCOME,
    OpenStream: FrameType.OPEN_STREAM,
    StreamAccepted: FrameType.STREAM_ACCEPTED,
    ChunkData: FrameType.CHUNK,
    Subscribe: FrameType.SUBSCRIBE,
    Ack: FrameType.ACK,
    CloseStream: FrameType.CLOSE_STREAM,
    Ping: FrameType.PING,
    Pong: FrameType.PONG,
    StatusRequest: FrameType.STATUS_REQUEST,
    Status: FrameType.STATUS,
    Goodbye: FrameType.GOODBYE,
    ErrorFrame: FrameType.ERROR,
}


@dataclass(slots=True)
class _Streams:
    """Streams declared on one connection, in one direction."""

    limit: int
    by_id: dict[int, OpenStream] = field(default_factory=dict)

    def declare(
        self, event: OpenStream, error: type[LocalProtocolError | RemoteProtocolError]
    ) -> None:
        if event.stream_id not in self.by_id and len(self.by_id) >= self.limit:
            raise error(f"more than {self.limit} streams on one connection")
        self.by_id[event.stream_id] = event

    def check_chunk(
        self, chunk: ChunkData, error: type[LocalProtocolError | RemoteProtocolError]
    ) -> None:
        opened = self.by_id.get(chunk.stream_id)
        if opened is None:
            raise error(
                f"chunk for undeclared stream id {chunk.stream_id}", ErrorCode.UNKNOWN_STREAM
            )
        frame_bytes = opened.format.frame_bytes
        if len(chunk.payload) % frame_bytes:
            raise error(
                f"chunk payload of {len(chunk.payload)} bytes is not a whole number of "
                f"{frame_bytes}-byte frames for stream {opened.name!r}",
                ErrorCode.BAD_FORMAT,
            )


class Connection:
    """One side of one session. Feed bytes with ``receive_data``, drain
    events with ``next_event``; turn events into bytes with ``send``.

    The client side sends HELLO first and waits for WELCOME; the relay side
    expects HELLO first and answers WELCOME. After that, each direction may
    only send the frame types its role allows. GOODBYE or ERROR, either way,
    closes the session.
    """

    def __init__(self, side: Side, limits: Limits | None = None) -> None:
        self.side: Side = side
        self.limits = limits or Limits()
        self.state = State.HANDSHAKE
        self.role: Role | None = None  # the client's role, once known
        self.peer_name = ""
        self.token = ""
        self.welcome: Welcome | None = None
        self._decoder = FrameDecoder(self.limits)
        self._sent_hello = False
        self.our_streams = _Streams(self.limits.max_streams)
        self.their_streams = _Streams(self.limits.max_streams)

    # -- receiving ---------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._decoder.receive_data(data)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return self._decoder.buffered

    def next_event(self) -> Event | NeedData:
        if self.state is State.CLOSED:
            return NEED_DATA
        frame = self._decoder.next_frame()
        if frame is None:
            return NEED_DATA
        ftype, payload = frame
        self._check_incoming_type(ftype)
        event = decode_payload(ftype, payload, self.limits)
        self._apply_incoming(event)
        return event

    def _check_incoming_type(self, ftype: FrameType) -> None:
        if self.state is State.HANDSHAKE:
            expected = FrameType.HELLO if self.side == "relay" else FrameType.WELCOME
            if ftype in (FrameType.ERROR, FrameType.GOODBYE):
                return
            if ftype is expected and (self.side == "relay" or self._sent_hello):
                return
            if self.side == "client" and not self._sent_hello:
                # A WELCOME we did not ask for would open a session with no role.
                raise RemoteProtocolError(
                    f"{ftype.name} arrived before HELLO was sent", ErrorCode.UNEXPECTED_FRAME
                )
            raise RemoteProtocolError(
                f"expected {expected.name} first, got {ftype.name}", ErrorCode.UNEXPECTED_FRAME
            )
        assert self.role is not None
        allowed = _FROM_CLIENT[self.role] if self.side == "relay" else _FROM_RELAY[self.role]
        if ftype not in allowed:
            raise RemoteProtocolError(
                f"{ftype.name} is not allowed from a {'client' if self.side == 'relay' else 'relay'} "
                f"in a {self.role.label} session",
                ErrorCode.UNEXPECTED_FRAME,
            )

    def _apply_incoming(self, event: Event) -> None:
        if isinstance(event, ChunkData):
            self.their_streams.check_chunk(event, RemoteProtocolError)
        elif isinstance(event, OpenStream):
            self.their_streams.declare(event, RemoteProtocolError)
        elif isinstance(event, Hello):
            self._check_name(event.client_name, "client name")
            self.role = event.role
            self.peer_name = event.client_name
            self.token = event.token
        elif isinstance(event, Welcome):
            self.welcome = event
            self.state = State.OPEN
        elif isinstance(event, Subscribe):
            self._check_name(event.pattern, "pattern")
            self._check_name(event.group, "group")
        elif isinstance(event, (Goodbye, ErrorFrame)):
            self.state = State.CLOSED

    def _check_name(self, name: str, what: str) -> None:
        if len(name.encode("utf-8")) > self.limits.max_name_length:
            raise RemoteProtocolError(f"{what} too long", ErrorCode.NAME_TOO_LONG)

    # -- sending -----------------------------------------------------------

    def send(self, event: Event) -> bytes:
        ftype = _TYPE_OF[type(event)]
        if self.state is State.CLOSED:
            raise LocalProtocolError(f"cannot send {ftype.name}: the session is closed")
        if ftype in (FrameType.GOODBYE, FrameType.ERROR):
            self.state = State.CLOSED
            return encode(event)
        if self.state is State.HANDSHAKE:
            self._check_handshake_send(event, ftype)
        else:
            assert self.role is not None
            allowed = _FROM_RELAY[self.role] if self.side == "relay" else _FROM_CLIENT[self.role]
            if ftype not in allowed:
                raise LocalProtocolError(
                    f"{ftype.name} is not allowed in a {self.role.label} session"
                )
        if isinstance(event, ChunkData):
            self.our_streams.check_chunk(event, LocalProtocolError)
        elif isinstance(event, OpenStream):
            self.our_streams.declare(event, LocalProtocolError)
        return encode(event)

    def _check_handshake_send(self, event: Event, ftype: FrameType) -> None:
        if self.side == "client":
            if isinstance(event, Hello) and not self._sent_hello:
                self._sent_hello = True
                self.role = event.role
                return
            if ftype in (FrameType.PING, FrameType.PONG) and self._sent_hello:
                return
            raise LocalProtocolError(f"cannot send {ftype.name} before the handshake completes")
        if isinstance(event, Welcome) and self.role is not None:
            self.state = State.OPEN
            return
        raise LocalProtocolError(f"cannot send {ftype.name} before HELLO was received")

    def chunk_frame(
        self, stream_id: int, seq: int, captured_ns: int, payload: bytes | memoryview
    ) -> bytes:
        """Fast path for CHUNK: checks the stream is ours, skips the dataclass."""
        if self.state is not State.OPEN:
            raise LocalProtocolError("cannot send CHUNK: the session is not open")
        opened = self.our_streams.by_id.get(stream_id)
        if opened is None:
            raise LocalProtocolError(f"chunk for undeclared stream id {stream_id}")
        if len(payload) % opened.format.frame_bytes:
            raise LocalProtocolError("chunk payload is not a whole number of frames")
        return encode_chunk(stream_id, seq, captured_ns, payload)
