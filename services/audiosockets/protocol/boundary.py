"""Where the last complete frame ends in a byte stream, followed as bytes arrive.

A receiver that holds bytes it has not parsed yet (the relay's stream readers,
when its loop is starved) needs to tell complete frames, which its own tasks
will take, from the tail of a frame still in flight, which only the peer can
finish: the relay's input budget charges only the latter. ``FrameBoundary``
reads nothing but each frame's length field, once per frame, and copies no
payload: at most the 7 bytes of a header split across two arrivals.

State: ``received`` (bytes fed), ``complete`` (the stream offset where the last
complete frame ends) and, once its header is whole, where the frame beginning
there ends. It validates nothing: ``FrameDecoder`` refuses a bad header when it
reaches it, and until then the garbage counts as a frame not yet complete.
"""

from __future__ import annotations

import struct
from typing import Final

from .frames import HEADER_SIZE

_LENGTH: Final = struct.Struct(">I")  # the header's payload length...
_LENGTH_AT: Final = 4  # ...after magic (2), version (1) and type (1)


class FrameBoundary:
    """Follows the frame boundaries of one byte stream, from its first byte.

    ``feed`` every byte received, in order and in any split; ``incomplete`` is
    then what lies after the last complete frame (bytes), ``announced`` the
    payload length the incomplete frame's header gave (0 until it is whole).
    """

    __slots__ = ("_end", "_head", "complete", "received")

    def __init__(self) -> None:
        self.received = 0  # bytes fed so far
        self.complete = 0  # stream offset where the last complete frame ends
        self._end = -1  # where the frame beginning at ``complete`` ends; -1: header not whole
        self._head = b""  # that header's first bytes, when it straddles two feeds

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Note ``data``, the stream's next bytes; returns ``incomplete``.
        One length unpack per frame whose header ends in ``data``; never raises."""
        start = self.received
        received = start + len(data)
        self.received = received
        complete = self.complete
        end = self._end
        if end < 0:  # the header of the frame at ``complete`` was not whole
            head = self._head
            if head:  # it began in an earlier piece
                head += bytes(data[: HEADER_SIZE - len(head)])
                if len(head) < HEADER_SIZE:
                    self._head = head
                    return received - complete
                self._head = b""
                end = complete + HEADER_SIZE + _LENGTH.unpack_from(head, _LENGTH_AT)[0]
            elif received - complete >= HEADER_SIZE:
                at = complete - start + _LENGTH_AT
                end = complete + HEADER_SIZE + _LENGTH.unpack_from(data, at)[0]
            else:
                self._head = bytes(data[complete - start :])
                return received - complete
        # The hot loop: each frame that ends in ``data`` with a whole header after it.
        unpack = _LENGTH.unpack_from
        size = HEADER_SIZE
        at = _LENGTH_AT - start  # + a stream offset: where its length field is in ``data``
        last = received - size  # the last offset a whole header can begin at
        while end <= last:
            complete = end
            end = complete + size + unpack(data, complete + at)[0]
        if end <= received:  # a frame ends here, and the next header is not whole
            complete = end
            end = -1
            if complete < received:
                self._head = bytes(data[complete - start :])
        self.complete = complete
        self._end = end
        return received - complete

    @property
    def incomplete(self) -> int:
        """Bytes received after the last complete frame: the frame in flight."""
        return self.received - self.complete

    @property
    def announced(self) -> int:
        """Payload bytes the header of the frame in flight announced (0: none yet)."""
        return self._end - self.complete - HEADER_SIZE if self._end >= 0 else 0
