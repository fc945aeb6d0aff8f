"""Wire protocol v1: a sans-I/O codec and connection state machine.

Bytes in, events out; events in, bytes out. Nothing here touches a socket,
a clock or an event loop (a test checks the imports), so every rule of the
protocol is testable byte by byte. ``transport.py`` is the one adapter that
moves these bytes over asyncio streams. The format is documented for humans in
``services/PROTOCOL.md``; keep the two in step.

Modules:
- ``limits``: ``Limits``, the per-connection hard limits.
- ``events``: the event dataclasses and the enums they carry.
- ``frames``: the frame header, ``encode``, ``decode_payload``, ``FrameDecoder``.
- ``connection``: ``Connection``, the per-session state machine.
- ``boundary``: ``FrameBoundary``, where the last complete frame ends in
  bytes not yet parsed (the relay charges its input budget with the rest).

Invariants:
- Every frame is an 8-byte header (magic ``AS``, version, type, payload
  length) and a payload of at most ``Limits.max_frame_size`` bytes. The length
  is checked before the payload is buffered, so a hostile length cannot make
  us allocate.
- Anything the peer gets wrong raises ``RemoteProtocolError`` carrying an
  ``ErrorCode``; anything we get wrong raises ``LocalProtocolError``. No other
  exception escapes ``next_event`` (a property test holds us to it).
"""

from __future__ import annotations

from .boundary import FrameBoundary
from .connection import Connection, Side, State
from .events import (
    END_OF_STREAM,
    NEED_DATA,
    Ack,
    ChunkData,
    CloseReason,
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
    StartPosition,
    Status,
    StatusRequest,
    StreamAccepted,
    Subscribe,
    Welcome,
)
from .frames import (
    CHUNK_HEAD,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    FrameDecoder,
    FrameType,
    ReceivedChunk,
    decode_payload,
    encode,
    encode_chunk,
)
from .limits import Limits

__all__ = [
    "CHUNK_HEAD",
    "END_OF_STREAM",
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "Ack",
    "ChunkData",
    "CloseReason",
    "CloseStream",
    "Connection",
    "EndOfStream",
    "ErrorFrame",
    "Event",
    "FrameBoundary",
    "FrameDecoder",
    "FrameType",
    "Goodbye",
    "Hello",
    "Limits",
    "NeedData",
    "OpenStream",
    "Ping",
    "Pong",
    "ReceivedChunk",
    "Role",
    "Side",
    "StartPosition",
    "State",
    "Status",
    "StatusRequest",
    "StreamAccepted",
    "Subscribe",
    "Welcome",
    "decode_payload",
    "encode",
    "encode_chunk",
]
