"""One client's session on the relay, by role: publisher, subscriber, observer.

A session turns the events of its connection into calls on the relay. A
subscriber never gets a private copy of the audio: its writer task reads
frames out of the shared replay windows at its cursors, so replay and live
delivery are one code path, and a slow subscriber costs memory only in the
windows that exist anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from ..credentials import EVERYONE, may_publish, may_request_status, may_subscribe, may_take_over
from ..errors import ConnectionClosed, ErrorCode, RelayRefused, RemoteProtocolError
from ..protocol import (
    Ack,
    ChunkData,
    CloseReason,
    CloseStream,
    Goodbye,
    Hello,
    OpenStream,
    Role,
    StartPosition,
    Status,
    StatusRequest,
    StreamAccepted,
    Subscribe,
)
from ..transport import Channel
from .access import RequestRefused
from .admission import StreamRefused
from .inflight import InFlight, peer_closed
from .plausible import check_capture_time, check_seq, clamp
from .streams import StreamState
from .subscriptions import Cursor

if TYPE_CHECKING:
    from .groups import Group
    from .server import Relay


log = logging.getLogger("audiosockets.relay")
#: How often a subscriber with too much audio in flight looks again (s).
INFLIGHT_POLL = 0.05


class Session:
    """Base class of one client's session on the relay.

    ``name`` is the client name from HELLO (``client-<id>`` when empty), ``id``
    a relay-wide session number, ``connected_at`` Unix seconds, ``identity``
    who the client is and what it may do (``credentials.Identity``; set after
    the handshake, replaced when the credentials are reloaded),
    ``token_sha256`` the SHA-256 of its token (``b""``: none) and ``certificate``
    its verified client certificate's CN (None: none), to recheck them. ``tasks`` is
    the session's task group, set by the relay while the session runs: tasks
    started there end with the session, and an unexpected exception in one of
    them ends the session as an internal error.
    """

    role: Role

    def __init__(self, relay: Relay, channel: Channel, hello: Hello, session_id: int) -> None:
        self.relay = relay
        self.channel = channel
        self.name = hello.client_name or f"client-{session_id}"
        self.id = session_id
        self.connected_at = time.time()
        self.identity = EVERYONE
        self.token_sha256 = b""
        self.certificate: str | None = None
        self.tasks: asyncio.TaskGroup | None = None
        self.last_active = relay.clock()  # relay clock at the last request (not PING)
        self.cut_reason = ""  # set when the relay ends the session to protect itself
        self._status_at: float | None = None  # relay clock at the last STATUS reply

    def start_task(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None] | None:
        """Run ``coro`` in this session's task group; returns the task, or
        None (and closes ``coro``) when the session is no longer running."""
        if self.tasks is not None:
            with contextlib.suppress(RuntimeError):  # the group is finished
                return self.tasks.create_task(coro, name=name)
        coro.close()
        return None

    async def handle(self, event: object) -> None:
        """Act on one event from the client. Raises ``RemoteProtocolError``
        (``UNEXPECTED_FRAME``) for an event this role may not send."""
        raise RemoteProtocolError(f"unexpected {type(event).__name__}", ErrorCode.UNEXPECTED_FRAME)

    def detach(self) -> None:
        """Forget this session everywhere; called once when it ends."""

    async def send_status(self) -> None:
        """Answer STATUS_REQUEST, at most once per ``status_interval``: an
        earlier request waits (and this session's reading with it), counted in
        ``audiosockets_requests_throttled_total{reason="status_rate"}``."""
        relay = self.relay
        interval = relay.config.status_interval
        if self._status_at is not None:
            wait = self._status_at + interval - relay.clock()
            if wait > 0:
                relay.guard.counters.requests_throttled.labels("status_rate").inc()
                await asyncio.sleep(wait)
        self._status_at = relay.clock()
        self.channel.send(Status(relay.status_cache.document(relay)))


class PublisherSession(Session):
    """A recorder's session: OPEN_STREAM, CHUNK, CLOSE_STREAM."""

    role = Role.PUBLISHER

    def __init__(self, relay: Relay, channel: Channel, hello: Hello, session_id: int) -> None:
        super().__init__(relay, channel, hello, session_id)
        self.streams: dict[int, StreamState] = {}  # by this connection's stream id
        self.names: set[str] = set()  # every name declared in this session (capped)
        #: The publisher's run (HELLO ``instance``; 0: it sent none).
        self.instance = hello.instance

    def same_run(self, other: PublisherSession) -> bool:
        """Both sessions come from one publisher run (one process start)."""
        return bool(self.instance) and self.instance == other.instance

    def same_owner(self, other: PublisherSession) -> bool:
        """May either session take a stream back from the other? With per-client
        credentials, when both are the same identity (streams belong to identities);
        without, when both come from the same publisher run."""
        if self.identity.name or other.identity.name:
            return self.identity.name == other.identity.name
        return self.same_run(other)

    def replaced_by(self, newer: PublisherSession, stream: str) -> None:
        """``newer`` (the same owner, back) takes ``stream`` from this stale
        session, which ends with GOODBYE ``REPLACED``."""
        log.info(
            "stream %r: publisher %r is back from %s; its earlier session from %s ends",
            stream,
            newer.name,
            newer.channel.peer,
            self.channel.peer,
        )
        farewell = Goodbye(ErrorCode.REPLACED, f"stream {stream!r} taken back by a newer session")
        self.start_task(self.channel.close(farewell), name=f"replace {self.name}")

    def on_chunk(self, chunk: ChunkData) -> None:
        """Check and publish ``chunk`` (synchronous: the relay's per-chunk path).

        Raises RemoteProtocolError for an implausible sequence number or
        capture time (``plausible.py``)."""
        stream = self.streams.get(chunk.stream_id)
        if stream is None or stream.publisher is not self:
            return  # taken over by another publisher: ignore the late chunk
        cfg = self.relay.config
        check_seq(
            chunk.seq,
            stream.last_seq,
            stream.format.rate,
            self.relay.clock() - stream.last_arrival,
        )
        check_capture_time(
            chunk.captured_ns, time.time_ns(), cfg.max_capture_ahead, cfg.max_capture_age
        )
        self.relay.publish(stream, chunk)

    async def handle(self, event: object) -> None:
        """Publish a chunk, open a stream (answered with STREAM_ACCEPTED and
        the next sequence number the relay expects) or close one."""
        if isinstance(event, ChunkData):
            self.on_chunk(event)
        elif isinstance(event, OpenStream):
            refusal = may_publish(self.identity, event.name)
            known = self.relay.streams.get(event.name)
            if refusal is None and known is not None and known.owner:
                refusal = may_take_over(known.owner, self.identity.name, event.name)
            if refusal is not None:
                raise RequestRefused(refusal)
            previous = self.streams.get(event.stream_id)
            if previous is not None and previous.name != event.name:
                # The id now names another stream: this session stops
                # publishing the old one (it stays on the relay).
                del self.streams[event.stream_id]
                if previous.publisher is self:
                    previous.publisher = None
                    self.relay.stream_ended(previous)
            try:
                stream = self.relay.open_stream(self, event.name, event.format)
            except StreamRefused as exc:
                self.channel.send(CloseStream(event.stream_id, CloseReason.REFUSED))
                self.relay.guard.logged.warning(
                    log,
                    f"stream:{exc.reason}",
                    "refused stream %r of publisher %r from %s: %s",
                    event.name,
                    self.name,
                    self.channel.peer,
                    exc,
                )
                return
            except RelayRefused:  # e.g. STREAM_IN_USE: a refusal that ends the session
                raise
            except Exception:  # a bug of ours: this stream fails, the session goes on
                self.relay.metrics.protocol_errors.labels("open_stream_failed").inc()
                log.exception("opening stream %r for %r failed", event.name, self.name)
                self.channel.send(CloseStream(event.stream_id, CloseReason.ENDED))
                return
            self.streams[event.stream_id] = stream
            next_seq = stream.last_seq + 1 if stream.last_seq >= 0 else 0
            self.channel.send(StreamAccepted(event.stream_id, next_seq))
        elif isinstance(event, CloseStream):
            closed = self.streams.pop(event.stream_id, None)
            if closed is not None and closed.publisher is self:
                closed.publisher = None
                self.relay.stream_ended(closed)
        else:
            await super().handle(event)

    def detach(self) -> None:
        """Give up every stream this session publishes (they stay on the relay)."""
        for stream in self.streams.values():
            if stream.publisher is self:
                stream.publisher = None
        self.streams.clear()


class SubscriberSession(Session):
    """A processor's session: one SUBSCRIBE, then ACKs; a writer task sends
    the chunks of every stream it is given, round-robin."""

    role = Role.SUBSCRIBER

    def __init__(self, relay: Relay, channel: Channel, hello: Hello, session_id: int) -> None:
        super().__init__(relay, channel, hello, session_id)
        self.subscription: Subscribe | None = None
        self.resume: dict[str, int] = {}  # stream name -> last seq the client has
        self.wake = asyncio.Event()
        self.writer: asyncio.Task[None] | None = None
        self.group: Group | None = None
        self.dropped = 0  # chunks this subscriber lost, every reason
        self.inflight = InFlight(channel)  # audio written, not yet acknowledged
        self._batch_seconds = 0.0
        self._losses: list[tuple[str, str, int]] = []  # counted once proven alive

    @property
    def group_name(self) -> str:
        """The group from SUBSCRIBE; empty when none (or not subscribed yet)."""
        return self.subscription.group if self.subscription else ""

    async def handle(self, event: object) -> None:
        """ACK, the one SUBSCRIBE (a second raises ``RemoteProtocolError``
        ``UNEXPECTED_FRAME``) or STATUS_REQUEST."""
        if isinstance(event, Ack):
            self.relay.ack(self, event.stream_id, event.seq)
        elif isinstance(event, Subscribe):
            if self.subscription is not None:
                raise RemoteProtocolError(
                    "only one SUBSCRIBE per session", ErrorCode.UNEXPECTED_FRAME
                )
            refusal = may_subscribe(self.identity, event.pattern, event.group)
            if refusal is not None:
                raise RequestRefused(refusal)
            self.subscription = event
            self.resume = dict(event.resume)
            self.writer = self.start_task(self._write_loop(), name=f"writer {self.name}")
            self.relay.subscribe(self)
        elif isinstance(event, StatusRequest):
            refusal = may_request_status(self.identity)
            if refusal is not None:
                raise RequestRefused(refusal)
            await self.send_status()
        else:
            await super().handle(event)

    def matches(self, stream: str) -> bool:
        """Whether this session's pattern takes ``stream`` (False before SUBSCRIBE)."""
        return self.subscription is not None and self.subscription.matches(stream)

    def attach(self, stream: StreamState, after_seq: int | None, *, earliest: bool = False) -> None:
        """Start delivering ``stream`` after ``after_seq`` (None: live, or the
        oldest chunk held when ``earliest`` or the subscription says so).

        Chunks after ``after_seq`` that the window held and trimmed are lost
        here: they are counted as ``replay_window_exceeded``. Sequence numbers
        the relay never received (the publisher's own loss) are not.
        """
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
            if stream.last_seq >= 0:  # a forged resume point must not silence the stream
                what = f"{self.name!r} resuming {stream.name!r}"
                after_seq = clamp(
                    self.relay, "resume_beyond_stream", after_seq, stream.last_seq, what
                )
            start = window.ordinal_after_seq(after_seq)
            missing, after_seq = window.trimmed_after(after_seq)
            if missing:
                self.count_drop(stream.name, "replay_window_exceeded", missing)
        self.relay.delivery.declare_subscriber(self.name, stream.name)
        self.relay.subscriptions.add(self, Cursor(stream, start, after_seq, now))
        self.wake.set()

    def unassign(self, stream: StreamState, reason: CloseReason) -> None:
        """Stop delivering ``stream``; the client gets CLOSE_STREAM with
        ``reason`` if it was told the stream was open."""
        cursor = self.relay.subscriptions.remove(self, stream.name)
        if cursor is not None and cursor.declared and not self.channel.closed:
            with contextlib.suppress(Exception):
                self.channel.send(CloseStream(stream.id, reason))

    def detach(self) -> None:
        """Drop every cursor, stop the writer, leave the group."""
        self.relay.subscriptions.remove_session(self)
        if self.writer is not None:
            self.writer.cancel()
        self.relay.unsubscribe(self)

    def lag(self) -> int:
        """Chunks held for this subscriber and not yet sent, all streams."""
        return self.relay.subscriptions.session_lag(self)

    async def _write_loop(self) -> None:
        channel = self.channel
        try:
            while not channel.closed:
                await self.wake.wait()
                self.wake.clear()
                while not channel.closed:
                    cfg = self.relay.config
                    if self.inflight.stalled(
                        self.relay.clock(), cfg.max_inflight_seconds, INFLIGHT_POLL
                    ):
                        await self._stalled()
                        continue
                    frames = self._collect()
                    if frames:
                        # Writing to a peer that reset the connection fails
                        # at once: its losses were never this subscriber's
                        # (it resumes on another session) and are not counted.
                        channel.writelines(frames)
                        self.inflight.record(
                            sum(map(len, frames)), self._batch_seconds, self.relay.clock()
                        )
                    if not self._peer_gone():
                        self._commit_losses()
                    if not frames:
                        break
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
        self._batch_seconds = 0.0  # the most audio of one stream in this batch
        if self._peer_gone():
            return frames
        for cursor in relay.subscriptions.of_session(self):
            stream = cursor.stream
            window = stream.window
            self._account(cursor, stale_before)
            if cursor.next_ord >= window.end:
                self._end_if_done(cursor, frames)
                continue
            if not cursor.declared:
                frames.append(
                    self.channel.conn.send(OpenStream(stream.id, stream.name, stream.format))
                )
                cursor.declared = True
            i = cursor.next_ord - window.base + window.head
            end = len(window.seqs)
            sent = 0
            nbytes = 0
            seconds = 0.0
            while i < end and budget > 0:
                if window.seqs[i] > cursor.after_seq:
                    frame = window.frames[i]
                    seconds += window.durations[i]
                    frames.append(frame)
                    budget -= len(frame)
                    nbytes += len(frame)
                    cursor.after_seq = window.seqs[i]
                    sent += 1
                i += 1
            cursor.next_ord = i - window.head + window.base
            self._batch_seconds = max(self._batch_seconds, seconds)
            if sent:
                cursor.sent += sent
                relay.delivery.count_sent(stream.name, sent, nbytes, self.name)
            self._end_if_done(cursor, frames)
            if budget <= 0:
                self.wake.set()  # more to do after this batch is flushed
                break
        return frames

    def _account(self, cursor: Cursor, stale_before: float) -> None:
        """Count what ``cursor`` lost: chunks trimmed before they were sent
        (``replay_window_exceeded``) and live chunks older than
        ``stale_before`` on the relay clock (``subscriber_slow``), skipped."""
        stream = cursor.stream
        window = stream.window
        if cursor.next_ord < window.base:
            # Trimmed before we sent them. Only chunks after our resume
            # point were needed: after a relay restart the publisher
            # re-sends history the subscriber already has, and trimming
            # that is no loss. Nor are numbers the window never held (the
            # publisher's own gap): only what it trimmed counts.
            lost, cursor.after_seq = window.trimmed_after(cursor.after_seq)
            cursor.next_ord = window.base
            if lost:
                cursor.dropped_window += lost
                self.count_drop(stream.name, "replay_window_exceeded", lost)
        if cursor.next_ord >= window.end:
            return
        # Live chunks older than queue_seconds are dropped (oldest first);
        # chunks that were already in the window when we attached are
        # replay and exempt.
        fresh_from = window.ordinal_arrived_at(max(stale_before, cursor.assigned_at))
        exempt_until = window.ordinal_arrived_at(cursor.assigned_at)
        if exempt_until <= cursor.next_ord < fresh_from:
            skipped = self._skip(cursor, fresh_from)
            if skipped:
                self.count_drop(stream.name, "subscriber_slow", skipped)

    async def _stalled(self) -> None:
        """More audio is in flight than ``max_inflight_seconds``: send nothing,
        but skip and count what goes stale meanwhile, until the peer takes
        some or leaves (checked every ``INFLIGHT_POLL`` seconds)."""
        stale_before = self.relay.clock() - self.relay.config.queue_seconds
        for cursor in self.relay.subscriptions.of_session(self):
            self._account(cursor, stale_before)
        if not self._peer_gone():
            self._commit_losses()
        await asyncio.sleep(INFLIGHT_POLL)

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
        return skipped

    def count_drop(self, stream: str, reason: str, n: int) -> None:
        """``n`` chunks of ``stream`` the relay held are lost to this subscriber:
        counted once the session has shown it is alive (its next write went
        out on a connection the client had not closed), so an abandoned
        session (a handshake the client gave up on, a connection the client
        reset or closed while the relay hung) is not charged for chunks the
        client's next session gets, or is charged for itself."""
        self._losses.append((stream, reason, n))
        self.wake.set()

    def _commit_losses(self) -> None:
        if not self._losses:
            return
        if peer_closed(self.channel):
            # The client closed this session while the relay could not read
            # (a hang, a stall): what it lost here its next session resumes.
            # Kept uncommitted; they go with the session.
            return
        losses, self._losses = self._losses, []
        for stream, reason, n in losses:
            self.dropped += n
            self.relay.delivery.count_drop(stream, reason, n, self.name)

    def _peer_gone(self) -> bool:
        return self.channel.closed or self.channel.writer.transport.is_closing()


class ObserverSession(Session):
    """``audiosockets status``: STATUS_REQUEST only."""

    role = Role.OBSERVER

    async def handle(self, event: object) -> None:
        """Answer STATUS_REQUEST with the relay's status report as JSON."""
        if isinstance(event, StatusRequest):
            await self.send_status()
        else:
            await super().handle(event)


SESSION_TYPES: dict[Role, type[Session]] = {
    Role.PUBLISHER: PublisherSession,
    Role.SUBSCRIBER: SubscriberSession,
    Role.OBSERVER: ObserverSession,
}
