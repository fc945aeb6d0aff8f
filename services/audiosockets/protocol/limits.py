"""Hard limits of one connection, fixed at construction.

The defaults are the numbers ``services/PROTOCOL.md`` documents (a test keeps
the two in step); a relay or client may lower or raise them per connection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """Hard limits, fixed per connection at construction.

    - ``max_frame_size``: payload bytes of one frame (header excluded), 64 to
      2**32-1. 1 MiB holds a CHUNK of over 5 s of 48 kHz stereo int16 audio.
    - ``max_name_length``: UTF-8 bytes of a stream, client or group name or a
      pattern, 1 to 65535 (strings are u16-length-prefixed on the wire).
    - ``max_streams``: streams declared on one connection, per direction.
    - ``max_resume_entries``: (stream, seq) pairs in one SUBSCRIBE.
    - ``handshake_timeout``: seconds from connect to WELCOME; enforced by the
      I/O adapter (``client.handshake.connect``), not by the sans-I/O codec.
    - ``max_chunk_seconds``: audio one CHUNK may carry, in seconds of its
      stream's declared format (so a CHUNK of a 16 kHz mono int16 stream is at
      most 64,000 bytes of PCM by default); the recorder's longest block is
      1 s. At least 4 KiB of PCM is always allowed (very low rates);
      ``max_frame_size`` still applies on top.

    Raises ValueError for a value outside its range.
    """

    max_frame_size: int = 1 << 20  # payload bytes; a chunk's audio must fit
    max_name_length: int = 200  # UTF-8 bytes of a stream, client or group name
    max_streams: int = 4096  # streams declared on one connection
    max_resume_entries: int = 4096
    handshake_timeout: float = 5.0  # seconds; enforced by the I/O adapter
    max_chunk_seconds: float = 2.0  # audio in one CHUNK, by its stream's format

    def __post_init__(self) -> None:
        if not 64 <= self.max_frame_size <= 0xFFFF_FFFF:
            raise ValueError("max_frame_size must be between 64 and 2**32-1")
        if not 1 <= self.max_name_length <= 0xFFFF:
            raise ValueError("max_name_length must be between 1 and 65535")
        if not self.handshake_timeout > 0:  # not "<= 0": nan must fail too
            raise ValueError("handshake_timeout must be positive")
        if not 0 < self.max_chunk_seconds < math.inf:
            raise ValueError("max_chunk_seconds must be a positive finite number")
