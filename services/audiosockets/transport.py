"""The one I/O adapter: protocol v1 over asyncio streams.

``Channel`` owns a ``StreamReader``/``StreamWriter`` pair and a sans-I/O
``protocol.Connection``. It reads bytes into the connection and yields
events, answers PING with PONG, sends a PING when it has been quiet for a
heartbeat interval, and declares the peer dead when nothing at all arrived for
``heartbeat_timeout`` while it was waiting to read. Waiting to read is the
only time the peer's silence counts: a consumer that stops reading on purpose
(backpressure) does not time its peer out.

A frame once begun must be complete within ``frame_timeout`` (when given):
trickling a byte now and then keeps a connection alive, not a half-sent
frame. What is received of frames not yet complete is reported to an
``InputAccount`` (the relay's relay-wide budget) as it arrives, which may
``cut`` this or another channel; a cut channel ends with the
``RemoteProtocolError`` it was given, from wherever its reader is waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol, SupportsIndex

from .errors import (
    ConnectionClosed,
    ErrorCode,
    RemoteProtocolError,
)
from .protocol import (
    ChunkData,
    Connection,
    EndOfStream,
    ErrorFrame,
    Event,
    FrameBoundary,
    Goodbye,
    NeedData,
    Ping,
    Pong,
    ReceivedChunk,
)

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
Clock = Callable[[], float]


def tune_socket(writer: asyncio.StreamWriter, *, sndbuf: int = 0, rcvbuf: int = 0) -> None:
    """Small frames must leave at once: disable Nagle (the seed's 44 ms floor).

    ``sndbuf``/``rcvbuf`` cap the kernel buffers. Audio sitting in a kernel
    buffer is invisible to our bounded queues and drop counters, and Linux
    autotunes loopback buffers to megabytes, so real-time paths keep them small.
    """
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if sndbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            if rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)


class InputAccount(Protocol):
    """Where channels report the bytes they hold of incomplete frames."""

    def hold(self, channel: Channel, nbytes: int) -> None:
        """``channel`` now holds ``nbytes`` (0: nothing, it may be forgotten)."""


class AccountedReader(asyncio.StreamReader):
    """A ``StreamReader`` that reports what it holds of frames not yet
    complete the moment bytes arrive.

    asyncio reads up to 256 KiB per socket per loop iteration into each
    reader before any task runs. This reader follows its stream's frame
    boundaries (``FrameBoundary``) and tells the ``InputAccount`` at once what
    lies after the last complete frame (here or in its ``owner`` channel's
    codec), so a budget can cut a hoarder before the next socket is read.
    Complete frames a starved loop has not read yet are not charged: past
    ``2 * limit`` unread bytes the reader pauses its socket (backpressure).
    """

    def __init__(self, limit: int, account: InputAccount) -> None:
        super().__init__(limit=limit)
        self.account = account
        self.owner: Channel | None = None
        self.pending = 0  # bytes received and not yet read
        self.frames = FrameBoundary()  # every byte received, complete frames or not
        self._charged = 0  # what ``account`` was last told

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        super().feed_data(data)
        self.pending += len(data)  # type: ignore[arg-type]  # bytes from the protocol
        if self.frames.feed(data) != self._charged:  # type: ignore[arg-type]
            self.charge()

    def charge(self) -> None:
        """Tell the account what the owner holds of frames not yet complete
        (not before it has an owner, nor once that is closed)."""
        owner = self.owner
        if owner is not None and not owner.closed:
            self._charged = self.frames.incomplete
            self.account.hold(owner, self._charged)

    async def read(self, n: int = -1) -> bytes:
        data = await super().read(n)
        self.pending -= len(data)
        return data

    def discard(self) -> None:
        """Free what was received and not read, now: the connection is being
        cut, and its bytes must not outlive the budget's decision until its
        task next runs. (StreamReader keeps them in ``_buffer``.)"""
        self._buffer = bytearray()
        self.pending = 0
        self._charged = 0


#: Connections the kernel queues before a server accepts them (capped by somaxconn):
#: a thousand microphones reconnect at once after a relay restart, and asyncio's
#: default of 100 drops their SYNs into retries and connect timeouts.
LISTEN_BACKLOG = 4096


async def start_accounted_server(
    on_connect: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    host: str,
    port: int,
    account: InputAccount,
    *,
    limit: int = 64 << 10,
    backlog: int = LISTEN_BACKLOG,
    sock: socket.socket | None = None,
) -> asyncio.Server:
    """``asyncio.start_server`` with an ``AccountedReader`` per connection
    (``limit``: bytes a reader buffers before it pauses the socket; ``backlog``:
    connections the kernel queues before they are accepted). With ``sock`` (an
    already bound listening socket, e.g. dual-stack ``::``), ``host`` and
    ``port`` are not used."""
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.StreamReaderProtocol:
        return asyncio.StreamReaderProtocol(AccountedReader(limit, account), on_connect)

    if sock is not None:
        return await loop.create_server(factory, sock=sock, backlog=backlog)
    return await loop.create_server(factory, host, port, backlog=backlog)


class WriteBufferFull(ConnectionClosed):
    """The peer stopped reading and what we queued for it passed the
    channel's ``max_write_buffer``: the session cannot go on without holding
    unbounded memory for it."""


class Pings:
    """A channel's PINGs in flight: the heartbeat's (its round trip is ``rtt``,
    seconds of ``clock``) and ``round_trip`` waiters, each PONG matched by nonce."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._nonce = itertools.count(1)
        self._sent_at: dict[int, float] = {}  # the latest heartbeat PING only
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self.rtt: float | None = None

    def _next(self) -> int:
        return next(self._nonce) & 0xFFFF_FFFF_FFFF_FFFF

    def heartbeat(self) -> Ping:
        """A heartbeat PING to send now; its PONG sets ``rtt``."""
        nonce = self._next()
        self._sent_at = {nonce: self._clock()}
        return Ping(nonce)

    def round_trip(self) -> tuple[Ping, asyncio.Future[None]]:
        """A PING to send and the future its PONG completes."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        nonce = self._next()
        self._waiters[nonce] = waiter
        return Ping(nonce), waiter

    def answered(self, nonce: int) -> None:
        """A PONG with ``nonce`` arrived."""
        sent = self._sent_at.pop(nonce, None)
        if sent is not None:
            self.rtt = self._clock() - sent
        waiter = self._waiters.pop(nonce, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail_all(self, error: ConnectionClosed) -> None:
        """The channel closed: every round trip still waiting fails with ``error``."""
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            if not waiter.done():
                waiter.set_exception(error)


class Channel:
    """A framed, heartbeated session over one TCP connection.

    ``frame_timeout``: seconds a frame may take from its first byte to its
    last (None: no limit); ``input_account``: where its ``AccountedReader``
    charges its bytes of frames not yet complete (told 0 once it closes).
    ``max_write_buffer`` (bytes, 0: no limit) bounds what ``send`` may leave
    queued for a peer that does not read (replies such as PONG and STATUS):
    past it ``send`` raises ``WriteBufferFull`` instead of queueing more.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: Connection,
        *,
        heartbeat_interval: float = 2.0,
        heartbeat_timeout: float = 6.0,
        clock: Clock = time.monotonic,
        frame_timeout: float | None = None,
        input_account: InputAccount | None = None,
        max_write_buffer: int = 0,
    ) -> None:
        self.reader = reader
        self.max_write_buffer = max_write_buffer
        self.writer = writer
        self.conn = conn
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.clock = clock  # monotonic seconds
        self.last_sent = clock()  # when we last wrote a frame
        self._heartbeat: asyncio.Task[None] | None = None
        self.closed = False
        self.bytes_received = 0
        self.pings = Pings(clock)  # our PINGs in flight: rtt, round trips
        self.frame_timeout = frame_timeout
        self._input_account = input_account
        self._frame_began: float | None = None  # when the pending frame's first byte came
        self._frame_number = -1  # frames_received when that was
        self._looked_at = -2  # the frame given a last look after its deadline
        self._cut: RemoteProtocolError | None = None
        if isinstance(reader, AccountedReader):
            reader.owner = self
            reader.charge()  # what came before its owner
        self._pings = 0  # PINGs answered
        self._yield_due = False  # poll_event asks next_event to yield the loop once
        self._watchdog = _SilenceWatchdog(self)
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    # -- sending -------------------------------------------------------------

    def send(self, event: Event) -> None:
        """Encode ``event`` through the codec and write it (no drain).

        Raises LocalProtocolError when the codec refuses the event, and
        ``WriteBufferFull`` when ``max_write_buffer`` is set and more than that
        is already queued (nothing is written then); writes nothing once the
        channel is closed.
        """
        limit = self.max_write_buffer
        if limit and not self.closed and self.write_buffer_size > limit:
            raise WriteBufferFull(
                f"{self.peer} does not read: more than {limit} bytes queued for it",
                ErrorCode.INTERNAL,
            )
        data = self.conn.send(event)
        self.write(data)

    def write(self, data: bytes) -> None:
        """Write pre-encoded frames (must be valid for this session)."""
        if self.closed:
            return
        self.writer.write(data)
        self.last_sent = self.clock()

    def writelines(self, frames: Iterable[bytes]) -> None:
        """Write several pre-encoded frames in one call (no drain); nothing once closed."""
        if self.closed:
            return
        self.writer.writelines(frames)
        self.last_sent = self.clock()

    @property
    def write_buffer_size(self) -> int:
        """Bytes written but not yet handed to the kernel (0 once closing)."""
        transport = self.writer.transport
        return 0 if transport.is_closing() else transport.get_write_buffer_size()

    async def drain(self) -> None:
        """Wait until the write buffer is below asyncio's high-water mark.

        Raises ConnectionClosed when the connection is lost meanwhile.
        """
        try:
            await self.writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise ConnectionClosed(f"connection to {self.peer} lost: {exc}") from exc

    # -- receiving -----------------------------------------------------------

    async def next_event(self) -> Event:
        """The next event from the peer. PING/PONG are handled here.

        Raises ConnectionClosed on EOF or heartbeat timeout, and
        RemoteProtocolError when the peer breaks the protocol.
        """
        while (event := self.poll_event()) is None:
            if self._yield_due:
                self._yield_due = False
                await asyncio.sleep(0)  # a PING flood does not keep the loop
            else:
                await self._read()
        return event

    def poll_event(self) -> Event | None:
        """The next event among the bytes already received, or None: never reads.

        Lets a reader take every event of one read without an await per event
        (None also after every 32nd PING, so that ``next_event`` yields the
        loop). PING/PONG are handled here; raises as ``next_event``.
        """
        while True:
            event = self.conn.next_event()
            if type(event) is ChunkData:  # nearly every event: no further tests
                return event
            if isinstance(event, NeedData):
                return None
            if isinstance(event, EndOfStream):
                raise ConnectionClosed(f"{self.peer} closed the connection")
            if isinstance(event, Ping):
                if not self.closed:
                    self.send(Pong(event.nonce))
                self._pings += 1
                if self._pings % 32 == 0:
                    self._yield_due = True
                    return None
                continue
            if isinstance(event, Pong):
                self.pings.answered(event.nonce)
                continue
            return event

    def poll_chunks(self, limit: int) -> list[ReceivedChunk]:
        """Up to ``limit`` CHUNKs in a row already received, as ``(stream id, seq,
        captured_ns, audio)`` (``Connection.next_chunks``); never reads. ``[]``
        when the next frame is anything else: ``poll_event`` takes that one."""
        return self.conn.next_chunks(limit)

    @property
    def pending_frame_length(self) -> int:
        """Payload bytes the header of the frame in flight announced (0: none)."""
        frames = getattr(self.reader, "frames", None)
        return self.conn.pending_frame_length if frames is None else int(frames.announced)

    def cut(self, error: RemoteProtocolError) -> None:
        """End this channel with ``error``: its reader raises it as soon as it
        runs (a budget decided this channel holds too much); nothing more is
        read from its socket meanwhile."""
        if self._cut is None:
            self._cut = error
            transport = self.writer.transport
            if isinstance(transport, asyncio.ReadTransport):
                with contextlib.suppress(Exception):
                    transport.pause_reading()
            if isinstance(self.reader, AccountedReader):
                self.reader.discard()
            # Its bytes go now, not when its task next runs: a budget that cuts
            # many connections in one loop iteration must see their memory go.
            self.conn.discard_input()
            self.reader.feed_eof()  # wake a pending read

    async def _read(self) -> None:
        if self._cut is not None:
            raise self._cut
        timeout = self.heartbeat_timeout
        frame_deadline = None
        if self.frame_timeout is not None and self.conn.buffered:
            received = self.conn.frames_received
            if self._frame_began is None or self._frame_number != received:
                self._frame_began = self.clock()
                self._frame_number = received
            frame_deadline = self._frame_began + self.frame_timeout
            timeout = min(timeout, max(0.0, frame_deadline - self.clock()))
        else:
            self._frame_began = None
        try:
            if frame_deadline is None:
                data = await self._watchdog.read()
            else:
                async with asyncio.timeout(timeout):
                    data = await self.reader.read(READ_SIZE)
        except TimeoutError:
            if frame_deadline is not None and self.clock() >= frame_deadline - 1e-3:
                data = await self._last_look()
            else:
                raise ConnectionClosed(
                    f"no data from {self.peer} for {self.heartbeat_timeout:g} s",
                    ErrorCode.HEARTBEAT_TIMEOUT,
                ) from None
        except (ConnectionError, OSError) as exc:
            raise ConnectionClosed(f"connection to {self.peer} lost: {exc}") from exc
        if self._cut is not None:
            raise self._cut
        if data:
            self.bytes_received += len(data)
            self.conn.receive_data(data)  # the reader charged these bytes on arrival
        else:
            # The codec decides whether the stream ended cleanly or mid-frame.
            self.conn.receive_eof()

    async def _last_look(self) -> bytes:
        """The frame's deadline passed. A loop starved for longer than that may
        not have looked at the socket yet, so look once (per frame) before
        blaming the peer; raises ``RemoteProtocolError`` (``frame_timeout``)
        when nothing more arrived."""
        if self._frame_number != self._looked_at:
            self._looked_at = self._frame_number
            await asyncio.sleep(0)  # one loop iteration: the selector reads the socket
            if getattr(self.reader, "pending", 0) > 0 and self._cut is None:
                return await self.reader.read(READ_SIZE)
        raise RemoteProtocolError(
            f"frame not completed within {self.frame_timeout:g} s of its first byte "
            f"({self.conn.buffered} bytes of it arrived)",
            ErrorCode.MALFORMED_FRAME,
            "frame_timeout",
        )

    # -- heartbeats ----------------------------------------------------------

    def start_heartbeat(self) -> None:
        """Start sending PING after ``heartbeat_interval`` seconds without sending; idempotent."""
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(
                _send_heartbeats(self), name=f"heartbeat {self.peer}"
            )

    # -- closing -------------------------------------------------------------

    def round_trip(self) -> asyncio.Future[None]:
        """Send a PING now; the future completes when its PONG arrives.

        The peer answers a PING after everything sent before it, so a completed
        round trip means the peer has handled all of that (a publisher's flush
        uses it: the relay took every chunk). The future fails with
        ``ConnectionClosed`` if the channel closes first. The PONG is only seen
        while someone reads (``next_event``).
        """
        ping, waiter = self.pings.round_trip()
        if self.closed:
            self.pings.fail_all(ConnectionClosed(f"connection to {self.peer} is closed"))
        else:
            self.send(ping)
        return waiter

    @property
    def rtt(self) -> float | None:
        """Seconds of the last heartbeat PING's round trip (None before one)."""
        return self.pings.rtt

    async def close(
        self, farewell: Goodbye | ErrorFrame | None = None, *, timeout: float = 1.0
    ) -> None:
        """Send ``farewell`` (if the session is still open), flush briefly, close."""
        if self.closed:
            return
        if farewell is not None:
            with contextlib.suppress(Exception):
                self.writer.write(self.conn.send(farewell))
        self.closed = True
        if self._input_account is not None:
            self._input_account.hold(self, 0)
        self.pings.fail_all(ConnectionClosed(f"connection to {self.peer} closed"))
        self._stop_timers()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                await self.writer.drain()
        self.writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                await self.writer.wait_closed()

    def abort(self) -> None:
        """Drop the connection at once (no farewell)."""
        self.closed = True
        if self._input_account is not None:
            self._input_account.hold(self, 0)
        self.pings.fail_all(ConnectionClosed(f"connection to {self.peer} closed"))
        self._stop_timers()
        self.writer.transport.abort()

    def _stop_timers(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self._watchdog.stop()


async def _send_heartbeats(channel: Channel) -> None:
    """PING after ``heartbeat_interval`` seconds in which ``channel`` sent nothing,
    until it closes. A timer, not a poll: it sleeps for exactly the quiet time left."""
    while not channel.closed:
        quiet = channel.clock() - channel.last_sent
        if quiet >= channel.heartbeat_interval:
            try:
                channel.send(channel.pings.heartbeat())
            except Exception:  # the session closed under us
                return
            quiet = 0.0
        await asyncio.sleep(channel.heartbeat_interval - quiet)


class _SilenceWatchdog:
    """A channel's heartbeat timeout for the usual read (no frame half-received):
    a read that waits ``heartbeat_timeout`` seconds ends the session.

    One timer per channel, re-armed only when it fires during a read that began
    later: ``asyncio.timeout`` around every read cost a timer, a heap entry and a
    cancellation per read (6 µs on the loaded dev machine; the relay reads once
    per chunk per publisher). Only waiting counts: a channel whose owner is not
    reading (backpressure) is never timed out.

    Only silence the loop could have heard counts. When the timer fires more
    than ``STALL_SECONDS`` late, the process itself was not running (SIGSTOP, a
    swapped-out or starved host, a long collection): whatever a live peer sent
    meanwhile (its PINGs at least) is still unread in the socket, and the loop
    reads it in its next iteration. So the timer looks once more after a grace of
    ``min(STALL_SECONDS, heartbeat_timeout)``, once per read: a loop that stays
    slow cannot keep a dead peer's session open. A timer that finds bytes
    received and not yet read does not fire either.
    """

    #: Lateness (seconds) of the timer that marks a stalled loop rather than a
    #: busy one: a loaded 2-core host runs timers up to a few hundred ms late.
    STALL_SECONDS = 1.0

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._started: float | None = None  # loop time the pending read began
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0  # loop time the timer is due
        self._forgave = False  # this read already had its grace after a stall

    def _arm(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self._due = loop.time() + delay
        self._timer = loop.call_later(delay, self._check)

    async def read(self) -> bytes:
        channel = self._channel
        loop = asyncio.get_running_loop()
        self._started = loop.time()
        self._forgave = False
        if self._timer is None:
            self._arm(loop, channel.heartbeat_timeout)
        try:
            return await channel.reader.read(READ_SIZE)
        finally:
            self._started = None

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        channel = self._channel
        if self._started is None or channel.closed:
            return  # not waiting to read: the next read arms the timer again
        loop = asyncio.get_running_loop()
        now = loop.time()
        if getattr(channel.reader, "pending", 0) > 0:
            # The peer's bytes are here; the read has not woken yet.
            self._started = now
            self._arm(loop, channel.heartbeat_timeout)
            return
        if now - self._due > self.STALL_SECONDS and not self._forgave:
            # Stalled: look again once the loop has read the socket.
            self._forgave = True
            self._arm(loop, min(self.STALL_SECONDS, channel.heartbeat_timeout))
            return
        waited = now - self._started
        if waited >= channel.heartbeat_timeout:
            # The pending read raises this (StreamReader hands it to its waiter).
            channel.reader.set_exception(
                ConnectionClosed(
                    f"no data from {channel.peer} for {channel.heartbeat_timeout:g} s",
                    ErrorCode.HEARTBEAT_TIMEOUT,
                )
            )
        else:
            self._arm(loop, channel.heartbeat_timeout - waited)
