"""Wire protocol v1: a sans-I/O codec and connection state machine.

Bytes in, events out; events in, bytes out. Nothing here touches a socket,
a clock or an event loop (a test checks the imports), so every rule of the
protocol is testable byte by byte. ``transport.py`` is the one adapter that
moves these bytes over asyncio streams. The format is documented for humans in
``services/PROTOCOL.md``; keep the two in step.

Invariants:
- Every frame is an 8-byte header (magic ``AS``, version, type, payload
  length) and a payload of at most ``Limits.max_frame_size`` bytes. The length
  is checked before the payload is buffered, so a hostile length cannot make
  us allocate.
- Anything the peer gets wrong raises ``RemoteProtocolError`` carrying an
  ``ErrorCode``; anything we get wrong raises ``LocalProtocolError``. No other
  exception escapes ``next_event`` (a property test holds us to it).
- State lives in ``Connection``: the handshake state, the peer's role, and
  the streams declared on this connection (id -> name and format). Chunks
  refer to streams by id; the name and format travel once, in OPEN_STREAM.
"""

from __future__ import annotations

import enum
import fnmatch
import struct
from dataclasses import dataclass, field
from typing import Final, Literal

from .audio import AudioFormat, SampleType
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError

PROTOCOL_VERSION: Final = 1
MAGIC: Final = b"AS"
HEADER = struct.Struct(">2sBBI")
HEADER_SIZE: Final = HEADER.size  # 8


class FrameType(enum.IntEnum):
    HELLO = 0x01
    WELCOME = 0x02
    OPEN_STREAM = 0x03
    STREAM_ACCEPTED = 0x04
    CHUNK = 0x05
    SUBSCRIBE = 0x06
    ACK = 0x07
    CLOSE_STREAM = 0x08
    PING = 0x09
    PONG = 0x0A
    STATUS_REQUEST = 0x0B
    STATUS = 0x0C
    GOODBYE = 0x0D
    ERROR = 0x0E


class Role(enum.IntEnum):
    """What a client declares itself to be in HELLO."""

    PUBLISHER = 1
    SUBSCRIBER = 2
    OBSERVER = 3  # asks for status only

    @property
    def label(self) -> str:
        return self.name.lower()


class StartPosition(enum.IntEnum):
    """Where a new subscription starts on streams it has no resume point for."""

    LIVE = 0  # with the next chunk the relay receives
    EARLIEST = 1  # with the oldest chunk still in the replay window


class CloseReason(enum.IntEnum):
    """Why a stream ended on a connection (CLOSE_STREAM)."""

    ENDED = 0  # the publisher closed it
    UNASSIGNED = 1  # group rebalance moved it to another member
    REPLACED = 2  # another publisher took over the stream name
    PUBLISHER_LOST = 3  # the publisher's connection went away


@dataclass(frozen=True, slots=True)
class Limits:
    """Hard limits, fixed per connection at construction."""

    max_frame_size: int = 1 << 20  # payload bytes; a chunk's audio must fit
    max_name_length: int = 200  # UTF-8 bytes of a stream, client or group name
    max_streams: int = 4096  # streams declared on one connection
    max_resume_entries: int = 4096
    handshake_timeout: float = 5.0  # seconds; enforced by the I/O adapter

    def __post_init__(self) -> None:
        if not 64 <= self.max_frame_size <= 0xFFFF_FFFF:
            raise ValueError("max_frame_size must be between 64 and 2**32-1")
        if not 1 <= self.max_name_length <= 0xFFFF:
            raise ValueError("max_name_length must be between 1 and 65535")
        if self.handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be positive")


# --------------------------------------------------------------------------
# Events. Frozen, slotted, validated on construction (LocalProtocolError when
# we build a bad one; decoding wraps that into RemoteProtocolError).
# --------------------------------------------------------------------------


def _check_u(name: str, value: int, bits: int) -> None:
    if not 0 <= value < (1 << bits):
        raise LocalProtocolError(f"{name}={value} does not fit in u{bits}")


@dataclass(frozen=True, slots=True)
class Hello:
    role: Role
    client_name: str
    token: str = ""  # reserved for authentication; empty means none

    def __post_init__(self) -> None:
        if not isinstance(self.role, Role):
            raise LocalProtocolError(f"unknown role {self.role!r}")


@dataclass(frozen=True, slots=True)
class Welcome:
    server_name: str
    heartbeat_interval_ms: int
    max_frame_size: int
    replay_window_ms: int

    def __post_init__(self) -> None:
        _check_u("heartbeat_interval_ms", self.heartbeat_interval_ms, 32)
        _check_u("max_frame_size", self.max_frame_size, 32)
        _check_u("replay_window_ms", self.replay_window_ms, 32)
        if self.heartbeat_interval_ms == 0:
            raise LocalProtocolError("heartbeat_interval_ms must be positive")


@dataclass(frozen=True, slots=True)
class OpenStream:
    """Declares a stream's id, name and format on this connection."""

    stream_id: int
    name: str
    format: AudioFormat

    def __post_init__(self) -> None:
        _check_u("stream_id", self.stream_id, 32)
        if not self.name:
            raise LocalProtocolError("stream name must not be empty")


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    """Relay -> publisher: send this stream from ``next_seq`` on."""

    stream_id: int
    next_seq: int

    def __post_init__(self) -> None:
        _check_u("stream_id", self.stream_id, 32)
        _check_u("next_seq", self.next_seq, 64)


@dataclass(frozen=True, slots=True)
class ChunkData:
    stream_id: int
    seq: int
    captured_ns: int
    payload: bytes

    def __post_init__(self) -> None:
        _check_u("stream_id", self.stream_id, 32)
        _check_u("seq", self.seq, 64)
        if not -(1 << 63) <= self.captured_ns < (1 << 63):
            raise LocalProtocolError("captured_ns does not fit in i64")


@dataclass(frozen=True, slots=True)
class Subscribe:
    pattern: str
    group: str = ""  # empty: fan-out; otherwise share streams within the group
    start: StartPosition = StartPosition.LIVE
    resume: tuple[tuple[str, int], ...] = ()  # (stream name, last seq seen)

    def __post_init__(self) -> None:
        if not self.pattern:
            raise LocalProtocolError("subscription pattern must not be empty")
        if not isinstance(self.start, StartPosition):
            raise LocalProtocolError(f"unknown start position {self.start!r}")
        for name, seq in self.resume:
            if not name:
                raise LocalProtocolError("resume entry with an empty stream name")
            _check_u("resume seq", seq, 64)

    def matches(self, stream: str) -> bool:
        return fnmatch.fnmatchcase(stream, self.pattern)


@dataclass(frozen=True, slots=True)
class Ack:
    stream_id: int
    seq: int

    def __post_init__(self) -> None:
        _check_u("stream_id", self.stream_id, 32)
        _check_u("seq", self.seq, 64)


@dataclass(frozen=True, slots=True)
class CloseStream:
    stream_id: int
    reason: CloseReason = CloseReason.ENDED

    def __post_init__(self) -> None:
        _check_u("stream_id", self.stream_id, 32)
        if not isinstance(self.reason, CloseReason):
            raise LocalProtocolError(f"unknown close reason {self.reason!r}")


@dataclass(frozen=True, slots=True)
class Ping:
    nonce: int

    def __post_init__(self) -> None:
        _check_u("nonce", self.nonce, 64)


@dataclass(frozen=True, slots=True)
class Pong:
    nonce: int

    def __post_init__(self) -> None:
        _check_u("nonce", self.nonce, 64)


@dataclass(frozen=True, slots=True)
class StatusRequest:
    pass


@dataclass(frozen=True, slots=True)
class Status:
    """The relay's status report, as a JSON document (UTF-8)."""

    document: str


@dataclass(frozen=True, slots=True)
class Goodbye:
    code: ErrorCode = ErrorCode.NORMAL
    message: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.code, ErrorCode):
            object.__setattr__(self, "code", _error_code(self.code))


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    code: ErrorCode
    message: str

    def __post_init__(self) -> None:
        if not isinstance(self.code, ErrorCode):
            object.__setattr__(self, "code", _error_code(self.code))


def _error_code(value: int) -> ErrorCode:
    # Unknown codes from a newer peer are not fatal: report them as INTERNAL.
    try:
        return ErrorCode(value)
    except ValueError:
        return ErrorCode.INTERNAL


Event = (
    Hello
    | Welcome
    | OpenStream
    | StreamAccepted
    | ChunkData
    | Subscribe
    | Ack
    | CloseStream
    | Ping
    | Pong
    | StatusRequest
    | Status
    | Goodbye
    | ErrorFrame
)


class NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()

# --------------------------------------------------------------------------
# Codec: payload layouts. Big-endian integers, strings as u16 length + UTF-8,
# PCM payloads little-endian as declared by the stream's sample type.
# --------------------------------------------------------------------------

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_HELLO = struct.Struct(">BB")  # role, flags (reserved, 0)
_WELCOME = struct.Struct(">III")
_OPEN = struct.Struct(">IIHB")  # stream id, rate, channels, sample type
_ACCEPTED = struct.Struct(">IQ")
CHUNK_HEAD = struct.Struct(">IQq")  # stream id, seq, captured_ns
_SUBSCRIBE = struct.Struct(">B")
_SEQ = struct.Struct(">Q")
_ACK = struct.Struct(">IQ")
_CLOSE = struct.Struct(">IB")
_NONCE = struct.Struct(">Q")
_CODE = struct.Struct(">H")

_FULL_HEADER_CHUNK = struct.Struct(">2sBBIIQq")


def _pack_str(value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise LocalProtocolError("string longer than 65535 bytes")
    return _U16.pack(len(raw)) + raw


def _frame(ftype: FrameType, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, ftype, len(payload)) + payload


def encode_chunk(stream_id: int, seq: int, captured_ns: int, payload: bytes | memoryview) -> bytes:
    """Encode a CHUNK frame (the hot path: one pack, one concatenation)."""
    return (
        _FULL_HEADER_CHUNK.pack(
            MAGIC,
            PROTOCOL_VERSION,
            FrameType.CHUNK,
            CHUNK_HEAD.size + len(payload),
            stream_id,
            seq,
            captured_ns,
        )
        + payload
    )


def encode(event: Event) -> bytes:
    """Encode one event as a complete frame. Raises LocalProtocolError."""
    match event:
        case ChunkData(stream_id, seq, captured_ns, payload):
            return encode_chunk(stream_id, seq, captured_ns, payload)
        case Hello(role, client_name, token):
            body = _HELLO.pack(role, 0) + _pack_str(client_name) + _pack_str(token)
            return _frame(FrameType.HELLO, body)
        case Welcome(server_name, hb, max_frame, window):
            return _frame(
                FrameType.WELCOME, _WELCOME.pack(hb, max_frame, window) + _pack_str(server_name)
            )
        case OpenStream(stream_id, name, fmt):
            body = _OPEN.pack(stream_id, fmt.rate, fmt.channels, fmt.sample_type) + _pack_str(name)
            return _frame(FrameType.OPEN_STREAM, body)
        case StreamAccepted(stream_id, next_seq):
            return _frame(FrameType.STREAM_ACCEPTED, _ACCEPTED.pack(stream_id, next_seq))
        case Subscribe(pattern, group, start, resume):
            if len(resume) > 0xFFFF:
                raise LocalProtocolError("too many resume entries")
            parts = [_SUBSCRIBE.pack(start), _pack_str(pattern), _pack_str(group)]
            parts.append(_U16.pack(len(resume)))
            for name, seq in resume:
                parts.append(_pack_str(name))
                parts.append(_SEQ.pack(seq))
            return _frame(FrameType.SUBSCRIBE, b"".join(parts))
        case Ack(stream_id, seq):
            return _frame(FrameType.ACK, _ACK.pack(stream_id, seq))
        case CloseStream(stream_id, reason):
            return _frame(FrameType.CLOSE_STREAM, _CLOSE.pack(stream_id, reason))
        case Ping(nonce):
            return _frame(FrameType.PING, _NONCE.pack(nonce))
        case Pong(nonce):
            return _frame(FrameType.PONG, _NONCE.pack(nonce))
        case StatusRequest():
            return _frame(FrameType.STATUS_REQUEST, b"")
        case Status(document):
            return _frame(FrameType.STATUS, document.encode("utf-8"))
        case Goodbye(code, message):
            return _frame(FrameType.GOODBYE, _CODE.pack(code) + _pack_str(message))
        case ErrorFrame(code, message):
            return _frame(FrameType.ERROR, _CODE.pack(code) + _pack_str(message))
    raise LocalProtocolError(f"cannot encode {event!r}")


class _Reader:
    """Cursor over one frame's payload; every short read is the peer's fault."""

    __slots__ = ("_buf", "_end", "_ftype", "_limits", "_pos")

    def __init__(self, buf: bytes, limits: Limits, ftype: FrameType) -> None:
        self._buf = buf
        self._pos = 0
        self._end = len(buf)
        self._limits = limits
        self._ftype = ftype

    def unpack(self, st: struct.Struct) -> tuple[int, ...]:
        if self._pos + st.size > self._end:
            raise RemoteProtocolError(f"{self._ftype.name} frame is truncated")
        values = st.unpack_from(self._buf, self._pos)
        self._pos += st.size
        return values

    def string(self, what: str, *, allow_empty: bool = True, bounded: bool = True) -> str:
        (n,) = self.unpack(_U16)
        if bounded and n > self._limits.max_name_length:
            raise RemoteProtocolError(
                f"{what} is {n} bytes, longer than the limit of {self._limits.max_name_length}",
                ErrorCode.NAME_TOO_LONG,
            )
        if self._pos + n > self._end:
            raise RemoteProtocolError(f"{self._ftype.name} frame is truncated")
        raw = self._buf[self._pos : self._pos + n]
        self._pos += n
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError(f"{what} is not valid UTF-8") from None
        if not allow_empty and not text:
            raise RemoteProtocolError(f"{what} must not be empty")
        return text

    def rest(self) -> bytes:
        data = self._buf[self._pos :]
        self._pos = self._end
        return data

    def done(self) -> None:
        if self._pos != self._end:
            raise RemoteProtocolError(
                f"{self._ftype.name} frame has {self._end - self._pos} extra bytes"
            )


def decode_payload(ftype: FrameType, payload: bytes, limits: Limits) -> Event:
    """Decode one frame payload. Raises RemoteProtocolError only."""
    r = _Reader(payload, limits, ftype)
    try:
        event = _decode(ftype, r)
    except LocalProtocolError as exc:  # event validation: the peer's values are bad
        raise RemoteProtocolError(str(exc)) from None
    except ValueError as exc:  # AudioFormat validation
        raise RemoteProtocolError(str(exc), ErrorCode.BAD_FORMAT) from None
    return event


def _decode(ftype: FrameType, r: _Reader) -> Event:
    event: Event
    if ftype is FrameType.CHUNK:
        stream_id, seq, captured_ns = r.unpack(CHUNK_HEAD)
        return ChunkData(stream_id, seq, captured_ns, r.rest())
    if ftype is FrameType.HELLO:
        role, _flags = r.unpack(_HELLO)
        if role not in Role._value2member_map_:
            raise RemoteProtocolError(f"unknown role {role}")
        event = Hello(Role(role), r.string("client name"), r.string("token"))
    elif ftype is FrameType.WELCOME:
        hb, max_frame, window = r.unpack(_WELCOME)
        event = Welcome(r.string("server name"), hb, max_frame, window)
    elif ftype is FrameType.OPEN_STREAM:
        stream_id, rate, channels, stype = r.unpack(_OPEN)
        if stype not in SampleType._value2member_map_:
            raise RemoteProtocolError(f"unknown sample type {stype}", ErrorCode.BAD_FORMAT)
        fmt = AudioFormat(rate, channels, SampleType(stype))
        event = OpenStream(stream_id, r.string("stream name", allow_empty=False), fmt)
    elif ftype is FrameType.STREAM_ACCEPTED:
        stream_id, next_seq = r.unpack(_ACCEPTED)
        event = StreamAccepted(stream_id, next_seq)
    elif ftype is FrameType.SUBSCRIBE:
        (start,) = r.unpack(_SUBSCRIBE)
        if start not in StartPosition._value2member_map_:
            raise RemoteProtocolError(f"unknown start position {start}")
        pattern = r.string("pattern", allow_empty=False)
        group = r.string("group")
        (count,) = r.unpack(_U16)
        if count > r._limits.max_resume_entries:
            raise RemoteProtocolError(f"{count} resume entries, more than the limit")
        resume = []
        for _ in range(count):
            name = r.string("stream name", allow_empty=False)
            (seq,) = r.unpack(_SEQ)
            resume.append((name, seq))
        event = Subscribe(pattern, group, StartPosition(start), tuple(resume))
    elif ftype is FrameType.ACK:
        event = Ack(*r.unpack(_ACK))
    elif ftype is FrameType.CLOSE_STREAM:
        stream_id, reason = r.unpack(_CLOSE)
        if reason not in CloseReason._value2member_map_:
            raise RemoteProtocolError(f"unknown close reason {reason}")
        event = CloseStream(stream_id, CloseReason(reason))
    elif ftype is FrameType.PING:
        event = Ping(*r.unpack(_NONCE))
    elif ftype is FrameType.PONG:
        event = Pong(*r.unpack(_NONCE))
    elif ftype is FrameType.STATUS_REQUEST:
        event = StatusRequest()
    elif ftype is FrameType.STATUS:
        try:
            event = Status(r.rest().decode("utf-8"))
        except UnicodeDecodeError:
            raise RemoteProtocolError("STATUS document is not valid UTF-8") from None
    elif ftype is FrameType.GOODBYE:
        (code,) = r.unpack(_CODE)
        event = Goodbye(_error_code(code), r.string("message", bounded=False))
    else:  # FrameType.ERROR
        (code,) = r.unpack(_CODE)
        event = ErrorFrame(_error_code(code), r.string("message", bounded=False))
    r.done()
    return event


class FrameDecoder:
    """Splits a byte stream into frames. Bytes in, ``(type, payload)`` out."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._buf = bytearray()
        self._pos = 0

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_frame(self) -> tuple[FrameType, bytes] | None:
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < HEADER_SIZE:
            self._compact()
            return None
        magic, version, ftype, length = HEADER.unpack_from(buf, pos)
        if magic != MAGIC:
            raise RemoteProtocolError(f"bad magic {bytes(magic)!r}: not an audiosockets peer")
        if version != PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})",
                ErrorCode.UNSUPPORTED_VERSION,
            )
        frame_type = _FRAME_TYPES.get(ftype)
        if frame_type is None:
            raise RemoteProtocolError(f"unknown frame type 0x{ftype:02x}")
        if length > self.limits.max_frame_size:
            raise RemoteProtocolError(
                f"frame of {length} bytes exceeds the limit of {self.limits.max_frame_size}",
                ErrorCode.FRAME_TOO_LARGE,
            )
        end = pos + HEADER_SIZE + length
        if len(buf) < end:
            self._compact()
            return None
        with memoryview(buf) as view:  # one copy, not a bytearray slice and then bytes
            payload = bytes(view[pos + HEADER_SIZE : end])
        self._pos = end
        if end == len(buf):
            buf.clear()
            self._pos = 0
        return frame_type, payload

    def _compact(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0


# --------------------------------------------------------------------------
# Connection state machine
# --------------------------------------------------------------------------


class State(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


Side = Literal["client", "relay"]

_FRAME_TYPES: Final[dict[int, FrameType]] = {int(t): t for t in FrameType}

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
        if ftype is FrameType.CHUNK:
            # Nearly every frame of a session: decoded here, without the generic
            # reader. The checks are the same as decode_payload's.
            if len(payload) < CHUNK_HEAD.size:
                raise RemoteProtocolError("CHUNK frame is truncated")
            stream_id, seq, captured_ns = CHUNK_HEAD.unpack_from(payload)
            chunk = ChunkData(stream_id, seq, captured_ns, payload[CHUNK_HEAD.size :])
            self.their_streams.check_chunk(chunk, RemoteProtocolError)
            return chunk
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
