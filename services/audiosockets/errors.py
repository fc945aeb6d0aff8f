"""Every error audiosockets raises on purpose, in one shallow hierarchy.

Lower layers' errors (OSError, ValueError from a parser, PortAudioError) are
translated at the boundary with ``raise ... from``; the CLI prints ``str(err)``
as one line and exits with the class's ``exit_code``.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Codes carried by ERROR and GOODBYE frames (see PROTOCOL.md)."""

    NORMAL = 0
    MALFORMED_FRAME = 1
    FRAME_TOO_LARGE = 2
    UNSUPPORTED_VERSION = 3
    HANDSHAKE_TIMEOUT = 4
    HEARTBEAT_TIMEOUT = 5
    UNAUTHORIZED = 6
    UNKNOWN_STREAM = 7
    BAD_FORMAT = 8
    NAME_TOO_LONG = 9
    UNEXPECTED_FRAME = 10
    REPLACED = 11
    SHUTTING_DOWN = 12
    INTERNAL = 13
    OVERLOADED = 14  # a session cap was reached at accept; retry later
    STREAM_IN_USE = 15  # a stream another publisher instance holds


class AudiosocketsError(Exception):
    """Base class: something the user can act on, said in one sentence."""

    exit_code = 1


class ConfigError(AudiosocketsError):
    """A flag, URL or environment variable has a value we cannot use."""

    exit_code = 2


class ProtocolError(AudiosocketsError):
    """The wire protocol was broken; ``code`` says how, ``reason`` is the
    ``audiosockets_protocol_errors_total`` label (the code's name in lower
    case unless a finer one is given, e.g. ``empty_chunk``)."""

    def __init__(
        self,
        message: str,
        code: ErrorCode = ErrorCode.MALFORMED_FRAME,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason or code.name.lower()


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow (our bug)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow (their bug)."""


class ConnectionClosed(AudiosocketsError):
    """The peer ended the session, with a GOODBYE/ERROR code or by vanishing."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.NORMAL) -> None:
        super().__init__(message)
        self.code = code


class Refused(AudiosocketsError):
    """The server refused what we asked for (token, role, stream, group, certificate,
    NATS credentials and permissions): a retry cannot help, the client ends with
    this sentence. ``code``: the relay's ERROR code (UNAUTHORIZED unless it said).
    Our relay's refusals are the subclass ``RelayRefused``."""

    exit_code = 1

    def __init__(self, message: str, code: ErrorCode = ErrorCode.UNAUTHORIZED) -> None:
        super().__init__(message)
        self.code = code


class RelayRefused(Refused):
    """The relay refused the session or a stream, and retrying cannot change that.

    ``exit_code`` is 2 when what we send is the problem (a name too long, a chunk
    larger than the relay's frame limit, a format it rejects), else 1 (a wrong
    token, a role, stream or group not allowed, a certificate refused, a stream
    another publisher holds).
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.UNAUTHORIZED) -> None:
        super().__init__(message, code)
        self.exit_code = 2 if code in CONFIGURATION_REFUSALS else 1


#: Refusals caused by what the client is configured to send: exit 2.
CONFIGURATION_REFUSALS = frozenset(
    {ErrorCode.NAME_TOO_LONG, ErrorCode.FRAME_TOO_LARGE, ErrorCode.BAD_FORMAT}
)
#: Codes in an ERROR/GOODBYE from the relay that no retry can change: the client ends.
FATAL_REFUSALS = CONFIGURATION_REFUSALS | {
    ErrorCode.UNAUTHORIZED,
    ErrorCode.STREAM_IN_USE,
    ErrorCode.UNSUPPORTED_VERSION,
}


class RelayUnreachable(AudiosocketsError):
    """The relay could not be reached (refused, timed out, name not resolved)."""

    exit_code = 3


class AddressInUse(AudiosocketsError):
    """The address to listen on is already taken by another program."""

    exit_code = 4


class DeviceError(AudiosocketsError):
    """An audio device is missing, busy or cannot do the requested format."""

    exit_code = 5


class HandlerError(AudiosocketsError):
    """A processor handler spec cannot be loaded, or the handler keeps failing."""

    exit_code = 6


class GateFailed(AudiosocketsError):
    """A load-test gate (--max-loss, --max-p99-ms) was breached."""

    exit_code = 7
