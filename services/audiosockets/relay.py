"""The relay: an asyncio server that fans audio out from publishers to subscribers.

Where the state lives:
- ``Relay.streams``: one ``StreamState`` per stream name, holding its format,
  its last sequence number and a ``ReplayWindow`` (the last
  ``replay_seconds`` of encoded CHUNK frames). Streams outlive their
  publisher's connection, so a reconnecting publisher or subscriber finds the
  window where it left it.
- ``SubscriberSession.cursors``: per subscriber and stream, the position of
  the next chunk to send. A subscriber never gets a private copy of the audio:
  its writer task reads frames out of the shared window. That makes replay and
  live delivery one code path, and a slow subscriber costs memory only in the
  window that exists anyway.
- ``Group``: members of one group share streams; ``assignment`` maps each
  stream to exactly one member, ``acked`` records the last sequence number the
  group has confirmed, where a new owner resumes after a handover.

Invariants:
- Publishing never waits on a subscriber: a chunk is appended to the window
  and subscribers' writers are woken; nothing else happens on the publisher's
  path.
- Every chunk a subscriber should get is either written to its socket or
  counted in ``audiosockets_chunks_dropped_total`` with a reason:
  ``subscriber_slow`` when it fell further behind than ``queue_seconds`` of
  live audio, ``replay_window_exceeded`` when what it needed was trimmed.
- A protocol error closes that one connection with an ERROR frame and bumps
  ``audiosockets_protocol_errors_total``; nothing else is touched.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hmac
import itertools
import json
import logging
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from . import __version__
from .audio import AudioFormat
from .errors import AddressInUse, ConnectionClosed, ErrorCode, RemoteProtocolError
from .metrics import CallbackCollector, Metrics
from .protocol import (
    Ack,
    ChunkData,
    CloseReason,
    CloseStream,
    Connection,
    ErrorFrame,
    Goodbye,
    Hello,
    Limits,
    OpenStream,
    Role,
    StartPosition,
    Status,
    StatusRequest,
    StreamAccepted,
    Subscribe,
    Welcome,
    encode_chunk,
)
from .transport import Channel, tune_socket
from .urls import RelayAddress

log = logging.getLogger(__name__)

Clock = Callable[[], float]

#: Connections the kernel queues before the relay accepts them (capped by somaxconn).
LISTEN_BACKLOG = 4096


@dataclass(frozen=True, slots=True)
class RelayConfig:
    host: str = "127.0.0.1"
    port: int = 7400
    replay_seconds: float = 30.0
    queue_seconds: float = 2.0
    heartbeat_interval: float = 2.0
    max_window_bytes: int = 256 << 20  # per stream, on top of replay_seconds
    max_batch_bytes: int = 256 << 10  # per write to one subscriber
    socket_buffer_bytes: int = 1 << 20  # kernel send buffer per connection (0: OS default)
    server_name: str = "audiosockets-relay"
    token: str = ""  # shared secret clients must present in HELLO; empty: none
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.replay_seconds < 0:
            raise ValueError("replay_seconds must be >= 0")
        if self.queue_seconds <= 0:
            raise ValueError("queue_seconds must be > 0")
        if self.heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be > 0")


class ReplayWindow:
    """The recent CHUNK frames of one stream, addressable by ordinal.

    Every appended chunk gets the next ordinal; ``base`` is the ordinal of
    the oldest one still held. Sequence numbers and arrival times are
    non-decreasing, so both can be searched with bisect.
    """

    __slots__ = (
        "arrivals",
        "base",
        "durations",
        "frames",
        "head",
        "seqs",
        "total_bytes",
        "total_seconds",
    )

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.frames: list[bytes] = []
        self.durations: list[float] = []
        self.arrivals: list[float] = []
        self.head = 0  # list index of the oldest live entry
        self.base = 0  # ordinal of the oldest live entry
        self.total_seconds = 0.0
        self.total_bytes = 0

    def __len__(self) -> int:
        return len(self.seqs) - self.head

    @property
    def end(self) -> int:
        """Ordinal the next appended chunk will get."""
        return self.base + len(self)

    def append(self, seq: int, frame: bytes, seconds: float, arrived: float) -> None:
        self.seqs.append(seq)
        self.frames.append(frame)
        self.durations.append(seconds)
        self.arrivals.append(arrived)
        self.total_seconds += seconds
        self.total_bytes += len(frame)

    def trim(self, max_seconds: float, max_bytes: int) -> None:
        # Keep at least the newest chunk so a resume can always be answered.
        limit = max_seconds + 1e-9  # sums of float durations drift by ulps
        while len(self) > 1 and (self.total_seconds > limit or self.total_bytes > max_bytes):
            self.total_seconds -= self.durations[self.head]
            self.total_bytes -= len(self.frames[self.head])
            self.frames[self.head] = b""
            self.head += 1
            self.base += 1
        if self.head > 1024 and self.head * 2 > len(self.seqs):
            for lst in (self.seqs, self.frames, self.durations, self.arrivals):
                del lst[: self.head]
            self.head = 0

    def clear(self) -> None:
        self.base = self.end
        for lst in (self.seqs, self.frames, self.durations, self.arrivals):
            lst.clear()
        self.head = 0
        self.total_seconds = 0.0
        self.total_bytes = 0

    def ordinal_after_seq(self, seq: int) -> int:
        """Ordinal of the first held chunk with a sequence number above ``seq``."""
        i = bisect.bisect_right(self.seqs, seq, lo=self.head)
        return self.base + (i - self.head)

    def ordinal_arrived_at(self, when: float) -> int:
        """Ordinal of the first held chunk that arrived at or after ``when``."""
        i = bisect.bisect_left(self.arrivals, when, lo=self.head)
        return self.base + (i - self.head)

    def first_seq(self) -> int | None:
        return self.seqs[self.head] if len(self) else None


@dataclass(eq=False)
class StreamState:
    id: int
    name: str
    format: AudioFormat
    window: ReplayWindow = field(default_factory=ReplayWindow)
    last_seq: int = -1
    last_captured_ns: int = 0
    publisher: PublisherSession | None = None
    readers: set[SubscriberSession] = field(default_factory=set)
    chunks_total: int = 0
    # This stream's metric children, looked up once (labels() costs a lock
    # and a dict lookup on every call; publish runs once per chunk).
    counters: tuple[Any, Any, Any] | None = None

    def rate(self, now: float, span: float = 5.0) -> float:
        """Chunks per second over the last ``span`` seconds of arrivals."""
        w = self.window
        if not len(w):
            return 0.0
        n = w.end - w.ordinal_arrived_at(now - span)
        return n / span


@dataclass(eq=False)
class Cursor:
    """Where one subscriber stands in one stream."""

    stream: StreamState
    next_ord: int  # ordinal of the next chunk to send
    after_seq: int  # never send a chunk with seq <= this (resume point)
    assigned_at: float  # chunks that arrived before this are replay: never "slow"
    declared: bool = False
    active: bool = True
    end_after: int | None = None  # the publisher closed the stream at this seq
    sent: int = 0
    dropped_slow: int = 0
    dropped_window: int = 0

    @property
    def lag(self) -> int:
        """Chunks held in the window that this subscriber has not been sent."""
        return self.stream.window.end - self.next_ord


@dataclass(eq=False)
class Group:
    name: str
    members: list[SubscriberSession] = field(default_factory=list)
    assignment: dict[str, SubscriberSession] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)

    def load(self, member: SubscriberSession) -> int:
        return sum(1 for m in self.assignment.values() if m is member)


class Session:
    """Base class of one client's session on the relay."""

    role: Role

    def __init__(self, relay: Relay, channel: Channel, hello: Hello, session_id: int) -> None:
        self.relay = relay
        self.channel = channel
        self.name = hello.client_name or f"client-{session_id}"
        self.id = session_id
        self.connected_at = time.time()

    async def handle(self, event: object) -> None:
        raise RemoteProtocolError(f"unexpected {type(event).__name__}", ErrorCode.UNEXPECTED_FRAME)

    def detach(self) -> None:
        """Forget this session everywhere; called once when it ends."""


class PublisherSession(Session):
    role = Role.PUBLISHER

    def __init__(self, relay: Relay, channel: Channel, hello: Hello, session_id: int) -> None:
        super().__init__(relay, channel, hello, session_id)
        self.streams: dict[int, StreamState] = {}

    async def handle(self, event: object) -> None:
        if isinstance(event, ChunkData):
            stream = self.streams.get(event.stream_id)
            if stream is None or stream.publisher is not self:
                return  # taken over by another publisher: ignore the late chunk
            self.relay.publish(stream, event)
        elif isinstance(event, OpenStream):
            stream = self.relay.open_stream(self, event.name, event.format)
            self.streams[event.stream_id] = stream
            next_seq = stream.last_seq + 1 if stream.last_seq >= 0 else 0
            self.channel.send(StreamAccepted(event.stream_id, next_seq))
        elif isinstance(event, CloseStream):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None and stream.publisher is self:
                stream.publisher = None
                self.relay.stream_ended(stream)
        else:
            await super().handle(event)

    def detach(self) -> None:
        for stream in self.streams.values():
            if stream.publisher is self:
                stream.publisher = None
        self.streams.clear()


class SubscriberSession(Session):
    role = Role.SUBSCRIBER

    def __init__(self, relay: Relay, channel: Channel, hello: Hello, session_id: int) -> None:
        super().__init__(relay, channel, hello, session_id)
        self.subscription: Subscribe | None = None
        self.resume: dict[str, int] = {}
        self.cursors: dict[str, Cursor] = {}
        # The cursors with something to send (or to say), in the order they get their
        # turn: the writer visits these, not every cursor, so a subscriber to many
        # streams costs per chunk, not per stream.
        self.pending: dict[str, Cursor] = {}
        self.wake = asyncio.Event()
        self.writer: asyncio.Task[None] | None = None
        self.group: Group | None = None
        self.dropped = 0

    @property
    def group_name(self) -> str:
        return self.subscription.group if self.subscription else ""

    async def handle(self, event: object) -> None:
        if isinstance(event, Ack):
            self.relay.ack(self, event.stream_id, event.seq)
        elif isinstance(event, Subscribe):
            if self.subscription is not None:
                raise RemoteProtocolError(
                    "only one SUBSCRIBE per session", ErrorCode.UNEXPECTED_FRAME
                )
            self.subscription = event
            self.resume = dict(event.resume)
            self.writer = asyncio.create_task(self._write_loop(), name=f"writer {self.name}")
            self.relay.subscribe(self)
        elif isinstance(event, StatusRequest):
            self.channel.send(Status(json.dumps(self.relay.status())))
        else:
            await super().handle(event)

    def matches(self, stream: str) -> bool:
        return self.subscription is not None and self.subscription.matches(stream)

    def attach(self, stream: StreamState, after_seq: int | None, *, earliest: bool = False) -> None:
        """Start delivering ``stream`` after ``after_seq`` (None: live, or the
        oldest chunk held when ``earliest`` or the subscription says so)."""
        assert self.subscription is not None
        now = self.relay.clock()
        window = stream.window
        if after_seq is None and (earliest or self.subscription.start is StartPosition.EARLIEST):
            after_seq = -1
            start = window.base
        elif after_seq is None:
            after_seq = stream.last_seq
            start = window.end
        else:
            start = window.ordinal_after_seq(after_seq)
            trimmed_from = window.base if len(window) else window.end
            first = window.first_seq()
            if (
                start == window.base
                and first is not None
                and first > after_seq + 1
                and trimmed_from > 0
            ):
                # The chunks between the resume point and the window are gone.
                missing = first - after_seq - 1
                self.relay.count_drop(stream.name, "replay_window_exceeded", missing)
                self.dropped += missing
        cursor = Cursor(stream, start, after_seq, now)
        self.cursors[stream.name] = cursor
        stream.readers.add(self)
        self.notify(cursor)

    def notify(self, cursor: Cursor) -> None:
        """``cursor`` has something new: give it a turn and wake the writer."""
        self.pending[cursor.stream.name] = cursor
        self.wake.set()

    def unassign(self, stream: StreamState, reason: CloseReason) -> None:
        cursor = self.cursors.pop(stream.name, None)
        stream.readers.discard(self)
        if cursor is not None:
            cursor.active = False
            if cursor.declared and not self.channel.closed:
                with contextlib.suppress(Exception):
                    self.channel.send(CloseStream(stream.id, reason))

    def detach(self) -> None:
        for cursor in self.cursors.values():
            cursor.active = False
            cursor.stream.readers.discard(self)
        if self.writer is not None:
            self.writer.cancel()
        self.relay.unsubscribe(self)

    def lag(self) -> int:
        return sum(c.lag for c in list(self.cursors.values()))

    async def _write_loop(self) -> None:
        channel = self.channel
        try:
            while not channel.closed:
                await self.wake.wait()
                self.wake.clear()
                while not channel.closed:
                    frames = self._collect()
                    if not frames:
                        break
                    channel.writelines(frames)
                    await channel.drain()
        except ConnectionClosed:
            # The read side sees the same loss and ends the session.
            channel.abort()

    def _collect(self) -> list[bytes]:
        """Take the next batch of frames from every cursor, round-robin."""
        relay = self.relay
        now = relay.clock()
        stale_before = now - relay.config.queue_seconds
        budget = relay.config.max_batch_bytes
        frames: list[bytes] = []
        pending = self.pending
        for name, cursor in list(pending.items()):
            del pending[name]
            if not cursor.active:
                continue
            stream = cursor.stream
            window = stream.window
            if cursor.next_ord < window.base:
                # Trimmed before we sent them. Only chunks after our resume
                # point were needed: after a relay restart the publisher
                # re-sends history the subscriber already has, and trimming
                # that is no loss. Seqs are increasing, so those needed lie in
                # (after_seq, first held seq).
                trimmed = window.base - cursor.next_ord
                first = window.first_seq()
                needed = trimmed if first is None else max(0, first - cursor.after_seq - 1)
                lost = min(trimmed, needed)
                cursor.next_ord = window.base
                if lost:
                    cursor.dropped_window += lost
                    self.dropped += lost
                    relay.count_drop(stream.name, "replay_window_exceeded", lost)
            if cursor.next_ord >= window.end:
                self._end_if_done(cursor, frames)
                continue
            # Live chunks older than queue_seconds are dropped (oldest first);
            # chunks that were already in the window when we attached are
            # replay and exempt. Arrivals only grow: when the next chunk is
            # fresh, all after it are too (the usual case, no search needed).
            if window.arrivals[cursor.next_ord - window.base + window.head] < stale_before:
                fresh_from = window.ordinal_arrived_at(max(stale_before, cursor.assigned_at))
                exempt_until = window.ordinal_arrived_at(cursor.assigned_at)
                if exempt_until <= cursor.next_ord < fresh_from:
                    skipped = self._skip(cursor, fresh_from)
                    if skipped:
                        relay.count_drop(stream.name, "subscriber_slow", skipped)
            if not cursor.declared:
                frames.append(channel_open(self.channel, stream))
                cursor.declared = True
            i = cursor.next_ord - window.base + window.head
            end = len(window.seqs)
            sent = 0
            nbytes = 0
            while i < end and budget > 0:
                if window.seqs[i] > cursor.after_seq:
                    frame = window.frames[i]
                    frames.append(frame)
                    budget -= len(frame)
                    nbytes += len(frame)
                    cursor.after_seq = window.seqs[i]
                    sent += 1
                i += 1
            cursor.next_ord = i - window.head + window.base
            if sent:
                cursor.sent += sent
                relay.count_sent(stream.name, sent, nbytes)
            self._end_if_done(cursor, frames)
            if budget <= 0:
                if cursor.next_ord < window.end:
                    pending[name] = cursor  # its turn again, after the others
                self.wake.set()  # more to do after this batch is flushed
                break
        return frames

    def _end_if_done(self, cursor: Cursor, frames: list[bytes]) -> None:
        """After the last chunk of a stream its publisher closed, say so, in order."""
        window = cursor.stream.window
        if cursor.end_after is None or cursor.next_ord < window.end:
            return
        cursor.end_after = None
        if cursor.declared:
            frames.append(self.channel.conn.send(CloseStream(cursor.stream.id, CloseReason.ENDED)))
            cursor.declared = False  # a reopened stream is declared again

    def _skip(self, cursor: Cursor, to_ord: int) -> int:
        window = cursor.stream.window
        skipped = 0
        for i in range(
            cursor.next_ord - window.base + window.head, to_ord - window.base + window.head
        ):
            seq = window.seqs[i]
            if seq > cursor.after_seq:
                skipped += 1
                cursor.after_seq = seq
        cursor.next_ord = to_ord
        cursor.dropped_slow += skipped
        self.dropped += skipped
        return skipped


def channel_open(channel: Channel, stream: StreamState) -> bytes:
    return channel.conn.send(OpenStream(stream.id, stream.name, stream.format))


class ObserverSession(Session):
    role = Role.OBSERVER

    async def handle(self, event: object) -> None:
        if isinstance(event, StatusRequest):
            self.channel.send(Status(json.dumps(self.relay.status())))
        else:
            await super().handle(event)


_SESSION_TYPES: dict[Role, type[Session]] = {
    Role.PUBLISHER: PublisherSession,
    Role.SUBSCRIBER: SubscriberSession,
    Role.OBSERVER: ObserverSession,
}


class Relay:
    """The relay server. ``start()`` binds and returns; ``serve_forever()``
    runs until ``stop()`` (or a signal, via ``run``)."""

    def __init__(
        self,
        config: RelayConfig | None = None,
        *,
        metrics: Metrics | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.config = config or RelayConfig()
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.streams: dict[str, StreamState] = {}
        self._stream_ids: dict[int, StreamState] = {}
        self.groups: dict[str, Group] = {}
        self.sessions: set[Session] = set()
        self.subscribers: set[SubscriberSession] = set()
        self._next_stream_id = itertools.count(1)
        self._next_session_id = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()
        self.address: RelayAddress | None = None
        self.started_at = time.time()
        self.metrics.registry.register(CallbackCollector(self._collect_gauges))

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> RelayAddress:
        try:
            self._server = await asyncio.start_server(
                self._on_connect,
                self.config.host,
                self.config.port,
                limit=1 << 20,
                # A thousand microphones reconnect at once after a relay restart:
                # asyncio's default backlog of 100 drops their SYNs into retries.
                backlog=LISTEN_BACKLOG,
            )
        except OSError as exc:
            where = f"{self.config.host}:{self.config.port}"
            if exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
                raise AddressInUse(f"cannot listen on {where}: address already in use") from exc
            raise AddressInUse(f"cannot listen on {where}: {exc.strerror or exc}") from exc
        sock = self._server.sockets[0]
        host, port = sock.getsockname()[:2]
        self.address = RelayAddress(self.config.host if host in ("0.0.0.0", "::") else host, port)
        log.info("relay listening on %s", self.address)
        return self.address

    @property
    def url(self) -> str:
        assert self.address is not None, "relay not started"
        return str(self.address)

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    async def stop(self, *, timeout: float = 2.0) -> None:
        """Tell every client goodbye, close the listener, wait for sessions."""
        if self._server is not None:
            self._server.close()
        farewell = Goodbye(ErrorCode.SHUTTING_DOWN, "relay shutting down")
        await asyncio.gather(
            *(s.channel.close(farewell, timeout=timeout) for s in list(self.sessions)),
            return_exceptions=True,
        )
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout)
        self._stopped.set()

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- connections ---------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve_connection(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        tune_socket(writer, sndbuf=self.config.socket_buffer_bytes)
        writer.transport.set_write_buffer_limits(high=64 * 1024)
        cfg = self.config
        channel = Channel(
            reader,
            writer,
            Connection("relay", cfg.limits),
            heartbeat_interval=cfg.heartbeat_interval,
            heartbeat_timeout=3 * cfg.heartbeat_interval,
            clock=self.clock,
        )
        session: Session | None = None
        try:
            try:
                async with asyncio.timeout(cfg.limits.handshake_timeout):
                    hello = await channel.next_event()
            except TimeoutError:
                raise RemoteProtocolError(
                    f"no HELLO within {cfg.limits.handshake_timeout:g} s",
                    ErrorCode.HANDSHAKE_TIMEOUT,
                ) from None
            if not isinstance(hello, Hello):
                return  # GOODBYE/ERROR before the handshake: just close
            if cfg.token and not hmac.compare_digest(hello.token.encode(), cfg.token.encode()):
                self.metrics.auth_failures.inc()
                await channel.close(ErrorFrame(ErrorCode.UNAUTHORIZED, "missing or wrong token"))
                return
            channel.send(
                Welcome(
                    cfg.server_name,
                    max(1, int(cfg.heartbeat_interval * 1000)),
                    cfg.limits.max_frame_size,
                    int(cfg.replay_seconds * 1000),
                )
            )
            channel.start_heartbeat()
            session = _SESSION_TYPES[hello.role](self, channel, hello, next(self._next_session_id))
            self.sessions.add(session)
            self.metrics.connected_clients.labels(session.role.label).inc()
            log.info("%s %r connected from %s", session.role.label, session.name, channel.peer)
            while True:
                event = await channel.next_event()
                if isinstance(event, Goodbye | ErrorFrame):
                    log.info(
                        "%s %r said goodbye: %s", session.role.label, session.name, event.message
                    )
                    break
                await session.handle(event)
        except RemoteProtocolError as exc:
            self.metrics.protocol_errors.labels(exc.code.name.lower()).inc()
            who = f"{session.role.label} {session.name!r}" if session else "client"
            log.warning("closing %s from %s: %s", who, channel.peer, exc)
            await channel.close(ErrorFrame(exc.code, str(exc)))
        except ConnectionClosed as exc:
            if session is not None:
                log.info("%s %r disconnected: %s", session.role.label, session.name, exc)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug of ours: close this connection, keep the relay
            log.exception("internal error serving %s", channel.peer)
            await channel.close(ErrorFrame(ErrorCode.INTERNAL, "internal relay error"))
        finally:
            if session is not None:
                self.sessions.discard(session)
                session.detach()
                self.metrics.connected_clients.labels(session.role.label).dec()
            await channel.close()

    # -- publishing ----------------------------------------------------------

    def open_stream(self, publisher: PublisherSession, name: str, fmt: AudioFormat) -> StreamState:
        stream = self.streams.get(name)
        if stream is None:
            stream = StreamState(next(self._next_stream_id), name, fmt)
            self.streams[name] = stream
            self._stream_ids[stream.id] = stream
            m = self.metrics
            m.declare_stream(name)
            stream.counters = (
                m.chunks_received.labels(name),
                m.bytes_received.labels(name),
                m.end_to_end_latency.labels(name),
            )
            log.info("stream %r opened by %r (%s)", name, publisher.name, fmt)
        elif stream.format != fmt:
            log.warning(
                "stream %r changed format %s -> %s; replay window cleared", name, stream.format, fmt
            )
            stream.format = fmt
            stream.window.clear()
            for reader in list(stream.readers):
                cursor = reader.cursors.get(name)
                if cursor is not None:
                    cursor.declared = False
                    cursor.next_ord = stream.window.end
        old = stream.publisher
        if old is not None and old is not publisher:
            log.warning("stream %r taken over by %r from %r", name, publisher.name, old.name)
            asyncio.get_running_loop().create_task(
                old.channel.close(
                    Goodbye(ErrorCode.REPLACED, f"stream {name!r} taken over by another publisher")
                )
            )
        stream.publisher = publisher
        for reader in stream.readers:  # back before readers caught up: not ended
            cursor = reader.cursors.get(name)
            if cursor is not None:
                cursor.end_after = None
        self._offer(stream)
        return stream

    def publish(self, stream: StreamState, chunk: ChunkData) -> None:
        name = stream.name
        m = self.metrics
        if chunk.seq <= stream.last_seq:
            m.duplicates_suppressed.labels(name).inc()
            return
        if stream.last_seq >= 0 and chunk.seq > stream.last_seq + 1:
            m.sequence_gaps.labels(name).inc(chunk.seq - stream.last_seq - 1)
        now = self.clock()
        fmt = stream.format
        nbytes = len(chunk.payload)
        seconds = nbytes / (fmt.frame_bytes * fmt.rate)
        frame = encode_chunk(stream.id, chunk.seq, chunk.captured_ns, chunk.payload)
        window = stream.window
        window.append(chunk.seq, frame, seconds, now)
        window.trim(self.config.replay_seconds, self.config.max_window_bytes)
        stream.last_seq = chunk.seq
        stream.last_captured_ns = chunk.captured_ns
        stream.chunks_total += 1
        assert stream.counters is not None
        received, received_bytes, latency = stream.counters
        received.inc()
        received_bytes.inc(nbytes)
        latency.observe(max(0.0, (time.time_ns() - chunk.captured_ns) / 1e9))
        for reader in stream.readers:
            cursor = reader.cursors.get(name)
            if cursor is not None:
                reader.notify(cursor)

    def stream_ended(self, stream: StreamState) -> None:
        """The publisher closed the stream: each reader gets CLOSE_STREAM after
        the last chunk (processors finish their files), unless it reopens first."""
        log.info("stream %r closed by its publisher at seq %d", stream.name, stream.last_seq)
        for reader in list(stream.readers):
            cursor = reader.cursors.get(stream.name)
            if cursor is not None:
                cursor.end_after = stream.last_seq
                reader.notify(cursor)

    # -- subscribing ---------------------------------------------------------

    def subscribe(self, session: SubscriberSession) -> None:
        self.subscribers.add(session)
        group_name = session.group_name
        if group_name:
            group = self.groups.setdefault(group_name, Group(group_name))
            group.members.append(session)
            session.group = group
            self._rebalance(group)
        else:
            for stream in list(self.streams.values()):
                if session.matches(stream.name):
                    session.attach(stream, session.resume.get(stream.name))

    def unsubscribe(self, session: SubscriberSession) -> None:
        self.subscribers.discard(session)
        group = session.group
        if group is not None:
            with contextlib.suppress(ValueError):
                group.members.remove(session)
            for name, member in list(group.assignment.items()):
                if member is session:
                    del group.assignment[name]
            session.group = None
            self._rebalance(group)

    def _offer(self, stream: StreamState) -> None:
        """A stream appeared (or came back): attach it where it belongs."""
        for session in list(self.subscribers):
            if (
                session.group is None
                and session.matches(stream.name)
                and stream.name not in session.cursors
            ):
                session.attach(stream, session.resume.get(stream.name))
        for group in list(self.groups.values()):
            self._rebalance(group)

    def ack(self, session: SubscriberSession, stream_id: int, seq: int) -> None:
        stream = self._stream_ids.get(stream_id)
        group = session.group
        if stream is None or group is None:
            return
        if group.assignment.get(stream.name) is session and seq > group.acked.get(stream.name, -1):
            group.acked[stream.name] = seq

    def _rebalance(self, group: Group) -> None:
        """Give each stream exactly one member; move as few as possible."""
        members = [m for m in group.members if not m.channel.closed]
        order = {m: i for i, m in enumerate(members)}
        loads = dict.fromkeys(members, 0)
        # Keep what still stands: an owner that is here and still matches.
        for name, owner in list(group.assignment.items()):
            if owner in loads and owner.matches(name):
                loads[owner] += 1
            else:
                del group.assignment[name]
        # Streams without an owner go to the least loaded member that matches.
        for name in sorted(self.streams):
            if name in group.assignment:
                continue
            eligible = [m for m in members if m.matches(name)]
            if eligible:
                target = min(eligible, key=lambda m: (loads[m], order[m]))
                group.assignment[name] = target
                loads[target] += 1
        # Even out: move a stream from the busiest to the idlest member while
        # they differ by more than one. Sticky otherwise.
        while members:
            busiest = max(members, key=loads.__getitem__)
            idlest = min(members, key=loads.__getitem__)
            if loads[busiest] - loads[idlest] <= 1:
                break
            movable = [
                n for n, m in sorted(group.assignment.items()) if m is busiest and idlest.matches(n)
            ]
            if not movable:
                break
            group.assignment[movable[-1]] = idlest
            loads[busiest] -= 1
            loads[idlest] += 1
        # Apply: take streams from members that lost them, then give them out
        # (``_assign`` leaves a member's existing cursor alone).
        for member in members:
            for name in list(member.cursors):
                if group.assignment.get(name) is not member:
                    member.unassign(self.streams[name], CloseReason.UNASSIGNED)
        for name, owner in sorted(group.assignment.items()):
            self._assign(group, self.streams[name], owner)

    def _assign(self, group: Group, stream: StreamState, member: SubscriberSession) -> None:
        if stream.name in member.cursors:
            return
        # Where the group stands in this stream: its last ACK; after a relay
        # restart (no ACKs yet) the furthest resume point any member brought,
        # since the previous owner may be another member than the new one.
        after = group.acked.get(stream.name)
        if after is None:
            points = [m.resume[stream.name] for m in group.members if stream.name in m.resume]
            after = max(points) if points else None
        # A group whose members come back with resume points (or reconnecting,
        # which asks for EARLIEST) existed before the relay did: a stream none
        # of them knows was owned by a member not back yet. Start at the oldest chunk held rather than lose the
        # chunks since its last ACK (at-least-once, never a silent gap).
        earliest = after is None and any(
            m.resume or (m.subscription and m.subscription.start is StartPosition.EARLIEST)
            for m in group.members
        )
        log.info(
            "group %r: stream %r -> %r (after seq %s%s)",
            group.name,
            stream.name,
            member.name,
            after,
            ", earliest held" if earliest else "",
        )
        member.attach(stream, after, earliest=earliest)

    # -- accounting ----------------------------------------------------------

    def count_drop(self, stream: str, reason: str, n: int) -> None:
        self.metrics.chunks_dropped.labels(stream, reason).inc(n)

    def count_sent(self, stream: str, chunks: int, nbytes: int) -> None:
        self.metrics.chunks_sent.labels(stream).inc(chunks)
        self.metrics.bytes_sent.labels(stream).inc(nbytes)

    def _collect_gauges(self) -> Iterator[Metric]:
        streams = list(self.streams.values())
        depth = GaugeMetricFamily(
            "audiosockets_queue_depth_chunks",
            "Chunks waiting to be delivered or processed, by stream.",
            labels=["stream"],
        )
        window = GaugeMetricFamily(
            "audiosockets_replay_window_seconds",
            "Audio held for replay, by stream.",
            labels=["stream"],
        )
        last = GaugeMetricFamily(
            "audiosockets_last_chunk_timestamp_seconds",
            "Capture time (Unix seconds) of the newest chunk, by stream.",
            labels=["stream"],
        )
        for s in streams:
            cursors = (r.cursors.get(s.name) for r in list(s.readers))
            lag = sum(c.lag for c in cursors if c is not None)
            depth.add_metric([s.name], lag)
            window.add_metric([s.name], s.window.total_seconds)
            last.add_metric([s.name], s.last_captured_ns / 1e9)
        count = GaugeMetricFamily("audiosockets_streams", "Streams known to the relay.")
        count.add_metric([], len(streams))
        members = GaugeMetricFamily(
            "audiosockets_group_members", "Members of each group.", labels=["group"]
        )
        assigned = GaugeMetricFamily(
            "audiosockets_group_streams",
            "Streams assigned to each group member.",
            labels=["group", "member"],
        )
        for group in list(self.groups.values()):
            ms = list(group.members)
            members.add_metric([group.name], len(ms))
            # Replicas may share a client name: one series per name, summed,
            # since a duplicate series makes Prometheus reject the scrape.
            loads: dict[str, int] = {}
            for m in ms:
                loads[m.name] = loads.get(m.name, 0) + group.load(m)
            for member_name, load in sorted(loads.items()):
                assigned.add_metric([group.name, member_name], load)
        yield from (depth, window, last, count, members, assigned)

    def status(self) -> dict[str, object]:
        """The report ``audiosockets status`` prints."""
        now = self.clock()
        streams = []
        for s in sorted(self.streams.values(), key=lambda s: s.name):
            streams.append(
                {
                    "name": s.name,
                    "format": {
                        "rate": s.format.rate,
                        "channels": s.format.channels,
                        "sample_type": s.format.sample_type.label,
                    },
                    "publisher": s.publisher.name if s.publisher else None,
                    "last_seq": s.last_seq,
                    "chunks": s.chunks_total,
                    "rate_chunks_per_s": round(s.rate(now), 2),
                    "window_seconds": round(s.window.total_seconds, 3),
                    "window_chunks": len(s.window),
                    "subscribers": sorted(r.name for r in s.readers),
                }
            )
        subscribers = []
        publishers = []
        for sess in sorted(self.sessions, key=lambda x: x.id):
            if isinstance(sess, SubscriberSession) and sess.subscription is not None:
                subscribers.append(
                    {
                        "name": sess.name,
                        "peer": sess.channel.peer,
                        "pattern": sess.subscription.pattern,
                        "group": sess.group_name or None,
                        "streams": sorted(sess.cursors),
                        "lag_chunks": sess.lag(),
                        "dropped": sess.dropped,
                    }
                )
            elif isinstance(sess, PublisherSession):
                publishers.append(
                    {
                        "name": sess.name,
                        "peer": sess.channel.peer,
                        "streams": sorted(s.name for s in sess.streams.values()),
                    }
                )
        groups = {
            g.name: {
                "members": [m.name for m in g.members],
                "assignment": {stream: m.name for stream, m in sorted(g.assignment.items())},
            }
            for g in self.groups.values()
        }
        drops: dict[str, float] = {}
        for metric in self.metrics.chunks_dropped.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.value:
                    reason = sample.labels["reason"]
                    drops[reason] = drops.get(reason, 0) + sample.value
        return {
            "server": self.config.server_name,
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1),
            "replay_seconds": self.config.replay_seconds,
            "queue_seconds": self.config.queue_seconds,
            "streams": streams,
            "publishers": publishers,
            "subscribers": subscribers,
            "groups": groups,
            "drops": drops,
        }

    # -- running as a service -------------------------------------------------

    async def run(
        self,
        *,
        ready: Callable[[Relay], None] | None = None,
        signals: Iterable[signal.Signals] = (signal.SIGINT, signal.SIGTERM),
    ) -> None:
        """Serve until SIGINT/SIGTERM (or ``stop()``), then drain and return.

        Signal handlers go in before the socket is bound and ``ready`` is
        called, so a signal sent as soon as we announce ourselves is handled;
        the previous handlers are restored on the way out.
        """
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        installed = []
        for sig in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
        try:
            if self._server is None:
                await self.start()
            if ready is not None:
                ready(self)
            waiter = asyncio.ensure_future(stop.wait())
            stopped = asyncio.ensure_future(self._stopped.wait())
            await asyncio.wait([waiter, stopped], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopped.cancel()
            log.info("relay shutting down")
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.stop()
