"""Protocol v1 events: frozen, slotted dataclasses validated on construction.

Building a bad event raises ``LocalProtocolError``; the decoder wraps that into
``RemoteProtocolError`` when the bad values came from the peer. The enums here
are the values events carry on the wire (role, start position, close reason).
"""

from __future__ import annotations

import enum
import fnmatch
from dataclasses import dataclass
from typing import Final

from ..audio import AudioFormat
from ..errors import ErrorCode, LocalProtocolError


class Role(enum.IntEnum):
    """What a client declares itself to be in HELLO."""

    PUBLISHER = 1
    SUBSCRIBER = 2
    OBSERVER = 3  # asks for status only

    @property
    def label(self) -> str:
        """Lower-case name (``"publisher"``), the value of metrics' ``role`` label."""
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
    REFUSED = 4  # relay -> publisher: a stream cap was reached; the stream is not open


_U32_MAX: Final = (1 << 32) - 1
_U64_MAX: Final = (1 << 64) - 1
_I64_MIN: Final = -(1 << 63)
_I64_MAX: Final = (1 << 63) - 1


def _check_u(name: str, value: int, bits: int) -> None:
    if not 0 <= value < (1 << bits):
        raise LocalProtocolError(f"{name}={value} does not fit in u{bits}")


@dataclass(frozen=True, slots=True)
class Hello:
    """Client -> relay, first frame: who is speaking and in which role.

    ``client_name`` is at most ``Limits.max_name_length`` bytes of UTF-8 (the
    relay enforces it). ``instance`` identifies one run of a publisher: a random
    u64 drawn per process start, the same on all its reconnects; 0 means none
    (HELLO flag bit 0 clear). Raises LocalProtocolError for a role that is not a
    ``Role`` or an instance that is not a u64.
    """

    role: Role
    client_name: str
    token: str = ""  # empty means none
    instance: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.role, Role):
            raise LocalProtocolError(f"unknown role {self.role!r}")
        _check_u("instance", self.instance, 64)


@dataclass(frozen=True, slots=True)
class Welcome:
    """Relay -> client, the answer to HELLO: the session is open.

    ``heartbeat_interval_ms`` (> 0) is how often each side must send something
    (the client's transport declares the relay dead after 3 intervals of
    silence); ``max_frame_size`` is the relay's ``Limits.max_frame_size`` in
    bytes; ``replay_window_ms`` how much audio the relay keeps per stream.
    All three are u32; raises LocalProtocolError otherwise.
    """

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
    """Declares a stream's id (u32, chosen by the sender, per connection), name
    (non-empty UTF-8) and audio format on this connection. Chunks then refer
    to the stream by id only. Raises LocalProtocolError for a bad id or name."""

    stream_id: int
    name: str
    format: AudioFormat

    def __post_init__(self) -> None:
        _check_u("stream_id", self.stream_id, 32)
        if not self.name:
            raise LocalProtocolError("stream name must not be empty")


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    """Relay -> publisher: send this stream from ``next_seq`` (u64) on; the relay
    already holds every earlier sequence number (or never will)."""

    stream_id: int
    next_seq: int

    def __post_init__(self) -> None:
        _check_u("stream_id", self.stream_id, 32)
        _check_u("next_seq", self.next_seq, 64)


@dataclass(frozen=True, slots=True)
class ChunkData:
    """One CHUNK: ``payload`` is PCM audio, a whole number of frames of the
    stream's format (little-endian samples, channels interleaved); ``seq`` is
    the stream's sequence number (u64, +1 per chunk); ``captured_ns`` the
    capture time of the first sample, wall clock in nanoseconds (i64).
    Raises LocalProtocolError for values that do not fit their wire types."""

    stream_id: int
    seq: int
    captured_ns: int
    payload: bytes

    def __post_init__(self) -> None:
        # One chained comparison on the per-chunk path (every decoded CHUNK is
        # built here); the field-by-field checks only find which value is bad.
        if not (
            0 <= self.stream_id <= _U32_MAX
            and 0 <= self.seq <= _U64_MAX
            and _I64_MIN <= self.captured_ns <= _I64_MAX
        ):
            _check_u("stream_id", self.stream_id, 32)
            _check_u("seq", self.seq, 64)
            raise LocalProtocolError("captured_ns does not fit in i64")


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Subscriber -> relay: the streams wanted and where to start.

    ``pattern`` is an ``fnmatch`` pattern over stream names (case-sensitive);
    ``group`` empty means fan-out, otherwise the relay shares the matching
    streams among the group's members; ``resume`` holds (stream name, last seq
    seen) pairs, at most ``Limits.max_resume_entries`` of them, from which the
    relay continues at seq + 1. Raises LocalProtocolError for an empty pattern,
    an unknown start position or a bad resume entry.
    """

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
        """Whether stream name ``stream`` matches ``pattern`` (fnmatch, case-sensitive)."""
        return fnmatch.fnmatchcase(stream, self.pattern)


@dataclass(frozen=True, slots=True)
class Ack:
    """Group member -> relay: ``stream_id`` processed up to and including ``seq``;
    a new owner of the stream resumes after it."""

    stream_id: int
    seq: int

    def __post_init__(self) -> None:
        _check_u("stream_id", self.stream_id, 32)
        _check_u("seq", self.seq, 64)


@dataclass(frozen=True, slots=True)
class CloseStream:
    """Either way: stream ``stream_id`` ends on this connection, for ``reason``."""

    stream_id: int
    reason: CloseReason = CloseReason.ENDED

    def __post_init__(self) -> None:
        _check_u("stream_id", self.stream_id, 32)
        if not isinstance(self.reason, CloseReason):
            raise LocalProtocolError(f"unknown close reason {self.reason!r}")


@dataclass(frozen=True, slots=True)
class Ping:
    """Heartbeat; the peer answers PONG with the same ``nonce`` (u64)."""

    nonce: int

    def __post_init__(self) -> None:
        _check_u("nonce", self.nonce, 64)


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to PING, echoing its ``nonce`` (u64); gives the round-trip time."""

    nonce: int

    def __post_init__(self) -> None:
        _check_u("nonce", self.nonce, 64)


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """Observer or subscriber -> relay: send a STATUS report."""


@dataclass(frozen=True, slots=True)
class Status:
    """The relay's status report, as a JSON document (UTF-8)."""

    document: str


@dataclass(frozen=True, slots=True)
class Goodbye:
    """Either way: the sender ends the session (``code`` NORMAL or SHUTTING_DOWN
    usually). An unknown numeric code is kept as ``ErrorCode.INTERNAL``."""

    code: ErrorCode = ErrorCode.NORMAL
    message: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.code, ErrorCode):
            object.__setattr__(self, "code", _error_code(self.code))


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """Either way: the sender ends the session because of an error (``code``
    says which, ``message`` in one sentence). Unknown codes become INTERNAL."""

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
    """Type of ``NEED_DATA``: ``Connection.next_event`` has no complete frame
    buffered; feed more bytes with ``receive_data`` (or ``receive_eof``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


class EndOfStream:
    """Type of ``END_OF_STREAM``: the peer closed the byte stream cleanly, between
    frames (after ``Connection.receive_eof``); no event will ever follow."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "END_OF_STREAM"


END_OF_STREAM: Final = EndOfStream()
