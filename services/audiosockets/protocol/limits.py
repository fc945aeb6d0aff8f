"""Hard limits of one connection, fixed at construction.

The defaults are the numbers ``services/PROTOCOL.md`` documents (a test keeps
the two in step); a relay or client may lower or raise them per connection.
"""

from __future__ import annotations

from dataclasses import dataclass


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
