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
