"""Audio in flight to one subscriber: written by the relay, not yet taken by
the subscriber's host.

A subscriber that stops reading does not stop the relay from writing: the
batches pile up in the transport's buffer and the kernel's send queue, where
no queue bound or drop counter of ours sees them, and the subscriber gets
audio tens of seconds old when it reads again. ``InFlight`` measures that
hidden queue in seconds of audio: every batch written is recorded with the
audio it carries, and what the peer's TCP stack acknowledged (bytes written
minus the transport's buffer minus the kernel's unacknowledged send queue,
``SIOCOUTQ``) is taken off. The writer sends nothing more while the audio in
flight exceeds ``RelayConfig.max_inflight_seconds``; what it holds back ages
in the window and is dropped as ``subscriber_slow`` after ``queue_seconds``,
counted as it is skipped. The peer's own receive buffer is the peer's: the
library subscriber keeps it small (``socket_buffer_bytes``) and counts its
own drops.

The kernel also knows before the event loop when the peer has closed the
connection (``peer_closed``): a session closed while the relay could not read
is not charged for what its client's next session resumes.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
import termios
from collections import deque

from ..transport import Channel


def unacknowledged_bytes(channel: Channel) -> int:
    """Bytes written to ``channel`` that its peer has not acknowledged yet:
    asyncio's write buffer plus the kernel's send queue (``SIOCOUTQ``, 0 where
    it cannot be read)."""
    queued = channel.write_buffer_size
    sock = channel.writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
            queued += struct.unpack("i", raw)[0]
    return queued


#: ``tcpi_state`` of a connection both ends still hold (linux/include/net/tcp_states.h).
_TCP_ESTABLISHED = 1


def peer_closed(channel: Channel) -> bool:
    """Whether the TCP peer of ``channel`` has ended the connection (its FIN
    or RST reached the kernel), even if the relay has not yet read up to it.

    The event loop learns of a close only when it reads past what the peer
    sent before it, and a write into the half-closed socket still succeeds
    meanwhile; the kernel knows at once: the connection has left
    ``ESTABLISHED`` (Linux ``TCP_INFO``). False where that cannot be asked
    (not TCP, not Linux); True when the socket is already gone.
    """
    sock = channel.writer.get_extra_info("socket")
    tcp_info = getattr(socket, "TCP_INFO", None)
    if sock is None or tcp_info is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 1)[0]
    except OSError:
        return True
    except (AttributeError, ValueError, TypeError):  # a socket-like object that cannot say
        return False
    return bool(state != _TCP_ESTABLISHED)


class InFlight:
    """The audio written to one subscriber and not yet acknowledged.

    ``record(nbytes, seconds, now)`` after each batch written (``seconds``:
    the most audio of any one stream in it; ``now``: the relay clock);
    ``seconds()`` is the audio still in flight, an upper bound for each
    stream; ``stalled(now, limit, grace)`` says whether the writer should
    wait: more than ``limit`` seconds of audio in flight, the oldest of it
    unacknowledged for more than ``grace`` seconds. A peer that reads acks
    within milliseconds, so a burst (a replay, a backlog) goes out at full
    speed; only a peer that stopped taking data is held back.
    """

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.written = 0  # bytes written, ever
        # (bytes written after it, its seconds of audio, relay clock when written)
        self._batches: deque[tuple[int, float, float]] = deque()
        self._seconds = 0.0

    def record(self, nbytes: int, seconds: float, now: float) -> None:
        self.written += nbytes
        if seconds > 0:
            self._batches.append((self.written, seconds, now))
            self._seconds += seconds

    def seconds(self) -> float:
        """Audio in flight now (s)."""
        acknowledged = self.written - unacknowledged_bytes(self.channel)
        batches = self._batches
        while batches and batches[0][0] <= acknowledged:
            self._seconds -= batches.popleft()[1]
        if not batches:
            self._seconds = 0.0  # no float drift left behind
        return self._seconds

    def stalled(self, now: float, limit: float, grace: float) -> bool:
        """Whether more than ``limit`` s of audio is in flight and the oldest
        of it was written more than ``grace`` s ago (relay clock)."""
        return self.seconds() > limit and now - self._batches[0][2] > grace
