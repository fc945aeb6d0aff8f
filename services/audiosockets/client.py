"""Client library: ``Publisher`` and ``Subscriber``, reconnecting and resuming.

Where the state lives:
- ``Publisher``: per stream, a ``History`` of the last ``history_seconds`` of
  chunks (sent or not). The history *is* the spool: while the relay is away,
  ``send`` keeps appending and the oldest unsent chunks beyond the history are
  dropped and counted (``reason="spool_full"``). On every (re)connect the relay
  answers each OPEN_STREAM with the next sequence number it expects, and the
  publisher re-sends from there, so a relay that crashed and came back empty
  gets everything still in the history.
- ``Subscriber``: ``received`` (last seq taken off the socket per stream) and
  ``positions`` (last seq handed to the application). The bounded hand-off
  queue survives reconnects, so a reconnect resumes after ``received`` and
  duplicates (seq <= received) are suppressed and counted.

Invariants:
- ``PublishedStream.send`` never blocks and never raises for network trouble.
- Subscribers apply backpressure, not loss: when the application stops
  iterating, the reader stops reading, and the relay (which owns the bounded
  queue) drops and counts. The heartbeat still runs, so the session survives.
- Reconnects use tenacity: exponential backoff with jitter and a cap; every
  retry is logged and counted in ``audiosockets_reconnects_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential_jitter,
)

from .audio import AudioFormat, Chunk
from .errors import ConnectionClosed, ErrorCode, RelayUnreachable, RemoteProtocolError
from .handoff import Handoff
from .metrics import Metrics
from .protocol import (
    CHUNK_HEAD,
    Ack,
    ChunkData,
    CloseStream,
    ErrorFrame,
    Event,
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
)
from .transport import Channel, connect
from .urls import RelayAddress, parse_url

log = logging.getLogger(__name__)

StartName = Literal["live", "earliest"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Reconnect backoff: ``initial`` doubling up to ``cap`` seconds, plus jitter."""

    initial: float = 0.05
    cap: float = 2.0
    jitter: float = 0.1
    connect_timeout: float = 3.0
    healthy_session: float = 5.0  # a session shorter than this counts as a failed attempt


_RETRYABLE = (RelayUnreachable, ConnectionClosed, RemoteProtocolError, OSError)
#: Session ends that are nobody's fault: reconnect at once (tenacity still
#: backs off if the relay is not back yet).
_BENIGN_CLOSE = frozenset({ErrorCode.NORMAL, ErrorCode.SHUTTING_DOWN, ErrorCode.HEARTBEAT_TIMEOUT})


class _Client:
    """Shared connect/reconnect machinery of Publisher and Subscriber."""

    role: Role

    def __init__(
        self,
        url: str | RelayAddress,
        *,
        name: str,
        token: str,
        metrics: Metrics | None,
        retry: RetryPolicy | None,
        limits: Limits | None,
    ) -> None:
        self.address = url if isinstance(url, RelayAddress) else parse_url(url)
        self.name = name
        self.token = token
        self.metrics = metrics or Metrics()
        self.retry = retry or RetryPolicy()
        self.limits = limits or Limits()
        self.rcvbuf = 0
        self.channel: Channel | None = None
        self.connected = asyncio.Event()
        self.attempts = 0
        self.sessions = 0
        self.last_error: str | None = None
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.metrics.reconnects.labels(self.role.label)
        self.metrics.connected.labels(self.role.label).set(0)

    async def start(self) -> None:
        """Start connecting in the background; returns at once."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"{self.role.label} {self.name}")

    async def wait_connected(self, timeout: float | None = None) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self.connected.wait()
        except TimeoutError:
            return False
        return True

    async def _connect_once(self) -> Channel:
        self.attempts += 1
        if self.attempts > 1:
            self.metrics.reconnects.labels(self.role.label).inc()
        return await connect(
            self.address,
            Hello(self.role, self.name, self.token),
            limits=self.limits,
            connect_timeout=self.retry.connect_timeout,
            rcvbuf=self.rcvbuf,
        )

    def _before_sleep(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        self.last_error = str(exc)
        log.warning(
            "%s %r: %s; retry %d in %.2f s",
            self.role.label,
            self.name,
            exc,
            state.attempt_number,
            delay,
        )

    async def _run(self) -> None:
        retrying = AsyncRetrying(
            wait=wait_exponential_jitter(
                multiplier=self.retry.initial, max=self.retry.cap, jitter=self.retry.jitter
            ),
            retry=retry_if_exception_type(_RETRYABLE),
            before_sleep=self._before_sleep,
            reraise=True,
        )
        short_sessions = 0
        while not self._closing:
            channel: Channel = await retrying(self._connect_once)
            self.channel = channel
            self.sessions += 1
            started = time.monotonic()
            refused = False  # did the relay end this session because of us?
            try:
                await self._session(channel)
            except _RETRYABLE as exc:
                refused = isinstance(exc, RemoteProtocolError) or (
                    isinstance(exc, ConnectionClosed) and exc.code not in _BENIGN_CLOSE
                )
                if not self._closing:
                    self.last_error = str(exc)
                    log.warning("%s %r: session lost: %s", self.role.label, self.name, exc)
                    if isinstance(exc, RemoteProtocolError):
                        await channel.close(ErrorFrame(exc.code, str(exc)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # our bug: end this session, never the client
                refused = True
                self.last_error = f"internal error: {exc}"
                log.exception("%s %r: session failed", self.role.label, self.name)
            finally:
                self.connected.clear()
                self.metrics.connected.labels(self.role.label).set(0)
                self.channel = None
                self._session_ended()
                if not channel.closed:
                    channel.abort()
            # A session the relay ends right away (it refuses what we send)
            # must not turn into a reconnect storm: back off as for a failed
            # connect, with the same tenacity strategy, until one lasts.
            if self._closing:
                break
            if refused and time.monotonic() - started < self.retry.healthy_session:
                short_sessions += 1
                state = RetryCallState(retrying, None, (), {})
                state.attempt_number = short_sessions
                delay = retrying.wait(state)
                log.warning(
                    "%s %r: session ended early; reconnecting in %.2f s",
                    self.role.label,
                    self.name,
                    delay,
                )
                await asyncio.sleep(delay)
            else:
                short_sessions = 0

    async def _session(self, channel: Channel) -> None:
        raise NotImplementedError

    def _session_ended(self) -> None:
        pass

    async def _stop_task(self, farewell: bool) -> None:
        self._closing = True
        channel = self.channel
        if channel is not None and farewell:
            await channel.close(Goodbye(ErrorCode.NORMAL, "bye"))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None


# ---------------------------------------------------------------------------
# Publisher
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    seq: int
    captured_ns: int
    payload: bytes
    seconds: float


class History:
    """A stream's spool: oldest entry first, O(1) append, popleft and indexing.

    A deque indexes its middle in O(n), and sending walks from the first
    unsent entry, deep inside a long spool; a list with a moving head does not.
    """

    __slots__ = ("_head", "_items")

    def __init__(self) -> None:
        self._items: list[_Entry] = []
        self._head = 0

    def __len__(self) -> int:
        return len(self._items) - self._head

    def __iter__(self) -> Iterator[_Entry]:
        return itertools.islice(self._items, self._head, None)

    def __reversed__(self) -> Iterator[_Entry]:
        items = self._items
        return (items[i] for i in range(len(items) - 1, self._head - 1, -1))

    def __getitem__(self, index: int) -> _Entry:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("history index out of range")
        return self._items[self._head + index]

    def append(self, entry: _Entry) -> None:
        self._items.append(entry)

    def popleft(self) -> _Entry:
        if not len(self):
            raise IndexError("pop from an empty history")
        entry = self._items[self._head]
        self._head += 1
        if self._head > 1024 and self._head * 2 > len(self._items):
            del self._items[: self._head]
            self._head = 0
        return entry


class PublishedStream:
    """One stream of a Publisher: ``send`` appends to the history (spool)."""

    def __init__(self, publisher: Publisher, stream_id: int, name: str, fmt: AudioFormat) -> None:
        self.publisher = publisher
        self.id = stream_id
        self.name = name
        self.format = fmt
        self.history = History()
        self.history_seconds = 0.0
        self._unsent = 0  # entries at the right end of history not yet written
        self._unsent_seconds = 0.0
        self.next_seq = 0
        self.accepted = False  # the relay answered OPEN_STREAM on this session
        self.dropped = 0
        m = publisher.metrics
        m.declare_stream(name)
        self._sent = m.chunks_sent.labels(name)
        self._bytes = m.bytes_sent.labels(name)
        self._dropped = m.chunks_dropped.labels(name, "spool_full")
        self._depth = m.queue_depth.labels(name)

    def send(
        self, samples: np.ndarray[Any, Any] | bytes | memoryview, captured_ns: int | None = None
    ) -> int:
        """Queue one chunk; returns its sequence number. Never blocks."""
        if isinstance(samples, np.ndarray):
            if samples.dtype != self.format.dtype:
                raise ValueError(
                    f"samples are {samples.dtype}, stream {self.name!r} is {self.format.dtype}"
                )
            if samples.ndim == 2 and samples.shape[1] != self.format.channels:
                raise ValueError(
                    f"samples have {samples.shape[1]} channels, stream has {self.format.channels}"
                )
            payload = samples.tobytes()
        else:
            payload = bytes(samples)
        if len(payload) % self.format.frame_bytes:
            raise ValueError("payload is not a whole number of frames")
        limit = self.publisher.limits.max_frame_size - CHUNK_HEAD.size
        if len(payload) > limit:
            # The relay would refuse the frame; refusing here keeps one bad
            # block from poisoning the history and the session.
            raise ValueError(
                f"chunk of {len(payload)} bytes is larger than the {limit}-byte frame limit"
            )
        seq = self.next_seq
        self.next_seq += 1
        seconds = len(payload) / (self.format.frame_bytes * self.format.rate)
        when = time.time_ns() if captured_ns is None else captured_ns
        self.history.append(_Entry(seq, when, payload, seconds))
        self.history_seconds += seconds
        self._unsent += 1
        self._unsent_seconds += seconds
        self._trim()
        self._depth.set(self.unsent)
        self.publisher._wake.set()
        return seq

    def _trim(self) -> None:
        limit = self.publisher.history_seconds
        history = self.history
        while len(history) > 1 and self.history_seconds - history[0].seconds >= limit:
            entry = history.popleft()
            self.history_seconds -= entry.seconds
            if self._unsent > len(history):  # it was never sent: audio lost
                self._unsent -= 1
                self._unsent_seconds -= entry.seconds
                self.dropped += 1
                self._dropped.inc()

    def resume_from(self, next_seq: int) -> None:
        """The relay holds everything before ``next_seq``: send the rest.

        When the relay expects more than we ever numbered, the stream had
        an earlier life (this publisher restarted while the relay kept the
        stream): continue its numbering at ``next_seq`` instead of sending
        numbers the relay would take for duplicates.
        """
        if next_seq > self.next_seq:
            first_unsent = self.history[-self.unsent].seq if self.unsent else self.next_seq
            offset = next_seq - first_unsent
            for entry in self.history:
                entry.seq += offset
            self.next_seq += offset
            log.info("stream %r continues the relay's numbering at seq %d", self.name, next_seq)
        n = 0
        for entry in reversed(self.history):
            if entry.seq < next_seq:
                break
            n += 1
        self.unsent = n
        self.accepted = True

    @property
    def unsent(self) -> int:
        """Entries at the end of ``history`` not yet written to the relay."""
        return self._unsent

    @unsent.setter
    def unsent(self, n: int) -> None:
        n = max(0, min(n, len(self.history)))
        self._unsent = n
        self._unsent_seconds = sum(
            self.history[i].seconds for i in range(len(self.history) - n, len(self.history))
        )

    def take(self, budget: int) -> list[_Entry]:
        out: list[_Entry] = []
        if not self.accepted or not self.unsent:
            return out
        history = self.history
        for i in range(len(history) - self._unsent, len(history)):
            entry = history[i]
            out.append(entry)
            self._unsent_seconds -= entry.seconds
            budget -= len(entry.payload)
            if budget <= 0:
                break
        self._unsent -= len(out)
        if not self._unsent:
            self._unsent_seconds = 0.0  # no float drift left behind
        self._depth.set(self._unsent)
        return out

    @property
    def spooled_seconds(self) -> float:
        """Audio not yet sent, in seconds."""
        return max(0.0, self._unsent_seconds)


class Publisher(_Client):
    """Publishes named streams to a relay. Start, declare streams, send."""

    role = Role.PUBLISHER

    def __init__(
        self,
        url: str | RelayAddress,
        *,
        name: str = "publisher",
        history_seconds: float = 60.0,
        token: str = "",
        metrics: Metrics | None = None,
        retry: RetryPolicy | None = None,
        limits: Limits | None = None,
        max_batch_bytes: int = 256 << 10,
    ) -> None:
        super().__init__(
            url,
            name=name,
            token=token,
            metrics=metrics,
            retry=retry,
            limits=limits,
        )
        if history_seconds <= 0:
            raise ValueError("history_seconds must be > 0")
        self.history_seconds = history_seconds
        self.max_batch_bytes = max_batch_bytes
        self.streams: dict[str, PublishedStream] = {}
        self._by_id: dict[int, PublishedStream] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()

    def stream(self, name: str, fmt: AudioFormat) -> PublishedStream:
        """Declare (or get) a stream. Its format is fixed for its lifetime."""
        if not name or len(name.encode("utf-8")) > self.limits.max_name_length:
            raise ValueError(f"stream name must be 1..{self.limits.max_name_length} bytes of UTF-8")
        existing = self.streams.get(name)
        if existing is not None:
            if existing.format != fmt:
                raise ValueError(f"stream {name!r} already declared as {existing.format}")
            return existing
        stream = PublishedStream(self, len(self.streams) + 1, name, fmt)
        self.streams[name] = stream
        self._by_id[stream.id] = stream
        channel = self.channel
        if channel is not None and not channel.closed:
            channel.send(OpenStream(stream.id, name, fmt))
        return stream

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued chunk is written to the relay's socket."""
        try:
            async with asyncio.timeout(timeout):
                while self._pending():
                    self._idle.clear()
                    self._wake.set()
                    await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def _pending(self) -> bool:
        return any(s.unsent for s in self.streams.values())

    async def close(self, timeout: float = 2.0, *, drop_unsent: bool = True) -> None:
        """Flush what the relay can take within ``timeout`` (connecting first if
        need be), end the streams, say goodbye, stop. Subscribers get
        CLOSE_STREAM after the last chunk. Chunks still unsent after
        ``timeout`` are counted as dropped (``reason="closed_unsent"``), unless
        ``drop_unsent=False``: then they stay in ``history`` for the caller
        to keep (the recorder's disk spool does)."""
        if self._pending() and self._task is not None:
            await self.flush(timeout)
        channel = self.channel
        if channel is not None and not channel.closed and not self._pending():
            for stream in self.streams.values():
                with contextlib.suppress(Exception):
                    channel.send(CloseStream(stream.id))
        for stream in self.streams.values():
            if stream.unsent and drop_unsent:
                log.warning(
                    "stream %r: %d chunks never reached the relay", stream.name, stream.unsent
                )
                self.metrics.chunks_dropped.labels(stream.name, "closed_unsent").inc(stream.unsent)
                stream.dropped += stream.unsent
                stream.unsent = 0
        await self._stop_task(farewell=True)

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _session(self, channel: Channel) -> None:
        for stream in self.streams.values():
            stream.accepted = False
            channel.send(OpenStream(stream.id, stream.name, stream.format))
        reader = asyncio.create_task(self._read_loop(channel))
        writer = asyncio.create_task(self._write_loop(channel))
        try:
            done, _ = await asyncio.wait([reader, writer], return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            reader.cancel()
            writer.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(reader, writer, return_exceptions=True)

    async def _read_loop(self, channel: Channel) -> None:
        while True:
            event = await channel.next_event()
            if isinstance(event, StreamAccepted):
                stream = self._by_id.get(event.stream_id)
                if stream is None:
                    continue
                stream.resume_from(event.next_seq)
                if all(s.accepted for s in self.streams.values()):
                    self.connected.set()
                    self.metrics.connected.labels(self.role.label).set(1)
                self._wake.set()
            elif isinstance(event, Goodbye | ErrorFrame):
                raise ConnectionClosed(f"relay ended the session: {event.message}", event.code)
            elif isinstance(event, CloseStream):
                log.warning("relay closed stream id %d (%s)", event.stream_id, event.reason.name)

    async def _write_loop(self, channel: Channel) -> None:
        if not self.streams:
            self.connected.set()
            self.metrics.connected.labels(self.role.label).set(1)
        conn = channel.conn
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                frames: list[bytes] = []
                for stream in list(self.streams.values()):
                    entries = stream.take(self.max_batch_bytes)
                    if not entries:
                        continue
                    nbytes = 0
                    for e in entries:
                        frames.append(conn.chunk_frame(stream.id, e.seq, e.captured_ns, e.payload))
                        nbytes += len(e.payload)
                    stream._sent.inc(len(entries))
                    stream._bytes.inc(nbytes)
                if not frames:
                    break
                channel.writelines(frames)
                await channel.drain()
            if not self._pending():
                self._idle.set()

    def _session_ended(self) -> None:
        for stream in self.streams.values():
            stream.accepted = False


# ---------------------------------------------------------------------------
# Subscriber
# ---------------------------------------------------------------------------


class Subscriber(_Client):
    """Receives chunks of the streams matching ``pattern``; an async iterator.

    With ``group``, the relay gives each stream to exactly one member of the
    group; members ACK what they processed so a handover resumes there.
    """

    role = Role.SUBSCRIBER

    def __init__(
        self,
        url: str | RelayAddress,
        pattern: str = "*",
        *,
        group: str = "",
        name: str = "subscriber",
        start: StartName = "live",
        token: str = "",
        metrics: Metrics | None = None,
        retry: RetryPolicy | None = None,
        limits: Limits | None = None,
        queue_chunks: int = 256,
        socket_buffer_bytes: int = 256 << 10,
        on_stream_closed: Callable[[str], None] | None = None,
        manual_ack: bool = False,
    ) -> None:
        super().__init__(
            url,
            name=name,
            token=token,
            metrics=metrics,
            retry=retry,
            limits=limits,
        )
        self.rcvbuf = socket_buffer_bytes
        self.pattern = pattern
        self.group = group or ""
        self.start_position = StartPosition.EARLIEST if start == "earliest" else StartPosition.LIVE
        self.received: dict[str, int] = {}
        self.positions: dict[str, int] = {}
        self.formats: dict[str, AudioFormat] = {}
        self.assigned: set[str] = set()
        self.duplicates = 0
        self.gaps = 0
        self._ids: dict[str, int] = {}
        self._handoff: Handoff[Chunk] = Handoff(queue_chunks)
        self._unacked: Chunk | None = None
        self._acks_due: set[str] = set()  # streams whose latest ACK has not been sent
        self._acks_scheduled = False
        self._on_stream_closed = on_stream_closed
        # Group members ACK what they processed. By default a chunk counts as
        # processed when the application asks for the next one; with
        # manual_ack the application calls ack() when its work is really done
        # (the processor does, after the handler returns).
        self.manual_ack = manual_ack
        self.acked: dict[str, int] = {}
        self._children: dict[str, tuple[Any, Any, Any, Any]] = {}
        self._gap_logged: dict[str, float] = {}
        self._gap_pending: dict[str, int] = {}

    async def __aenter__(self) -> Subscriber:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._ack_previous()
        self._send_acks()  # before the GOODBYE
        await self._stop_task(farewell=True)

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self

    async def __anext__(self) -> Chunk:
        self._ack_previous()
        chunk = await self._handoff.get()
        self.positions[chunk.stream] = chunk.seq
        if not self.manual_ack:
            self._unacked = chunk
        return chunk

    def ack(self, stream: str, seq: int) -> None:
        """Tell the relay this group member is done with ``stream`` up to ``seq``.

        Only meaningful in a group (a new owner resumes after the last ACK);
        lower or repeated values are ignored. The first ACK of a turn of the
        event loop leaves at once; the ones after it in the same turn are
        coalesced, the latest per stream, into one write at the end of the turn
        (a batch of chunks costs two writes, not one per chunk).
        """
        if seq <= self.acked.get(stream, -1):
            return
        self.acked[stream] = seq
        if not self.group:
            return
        if self._acks_scheduled:
            self._acks_due.add(stream)
            return
        self._acks_scheduled = True
        asyncio.get_running_loop().call_soon(self._send_acks)
        self._write_acks([stream])

    def _send_acks(self) -> None:
        self._acks_scheduled = False
        due, self._acks_due = self._acks_due, set()
        self._write_acks(due)

    def _write_acks(self, streams: Iterable[str]) -> None:
        channel = self.channel
        if channel is None or channel.closed:
            return
        frames = []
        for stream in streams:
            stream_id = self._ids.get(stream)
            if stream_id is not None:
                frames.append(channel.conn.send(Ack(stream_id, self.acked[stream])))
        with contextlib.suppress(Exception):
            channel.writelines(frames)

    async def get(self, timeout: float | None = None) -> Chunk:
        async with asyncio.timeout(timeout):
            return await self.__anext__()

    @property
    def backlog(self) -> int:
        return len(self._handoff)

    def _ack_previous(self) -> None:
        chunk, self._unacked = self._unacked, None
        if chunk is not None:
            self.ack(chunk.stream, chunk.seq)

    def _child(self, stream: str) -> tuple[Any, Any, Any, Any]:
        child = self._children.get(stream)
        if child is None:
            m = self.metrics
            m.declare_stream(stream)
            child = (
                m.chunks_received.labels(stream),
                m.bytes_received.labels(stream),
                m.end_to_end_latency.labels(stream),
                m.queue_depth.labels(stream),
            )
            self._children[stream] = child
        return child

    async def _session(self, channel: Channel) -> None:
        # Fan-out: resume after what we hold (the hand-off queue survives the
        # reconnect). Group: after what we finished, since the relay may give
        # the stream to another member, who must pick up where work stopped.
        positions = self.received if not self.group else self.acked
        resume = tuple(sorted(positions.items()))
        # On a reconnect, streams we have no position in may have started (or
        # changed owner in our group) while we were away: take them from the
        # oldest chunk the relay holds rather than from "now".
        start = self.start_position if self.sessions <= 1 else StartPosition.EARLIEST
        channel.send(Subscribe(self.pattern, self.group, start, resume))
        self.connected.set()
        self.metrics.connected.labels(self.role.label).set(1)
        streams: dict[int, tuple[str, AudioFormat]] = {}
        handoff = self._handoff
        while True:
            # Every event of one read, then one wake-up for the consumer; a full
            # hand-off stops the reading (the rest stays in the socket).
            event: Event | None = await channel.next_event()
            try:
                while event is not None:
                    self._receive(event, streams)
                    if handoff.full():
                        break
                    event = channel.poll_event()
            finally:
                handoff.publish()  # what arrived before an error is delivered too
            if handoff.full():
                await handoff.wait_for_space()

    def _receive(self, event: Event, streams: dict[int, tuple[str, AudioFormat]]) -> None:
        m = self.metrics
        if isinstance(event, ChunkData):
            name, fmt = streams[event.stream_id]
            last = self.received.get(name, -1)
            if event.seq <= last:
                self.duplicates += 1
                m.duplicates_suppressed.labels(name).inc()
                return
            if last >= 0 and event.seq > last + 1:
                missing = event.seq - last - 1
                self.gaps += missing
                m.sequence_gaps.labels(name).inc(missing)
                self._log_gap(name, missing, event.seq)
            self.received[name] = event.seq
            now = time.time_ns()
            chunk = Chunk(name, event.seq, event.captured_ns, fmt, event.payload, now)
            received, nbytes, latency, depth = self._child(name)
            received.inc()
            nbytes.inc(len(event.payload))
            latency.observe(max(0.0, (now - event.captured_ns) / 1e9))
            self._handoff.put(chunk)
            if self._handoff.full():
                depth.set(len(self._handoff))
        elif isinstance(event, OpenStream):
            streams[event.stream_id] = (event.name, event.format)
            self._ids[event.name] = event.stream_id
            self.formats[event.name] = event.format
            self.assigned.add(event.name)
            self._child(event.name)
        elif isinstance(event, CloseStream):
            entry = streams.get(event.stream_id)
            if entry is not None:
                self.assigned.discard(entry[0])
                log.info("stream %r closed by relay (%s)", entry[0], event.reason.name.lower())
                if self._on_stream_closed is not None:
                    self._on_stream_closed(entry[0])
        elif isinstance(event, Goodbye | ErrorFrame):
            raise ConnectionClosed(f"relay ended the session: {event.message}", event.code)

    def _log_gap(self, stream: str, missing: int, seq: int) -> None:
        # Rate-limited: a slow consumer can see thousands of gaps a second;
        # the counter has them all, the log says so once per interval.
        now = time.monotonic()
        pending = self._gap_pending.get(stream, 0) + missing
        if now - self._gap_logged.get(stream, -1e9) < 5.0:
            self._gap_pending[stream] = pending
            return
        self._gap_logged[stream] = now
        self._gap_pending[stream] = 0
        log.warning("stream %r: %d chunks missing (latest gap before seq %d)", stream, pending, seq)

    def _session_ended(self) -> None:
        self.assigned.clear()
        self._ids.clear()


async def fetch_status(
    url: str | RelayAddress, *, timeout: float = 5.0, token: str = ""
) -> dict[str, Any]:
    """Ask a relay for its status report (one attempt, no retries)."""
    address = url if isinstance(url, RelayAddress) else parse_url(url)
    channel = await connect(address, Hello(Role.OBSERVER, "status", token), connect_timeout=timeout)
    try:
        channel.send(StatusRequest())
        async with asyncio.timeout(timeout):
            event = await channel.next_event()
    except TimeoutError:
        raise RelayUnreachable(f"relay {address} did not answer the status request") from None
    finally:
        await channel.close(Goodbye(ErrorCode.NORMAL, "bye"))
    if not isinstance(event, Status):
        raise RelayUnreachable(f"relay {address} answered {type(event).__name__}, not STATUS")
    result: dict[str, Any] = json.loads(event.document)
    return result
