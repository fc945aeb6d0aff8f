"""The connection state machine: handshake, per-role frame rules, streams, end of stream.

State lives in ``Connection``: the handshake state, the peer's role, the
streams declared on this connection in each direction (id -> name and format),
and whether the byte stream has ended. Chunks refer to streams by id; the name
and format travel once, in OPEN_STREAM.

Invariants:
- End of stream is an input (``receive_eof``), as in python-websockets: the
  codec, not the I/O adapter, decides whether it was clean (between frames)
  or a truncated frame (``RemoteProtocolError``).
- After a protocol error either way the connection is in ``State.ERROR``, as
  in h11: every later call raises instead of carrying on from a state nobody
  can trust. One farewell (GOODBYE or ERROR) may still be sent, so the peer
  learns why.
- Every CHUNK we send, by ``send`` or by the ``chunk_frame`` fast path, passes
  the same check: the session is open, the role may send chunks, the stream is
  declared and the payload is a whole number of audio frames.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import Final, Literal

from ..errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .events import (
    END_OF_STREAM,
    NEED_DATA,
    Ack,
    ChunkData,
    CloseStream,
    EndOfStream,
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
from .frames import (
    CHUNK_HEAD,
    FrameDecoder,
    FrameType,
    ReceivedChunk,
    decode_payload,
    encode,
    encode_chunk,
    max_chunk_payload,
    payload_limits,
)
from .limits import Limits


class State(enum.Enum):
    """Where a ``Connection`` is in its life."""

    HANDSHAKE = "handshake"  # HELLO/WELCOME not yet exchanged
    OPEN = "open"  # the role's frames flow
    CLOSED = "closed"  # GOODBYE or ERROR sent or received
    ERROR = "error"  # a protocol error was raised; every later call raises


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

    limits: Limits
    by_id: dict[int, OpenStream] = field(default_factory=dict)
    # Per declared id, the bytes of one frame and the most payload bytes a
    # CHUNK may have (``max_chunk_payload``): needed for every chunk, so
    # worked out once here rather than derived from the format each time.
    frame_bytes: dict[int, int] = field(default_factory=dict)
    max_payload: dict[int, int] = field(default_factory=dict)

    def declare(
        self, event: OpenStream, error: type[LocalProtocolError | RemoteProtocolError]
    ) -> None:
        limit = self.limits.max_streams
        if event.stream_id not in self.by_id and len(self.by_id) >= limit:
            raise error(f"more than {limit} streams on one connection")
        self.by_id[event.stream_id] = event
        self.frame_bytes[event.stream_id] = event.format.frame_bytes
        self.max_payload[event.stream_id] = max_chunk_payload(event.format, self.limits)

    def check_chunk(
        self,
        stream_id: int,
        payload_bytes: int,
        error: type[LocalProtocolError | RemoteProtocolError],
    ) -> None:
        """The one check every CHUNK passes, sent or received."""
        frame_bytes = self.frame_bytes.get(stream_id)
        if frame_bytes is None:
            raise error(f"chunk for undeclared stream id {stream_id}", ErrorCode.UNKNOWN_STREAM)
        if not payload_bytes:
            # An empty chunk carries no audio but costs a window entry; a
            # flood of them is memory with no seconds to show for it.
            raise error(
                f"empty chunk for stream {self.by_id[stream_id].name!r}: a chunk carries"
                " at least one frame",
                ErrorCode.BAD_FORMAT,
                "empty_chunk",
            )
        if payload_bytes % frame_bytes:
            raise error(
                f"chunk payload of {payload_bytes} bytes is not a whole number of "
                f"{frame_bytes}-byte frames for stream {self.by_id[stream_id].name!r}",
                ErrorCode.BAD_FORMAT,
            )


def _decode_chunk(payload: bytes, streams: _Streams) -> ChunkData:
    """A received CHUNK's event, without ``decode_payload``'s generic reader and
    with the same checks (RemoteProtocolError: truncated, undeclared stream,
    empty or partial frames)."""
    if len(payload) < CHUNK_HEAD.size:
        raise RemoteProtocolError("CHUNK frame is truncated")
    stream_id, seq, captured_ns = CHUNK_HEAD.unpack_from(payload)
    audio = payload[CHUNK_HEAD.size :]
    streams.check_chunk(stream_id, len(audio), RemoteProtocolError)
    return ChunkData(stream_id, seq, captured_ns, audio)


def _check_incoming_type(conn: Connection, ftype: FrameType) -> None:
    """May a frame of type ``ftype`` arrive now (handshake order, the role's frames)?
    Raises ``RemoteProtocolError`` UNEXPECTED_FRAME when not."""
    if conn.state is State.HANDSHAKE:
        expected = FrameType.HELLO if conn.side == "relay" else FrameType.WELCOME
        if ftype in (FrameType.ERROR, FrameType.GOODBYE):
            return
        if ftype is expected and (conn.side == "relay" or conn._sent_hello):
            return
        if conn.side == "client" and not conn._sent_hello:
            # A WELCOME we did not ask for would open a session with no role.
            raise RemoteProtocolError(
                f"{ftype.name} arrived before HELLO was sent", ErrorCode.UNEXPECTED_FRAME
            )
        raise RemoteProtocolError(
            f"expected {expected.name} first, got {ftype.name}", ErrorCode.UNEXPECTED_FRAME
        )
    assert conn.role is not None
    allowed = _FROM_CLIENT[conn.role] if conn.side == "relay" else _FROM_RELAY[conn.role]
    if ftype not in allowed:
        raise RemoteProtocolError(
            f"{ftype.name} is not allowed from a {'client' if conn.side == 'relay' else 'relay'} "
            f"in a {conn.role.label} session",
            ErrorCode.UNEXPECTED_FRAME,
        )


def _admit(conn: Connection, ftype: FrameType, stream_id: int | None) -> int:
    """A frame judged from its header (``frames.Admit``): its type must be
    allowed now; it may weigh ``payload_limits`` (a CHUNK: what its stream's
    format allows, ``max_chunk_payload``)."""
    _check_incoming_type(conn, ftype)
    if ftype is FrameType.CHUNK and stream_id is not None:
        limit = conn.their_streams.max_payload.get(stream_id)
        if limit is None:
            raise RemoteProtocolError(
                f"chunk for undeclared stream id {stream_id}", ErrorCode.UNKNOWN_STREAM
            )
        return limit
    return conn._payload_limits[ftype]


class Connection:
    """One side of one session. Feed bytes with ``receive_data`` (and the end of
    the byte stream with ``receive_eof``), drain events with ``next_event``;
    turn events into bytes with ``send``.

    The client side sends HELLO first and waits for WELCOME; the relay side
    expects HELLO first and answers WELCOME. After that, each direction may
    only send the frame types its role allows. GOODBYE or ERROR, either way,
    closes the session. A protocol error puts the connection in
    ``State.ERROR`` (see the module notes).

    Args:
        side: ``"client"`` (publisher, subscriber, observer) or ``"relay"``.
        limits: the hard limits of this connection; ``Limits()`` by default.
    """

    def __init__(self, side: Side, limits: Limits | None = None) -> None:
        self.side: Side = side
        self.limits = limits or Limits()
        self.state = State.HANDSHAKE
        self.role: Role | None = None  # the client's role, once known
        self.peer_name = ""
        self.token = ""
        self.welcome: Welcome | None = None
        self._payload_limits = payload_limits(self.limits)
        self._decoder = FrameDecoder(self.limits, functools.partial(_admit, self))
        self._sent_hello = False
        self._eof = False
        self._error: LocalProtocolError | RemoteProtocolError | None = None
        self._farewell_sent = False
        self.our_streams = _Streams(self.limits)
        self.their_streams = _Streams(self.limits)

    @property
    def error(self) -> LocalProtocolError | RemoteProtocolError | None:
        """The protocol error that put this connection in ``State.ERROR``, if any."""
        return self._error

    @property
    def eof_received(self) -> bool:
        """Whether ``receive_eof`` was called: the peer will send no more bytes."""
        return self._eof

    # -- receiving ---------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes received from the peer (any split: whole frames, parts, several).

        Nothing is parsed here; ``next_event`` does that. The buffer holds at
        most one incomplete frame beyond what ``next_event`` has not drained
        (a frame header announcing more than ``Limits.max_frame_size`` bytes is
        refused by ``next_event`` before its payload is awaited).

        Raises:
            LocalProtocolError: after ``receive_eof`` (no byte can follow the
                end of the stream) or once the connection is in ``State.ERROR``.
        """
        if self._eof:
            raise LocalProtocolError("received data after the end of the stream")
        if self.state is State.ERROR:
            raise self._after_error("receive data")
        self._decoder.receive_data(data)

    def receive_eof(self) -> None:
        """The peer closed its end of the byte stream; no more data will follow.

        Frames already buffered are still returned by ``next_event``; after
        them it returns ``END_OF_STREAM`` if the stream ended between frames,
        or raises ``RemoteProtocolError`` if a frame was cut short.

        Raises:
            LocalProtocolError: when called twice, or in ``State.ERROR``.
        """
        if self._eof:
            raise LocalProtocolError("receive_eof called twice")
        if self.state is State.ERROR:
            raise self._after_error("receive the end of the stream")
        self._eof = True

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return self._decoder.buffered

    def next_event(self) -> Event | NeedData | EndOfStream:
        """Parse the next complete frame from the buffered bytes.

        Returns:
            The next ``Event``; ``NEED_DATA`` when no complete frame is
            buffered (or the session is closed and the peer may still send
            bytes we ignore); ``END_OF_STREAM`` once ``receive_eof`` was called
            and nothing but whole frames preceded it (or the session was
            already closed by GOODBYE/ERROR).

        Raises:
            RemoteProtocolError: the peer broke the protocol (bad header,
                a frame over ``Limits.max_frame_size``, a frame its role may
                not send, a malformed payload, a chunk for an undeclared
                stream, the stream ending mid-frame). ``code`` says which
                ``ErrorCode`` to report. The connection is then in
                ``State.ERROR`` and every later ``next_event`` raises the
                same error (message and code) again.
            LocalProtocolError: the connection is in ``State.ERROR`` because
                of an error of ours (a refused ``send``).
        """
        if self.state is State.ERROR:
            error = self._error
            if isinstance(error, RemoteProtocolError):  # the peer's error stands
                raise RemoteProtocolError(str(error), error.code, error.reason)
            raise self._after_error("receive")
        if self.state is State.CLOSED:
            return END_OF_STREAM if self._eof else NEED_DATA
        try:
            frame = self._decoder.next_frame()
            if frame is None:
                if not self._eof:
                    return NEED_DATA
                if self._decoder.buffered:
                    raise RemoteProtocolError(
                        f"connection closed mid-frame ({self._decoder.buffered} bytes "
                        "of it arrived)"
                    )
                return END_OF_STREAM
            ftype, payload = frame  # its type was checked from the header (``_admit``)
            if ftype is FrameType.CHUNK:  # nearly every frame of a session
                return _decode_chunk(payload, self.their_streams)
            event = decode_payload(ftype, payload, self.limits)
            self._apply_incoming(event)
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise
        return event

    def next_chunks(self, limit: int) -> list[ReceivedChunk]:
        """Up to ``limit`` CHUNKs in a row from the buffered bytes, each as
        ``(stream id, seq, captured_ns, audio bytes)``, without building events:
        the receiving hot path (``FrameDecoder.next_chunks``).

        Returns only what ``next_event`` would return as ``ChunkData`` in the
        same order, and ``[]`` when the next frame is anything else or the
        session may not receive chunks now: ``next_event`` then returns or
        raises for it as usual. Never raises.
        """
        if self.state is not State.OPEN or not self._receives_chunks:
            return []
        streams = self.their_streams
        return self._decoder.next_chunks(streams.max_payload, streams.frame_bytes, limit)

    @property
    def _receives_chunks(self) -> bool:
        if self.role is None:
            return False
        allowed = _FROM_CLIENT if self.side == "relay" else _FROM_RELAY
        return FrameType.CHUNK in allowed[self.role]

    def discard_input(self) -> None:
        """Free every byte buffered and not yet parsed (the connection is being cut)."""
        self._decoder.discard()

    @property
    def pending_frame_length(self) -> int:  # the incomplete frame's announced payload (0: none)
        return self._decoder.pending_length

    @property
    def frames_received(self) -> int:
        """Complete frames parsed so far (the I/O adapter times partial ones)."""
        return self._decoder.frames

    def _apply_incoming(self, event: Event) -> None:
        if isinstance(event, ChunkData):
            self.their_streams.check_chunk(event.stream_id, len(event.payload), RemoteProtocolError)
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

    # -- errors --------------------------------------------------------------

    def _fail(self, exc: LocalProtocolError | RemoteProtocolError) -> None:
        self.state = State.ERROR
        self._error = exc

    def _after_error(self, what: str) -> LocalProtocolError:
        return LocalProtocolError(
            f"cannot {what}: the connection failed with a protocol error ({self._error})"
        )

    # -- sending -----------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """Encode ``event`` as one frame for the peer, checking it is allowed now.

        Returns:
            The frame's bytes (8-byte header + payload), ready to write.

        Raises:
            LocalProtocolError: the event is not allowed in the current state
                (before the handshake completes, after GOODBYE/ERROR, a frame
                type the role may not send, a chunk for an undeclared stream or
                not a whole number of audio frames, more than
                ``Limits.max_streams`` streams, a string over 65535 bytes).
                The connection is then in ``State.ERROR``. In ``State.ERROR``
                one GOODBYE or ERROR frame may still be sent; anything else
                raises.
        """
        ftype = _TYPE_OF[type(event)]
        if self.state is State.ERROR:
            if ftype in (FrameType.GOODBYE, FrameType.ERROR) and not self._farewell_sent:
                self._farewell_sent = True
                return encode(event)
            raise self._after_error(f"send {ftype.name}")
        try:
            if self.state is State.CLOSED:
                raise LocalProtocolError(f"cannot send {ftype.name}: the session is closed")
            if ftype in (FrameType.GOODBYE, FrameType.ERROR):
                data = encode(event)
                self.state = State.CLOSED
                return data
            if self.state is State.HANDSHAKE:
                self._check_handshake_send(event, ftype)
            else:
                self._check_open_send(ftype)
            if isinstance(event, ChunkData):
                self.our_streams.check_chunk(
                    event.stream_id, len(event.payload), LocalProtocolError
                )
            elif isinstance(event, OpenStream):
                self.our_streams.declare(event, LocalProtocolError)
            return encode(event)
        except LocalProtocolError as exc:
            self._fail(exc)
            raise

    def _check_open_send(self, ftype: FrameType) -> None:
        assert self.role is not None
        allowed = _FROM_RELAY[self.role] if self.side == "relay" else _FROM_CLIENT[self.role]
        if ftype not in allowed:
            raise LocalProtocolError(f"{ftype.name} is not allowed in a {self.role.label} session")

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
        """Encode a CHUNK without building a ``ChunkData`` (the publisher's hot path).

        Same rules and same bytes as ``send(ChunkData(stream_id, seq,
        captured_ns, payload))``: the session must be open, the role must be
        allowed to send CHUNK, ``stream_id`` must be declared by our
        OPEN_STREAM and ``payload`` (PCM bytes) a whole number of audio frames.
        ``seq`` is the stream's sequence number (u64), ``captured_ns`` the
        capture time in wall-clock nanoseconds (i64).

        Returns:
            The frame's bytes (8-byte header, 20-byte chunk head, payload).

        Raises:
            LocalProtocolError: any rule above broken (the connection is then
                in ``State.ERROR``), or the connection already is.
        """
        if self.state is not State.OPEN:
            if self.state is State.ERROR:
                raise self._after_error("send CHUNK")
            self._fail(LocalProtocolError("cannot send CHUNK: the session is not open"))
            assert self._error is not None
            raise self._error
        try:
            self._check_open_send(FrameType.CHUNK)
            self.our_streams.check_chunk(stream_id, len(payload), LocalProtocolError)
        except LocalProtocolError as exc:
            self._fail(exc)
            raise
        return encode_chunk(stream_id, seq, captured_ns, payload)
