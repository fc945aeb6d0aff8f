"""``Subscriber``: an async iterator over the chunks of matching streams.

State: ``received`` (last seq taken off the socket per stream) and
``positions`` (last seq handed to the application). The bounded hand-off
queue survives reconnects, so a reconnect resumes after ``received`` and
duplicates (seq <= received) are suppressed and counted. Subscribers apply
backpressure, not loss: when the application stops iterating, the reader
stops reading, and the relay (which owns the bounded queue) drops and counts.
Every chunk of one read is handed over as one batch with one wake-up
(``handoff.Handoff``), and a group member's ACKs are coalesced per turn of the
event loop: per-chunk costs are the decode and the ``Chunk``, nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Literal

from ..audio import AudioFormat, Chunk
from ..errors import AudiosocketsError, ConnectionClosed
from ..handoff import Handoff
from ..metrics import Metrics, ReceiveChildren
from ..protocol import (
    ChunkData,
    CloseStream,
    ErrorFrame,
    Event,
    Goodbye,
    Limits,
    OpenStream,
    ReceivedChunk,
    Role,
    StartPosition,
    Subscribe,
)
from ..transport import Channel
from ..urls import RelayAddress
from .acks import GroupAcks
from .session import ReconnectingClient, RetryPolicy, check_wire_name

log = logging.getLogger(__name__)

StartName = Literal["live", "earliest"]


@dataclass(frozen=True, slots=True)
class _StreamEnded:
    """In the hand-off queue: the relay closed ``stream`` after the chunks before this."""

    stream: str


#: In the hand-off queue: the subscriber failed (``failure``) after the chunks before this.
_FAILED = _StreamEnded("")


class Subscriber(ReconnectingClient):
    """Receives chunks of the streams matching ``pattern``; an async iterator.

    With ``group``, the relay gives each stream to exactly one member of the
    group; members ACK what they processed so a handover resumes there.

    Args:
        url: the relay, ``tcp://host:port`` (or a parsed ``RelayAddress``).
        pattern: fnmatch pattern over stream names (``"*"``: all).
        group: empty for fan-out (every subscriber gets every stream), else
            the name of the group sharing the matching streams.
        name: this client's name in HELLO and the relay's status report.
        start: ``"live"`` (next chunk) or ``"earliest"`` (oldest chunk in the
            relay's replay window), for streams with no resume position.
        token, tls: as for ``Publisher``.
        metrics, retry, limits: as for ``Publisher``.
        queue_chunks: bound of the hand-off queue between the socket reader
            and the application, in chunks; when full, reading pauses.
        socket_buffer_bytes: kernel receive buffer (SO_RCVBUF), in bytes:
            small, so a slow consumer's backlog stays in the relay's counted
            queue rather than in the kernel.
        on_stream_closed: called with a stream's name when the relay closes it,
            inside the iteration, once the application has taken the stream's
            last chunk (the close waits behind queued chunks, never ahead).
        manual_ack: ACK only through ``ack()`` (else taking the next chunk
            ACKs the previous one).

    After a refusal no retry can change (``failure``: a wrong token), iterating
    raises it once the chunks received before are taken. Raises ValueError at
    construction for a name, token, pattern or group over
    ``Limits.max_name_length`` bytes of UTF-8.

    Satisfies ``client.ChunkSubscription``.
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
        tls: ssl.SSLContext | None = None,
        metrics: Metrics | None = None,
        retry: RetryPolicy | None = None,
        limits: Limits | None = None,
        queue_chunks: int = 256,
        socket_buffer_bytes: int = 256 << 10,
        on_stream_closed: Callable[[str], None] | None = None,
        manual_ack: bool = False,
    ) -> None:
        check_wire_name(pattern, "stream pattern", limits)
        check_wire_name(group, "group", limits)
        super().__init__(
            url,
            name=name,
            token=token,
            metrics=metrics,
            retry=retry,
            limits=limits,
            tls=tls,
        )
        self.rcvbuf = socket_buffer_bytes
        self.pattern = pattern
        self.group = group or ""
        self.start_position = StartPosition.EARLIEST if start == "earliest" else StartPosition.LIVE
        self.received: dict[str, int] = {}
        self.positions: dict[str, int] = {}
        self.formats: dict[str, AudioFormat] = {}
        self._assigned: set[str] = set()
        self.duplicates = 0
        self.gaps = 0
        self._ids: dict[str, int] = {}
        # Chunks and end-of-stream marks (and _FAILED), in the order they came off the socket.
        self._handoff: Handoff[Chunk | _StreamEnded] = Handoff(queue_chunks)
        self._unacked: Chunk | None = None
        self._on_stream_closed = on_stream_closed
        # Group members ACK what they processed. By default a chunk counts as
        # processed when the application asks for the next one; with
        # manual_ack the application calls ack() when its work is really done
        # (the processor does, after the handler returns).
        self.manual_ack = manual_ack
        self._acks = GroupAcks(lambda: self.channel, self._ids)
        self.acked = self._acks.acked  # stream name -> the last seq ACKed
        self._children: dict[str, ReceiveChildren] = {}
        self._gap_log = _GapLog()

    async def __aenter__(self) -> Subscriber:
        """``start()`` and return self; connecting goes on in the background."""
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """``close()``."""
        await self.close()

    async def close(self) -> None:
        """ACK the chunk last handed out (unless ``manual_ack``), say GOODBYE, stop.

        Chunks still in the hand-off queue are not delivered. Never raises for
        network trouble.
        """
        self._ack_previous()
        self._acks.send_due()  # before the GOODBYE
        await self._stop_task(farewell=True)

    def __aiter__(self) -> AsyncIterator[Chunk]:
        """The subscriber is its own async iterator over ``Chunk``s."""
        return self

    async def __anext__(self) -> Chunk:
        """The next chunk, in sequence order per stream, duplicates removed.

        Waits (without timeout) while the queue is empty, across reconnects.
        Without ``manual_ack``, asking for the next chunk ACKs the previous one.
        Runs ``on_stream_closed`` for a stream whose last chunk was taken before.
        Raises ``failure`` (a refusal, e.g. ``RelayRefused``) once the chunks
        received before it are taken.
        """
        self._ack_previous()
        if self.failure is not None and not len(self._handoff):
            raise self.failure  # refused for good: iterating ends with the reason
        chunk = await self._handoff.get()
        while not isinstance(chunk, Chunk):
            if chunk is _FAILED:
                assert self.failure is not None
                raise self.failure
            # Only now, after the application took the stream's last chunk, is the
            # stream over for it (the processor then completes the handler's files).
            if self._on_stream_closed is not None:
                self._on_stream_closed(chunk.stream)
            chunk = await self._handoff.get()
        self.positions[chunk.stream] = chunk.seq
        if not self.manual_ack:
            self._unacked = chunk
        return chunk

    def _fail(self, failure: AudiosocketsError) -> None:
        super()._fail(failure)
        self._handoff.put_marker(_FAILED)  # after the chunks already handed over
        self._handoff.publish()

    def ack(self, stream: str, seq: int) -> None:
        """Tell the relay this group member is done with ``stream`` up to ``seq``.

        Only meaningful in a group (a new owner resumes after the last ACK);
        lower or repeated values are ignored. The first ACK of a turn of the
        event loop leaves at once; the ones after it in the same turn are
        coalesced, the latest per stream, into one write at the end of the turn
        (a batch of chunks costs two writes, not one per chunk).
        """
        self._acks.ack(stream, seq, send=bool(self.group))

    async def get(self, timeout: float | None = None) -> Chunk:
        """``__anext__`` with a deadline: raises TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            return await self.__anext__()

    @property
    def assigned(self) -> AbstractSet[str]:
        """Names of the streams the relay gives this subscriber on the current
        session (all matching streams in fan-out, this member's share in a
        group); empty while disconnected. A live read-only view, not a copy."""
        return self._assigned

    @property
    def backlog(self) -> int:
        """Chunks received and waiting in the hand-off queue (at most ``queue_chunks``)."""
        return len(self._handoff)

    def _ack_previous(self) -> None:
        chunk, self._unacked = self._unacked, None
        if chunk is not None:
            self.ack(chunk.stream, chunk.seq)

    def _child(self, stream: str) -> ReceiveChildren:
        child = self._children.get(stream)
        if child is None:
            child = self._children[stream] = self.metrics.receive_children(stream)
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
            # hand-off stops the reading (the rest stays in the socket). Runs of
            # CHUNKs come out of the codec as plain fields (poll_chunks), as many
            # as the hand-off has room for; any other frame through poll_event.
            event: Event | None = await channel.next_event()
            try:
                while event is not None:
                    self._receive(event, streams)
                    self._deliver_run(channel.poll_chunks(handoff.room), streams)
                    if handoff.full():
                        break
                    event = channel.poll_event()
            finally:
                handoff.publish()  # what arrived before an error is delivered too
            if handoff.full():
                await handoff.wait_for_space()

    def _receive(self, event: Event, streams: dict[int, tuple[str, AudioFormat]]) -> None:
        if isinstance(event, ChunkData):
            name, fmt = streams[event.stream_id]
            self._deliver(name, fmt, event.seq, event.captured_ns, event.payload, time.time_ns())
        elif isinstance(event, OpenStream):
            streams[event.stream_id] = (event.name, event.format)
            self._ids[event.name] = event.stream_id
            self._stream_opened(event.name, event.format)
        elif isinstance(event, CloseStream):
            entry = streams.get(event.stream_id)
            if entry is not None:
                self._stream_closed(entry[0], event.reason.name.lower())
        elif isinstance(event, Goodbye | ErrorFrame):
            raise ConnectionClosed(f"relay ended the session: {event.message}", event.code)

    def _deliver_run(
        self, chunks: list[ReceivedChunk], streams: dict[int, tuple[str, AudioFormat]]
    ) -> None:
        """``_deliver`` each chunk of a run decoded from one read; they share
        one receipt time (they came off the socket together)."""
        if chunks:
            now = time.time_ns()
            deliver = self._deliver
            for stream_id, seq, captured_ns, payload in chunks:
                name, fmt = streams[stream_id]
                deliver(name, fmt, seq, captured_ns, payload, now)

    # -- delivery: independent of the wire, shared by any transport ------------

    def _deliver(
        self, name: str, fmt: AudioFormat, seq: int, captured_ns: int, payload: bytes, now: int
    ) -> None:
        """Suppress a duplicate, count a gap, hand the chunk (received at ``now``,
        wall-clock ns) to the application.

        The caller checks ``_handoff.full()`` first and waits for space when it
        is full: that is the backpressure.
        """
        m = self.metrics
        last = self.received.get(name, -1)
        if seq <= last:
            self.duplicates += 1
            m.duplicates_suppressed.labels(name).inc()
            return
        if last >= 0 and seq > last + 1:
            missing = seq - last - 1
            self.gaps += missing
            m.sequence_gaps.labels(name).inc(missing)
            self._gap_log.missing(name, missing, seq)
        self.received[name] = seq
        chunk = Chunk(name, seq, captured_ns, fmt, payload, now)
        received, nbytes, latency, depth = self._child(name)
        received.inc()
        nbytes.inc(len(payload))
        latency.observe(max(0.0, (now - captured_ns) / 1e9))
        self._handoff.put(chunk)
        if self._handoff.full():
            depth.set(len(self._handoff))

    def _stream_opened(self, name: str, fmt: AudioFormat) -> None:
        self.formats[name] = fmt
        self._assigned.add(name)
        self._child(name)

    def _stream_closed(self, name: str, reason: str) -> None:
        self._assigned.discard(name)
        log.info("stream %r closed by relay (%s)", name, reason)
        if self._on_stream_closed is not None:
            # Behind the chunks still queued for the application, never ahead of them.
            self._handoff.put_marker(_StreamEnded(name))

    def _session_ended(self) -> None:
        self._assigned.clear()
        self._ids.clear()


class _GapLog:
    """Warns of missing chunks per stream, at most once per ``INTERVAL`` seconds:
    a slow consumer can see thousands of gaps a second; the counter has them
    all, the log says so once per interval with the sum since the last line."""

    INTERVAL = 5.0

    def __init__(self) -> None:
        self._logged: dict[str, float] = {}  # stream -> monotonic time of its last line
        self._pending: dict[str, int] = {}  # stream -> chunks missing since then

    def missing(self, stream: str, missing: int, seq: int) -> None:
        """``missing`` chunks of ``stream`` did not arrive before ``seq``."""
        now = time.monotonic()
        pending = self._pending.get(stream, 0) + missing
        if now - self._logged.get(stream, -1e9) < self.INTERVAL:
            self._pending[stream] = pending
            return
        self._logged[stream] = now
        self._pending[stream] = 0
        log.warning("stream %r: %d chunks missing (latest gap before seq %d)", stream, pending, seq)
