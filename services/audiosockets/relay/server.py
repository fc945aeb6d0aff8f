"""The relay server: listens, runs one session per connection, routes chunks
from publishers to the subscriptions that want them.

Invariants:
- Publishing never waits on a subscriber: a chunk is appended to the window
  and subscribers' writers are woken; nothing else happens on the publisher's
  path.
- Every chunk a subscriber should get is either written to its socket or
  counted in ``audiosockets_chunks_dropped_total`` with a reason:
  ``subscriber_slow`` when it fell further behind than ``queue_seconds`` of
  live audio, ``replay_window_exceeded`` when what it needed was trimmed; per
  subscriber too (``audiosockets_subscriber_chunks_*``). Sequence numbers that
  never reached the relay are the publisher's loss, never counted here.
- A protocol error closes that one connection with an ERROR frame and bumps
  ``audiosockets_protocol_errors_total``; nothing else is touched. So does a
  bug of ours in one session's tasks (``reason="internal_error"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..audio import AudioFormat
from ..errors import AddressInUse, ConfigError, ErrorCode, RelayRefused
from ..lograte import LogRateLimit
from ..metrics import CallbackCollector, Metrics
from ..names import name_problem
from ..protocol import (
    ChunkData,
    Goodbye,
    Limits,
    encode_chunk,
)
from ..service import HANGUP_SIGNALS, TERMINATE_SIGNALS, run_service, signal_handlers
from ..transport import AccountedReader, start_accounted_server
from ..urls import RelayAddress
from .access import AccessControl, TLSListener, reload_credentials, start_tls_server
from .accounting import DeliveryCounters
from .admission import Guard
from .budget import InputBudget, MemoryLedger, hold_frame
from .connections import serve_connection
from .expiry import Housekeeping
from .groups import Group
from .sessions import PublisherSession, Session, SubscriberSession
from .status import StatusCache, collect_gauges, status_report
from .streams import StreamState
from .subscriptions import Subscriptions

log = logging.getLogger("audiosockets.relay")

Clock = Callable[[], float]
"""A monotonic clock in seconds, ``time.monotonic`` unless a test drives one."""


#: ``RelayConfig``'s fields in seconds: each must be finite.
FLOAT_FIELDS = (
    "replay_seconds",
    "queue_seconds",
    "heartbeat_interval",
    "frame_timeout",
    "max_capture_ahead",
    "max_capture_age",
    "stream_grace_seconds",
    "idle_timeout",
    "status_interval",
    "max_inflight_seconds",
)


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """How the relay listens and how much it holds.

    ``replay_seconds``: audio kept per stream for replay and resume (s, >= 0);
    ``queue_seconds``: how far a subscriber may fall behind live audio before
    its oldest chunks are dropped as ``subscriber_slow`` (s, > 0);
    ``heartbeat_interval``: PING period (s, > 0; a peer silent for three is
    dead); ``max_window_bytes``: memory cap per stream on top of
    ``replay_seconds`` (bytes, frames + per-chunk overhead);
    ``max_window_memory``: what all windows together may hold (bytes; over
    it the oldest audio of the largest window goes first, counted
    ``window_memory_exceeded`` for each reader that had not been sent it);
    ``max_input_bytes``: what all connections together may hold of frames
    not yet complete (bytes after each one's last complete frame; over it the
    connection holding the most is cut, ``protocol_errors_total{reason=
    "input_budget"}``; complete frames not yet read are bounded per
    connection by pausing its socket instead); ``frame_timeout``:
    seconds a frame may take from its first byte to its last (then ERROR,
    ``reason="frame_timeout"``); ``max_capture_ahead``/``max_capture_age``:
    how far a CHUNK's capture time may be from the relay's wall clock (s;
    beyond, ERROR ``reason="capture_time"``; see ``plausible``);
    ``max_batch_bytes``: frames written to one subscriber per drain;
    ``socket_buffer_bytes``: kernel send buffer per connection (0: OS
    default); ``token``: shared secret clients present in HELLO (empty:
    none; the simplest mode: one identity with every role);
    ``credentials``: a credentials file instead (``credentials`` module:
    identities with roles, stream and group scopes; reloaded on SIGHUP);
    ``tls``: a server context (``tls.server_context``: certificate, key and
    optionally the client CA for mutual TLS) or None for plain TCP.

    Limits against runaway and hostile clients (README, "Limits"):
    ``max_streams``: stream names the relay holds at once (an OPEN_STREAM
    beyond it gets CLOSE_STREAM ``refused``); ``max_streams_per_publisher``:
    distinct names one publisher session may declare; ``stream_grace_seconds``:
    how long a stream with no publisher and nothing left in its window is kept
    before it is forgotten with its metric series (s, >= 0);
    ``max_sessions``: connections held at once (lowered at start to the
    descriptor limit minus ``DESCRIPTOR_RESERVE``); ``max_sessions_per_address``:
    connections from one source address; ``idle_timeout``: a session that
    holds nothing (observer, publisher without streams, subscriber before
    SUBSCRIBE) and asks nothing for this long is closed (s, > 0);
    ``max_write_buffer_bytes``: replies queued to a session that does not
    read, beyond which it is cut (bytes; see ``write_buffer_limit``);
    ``status_interval``: least time between two STATUS replies to one session
    (s, >= 0; a request earlier waits, and the session's reading with it);
    ``max_inflight_seconds``: audio written to one subscriber that its host
    has not acknowledged, beyond which nothing more is written (s, > 0;
    ``inflight``). Raises ``ValueError`` for a
    value out of range, a time that is not finite, or a heartbeat or replay
    window too long for WELCOME's u32 milliseconds (4294967 s).
    """

    host: str = "127.0.0.1"
    port: int = 7400
    replay_seconds: float = 30.0
    queue_seconds: float = 2.0
    heartbeat_interval: float = 2.0
    max_window_bytes: int = 256 << 20  # per stream, on top of replay_seconds
    max_window_memory: int = 256 << 20  # all windows together
    max_input_bytes: int = 8 << 20  # incomplete frames, all connections together
    frame_timeout: float = 10.0  # seconds from a frame's first byte to its last
    max_capture_ahead: float = 300.0  # seconds a capture time may be ahead of the relay
    max_capture_age: float = 3650 * 86400.0  # seconds behind it (an old spool is no forgery)
    max_batch_bytes: int = 256 << 10  # per write to one subscriber
    socket_buffer_bytes: int = 1 << 20  # kernel send buffer per connection (0: OS default)
    server_name: str = "audiosockets-relay"
    token: str = ""  # shared secret clients must present in HELLO; empty: none
    credentials: Path | None = None
    tls: ssl.SSLContext | None = None
    limits: Limits = field(default_factory=Limits)
    max_streams: int = 1024  # stream names held at once, relay-wide
    max_streams_per_publisher: int = 64  # distinct names one publisher session declares
    stream_grace_seconds: float = 60.0  # an abandoned, empty stream is forgotten after
    max_sessions: int = 1024  # connections at once (and below the descriptor limit)
    max_sessions_per_address: int = 256  # connections from one source address
    idle_timeout: float = 60.0  # a session holding nothing and asking nothing is closed
    max_write_buffer_bytes: int = 4 << 20  # replies queued to a non-reading session
    status_interval: float = 1.0  # least seconds between STATUS replies to one session
    max_inflight_seconds: float = 1.0  # audio written to a subscriber, not yet acknowledged

    def __post_init__(self) -> None:
        for name in FLOAT_FIELDS:
            if not math.isfinite(getattr(self, name)):  # nan passes every comparison below
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        for name in ("heartbeat_interval", "replay_seconds"):  # WELCOME: u32 milliseconds
            if getattr(self, name) * 1000 > 0xFFFF_FFFF:
                raise ValueError(f"{name} must be at most {0xFFFF_FFFF // 1000} s")
        if self.replay_seconds < 0:
            raise ValueError("replay_seconds must be >= 0")
        if self.queue_seconds <= 0:
            raise ValueError("queue_seconds must be > 0")
        if self.heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be > 0")
        if self.max_window_memory < 1 << 20:
            raise ValueError("max_window_memory must be at least 1 MiB")
        if self.max_input_bytes < self.limits.max_frame_size:
            raise ValueError("max_input_bytes must hold at least one frame of max_frame_size")
        if self.frame_timeout <= 0:
            raise ValueError("frame_timeout must be > 0")
        if self.max_capture_ahead <= 0 or self.max_capture_age <= 0:
            raise ValueError("max_capture_ahead and max_capture_age must be > 0")
        for name in (
            "max_streams",
            "max_streams_per_publisher",
            "max_sessions",
            "max_sessions_per_address",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.stream_grace_seconds < 0:
            raise ValueError("stream_grace_seconds must be >= 0")
        if self.idle_timeout <= 0:
            raise ValueError("idle_timeout must be > 0")
        if self.max_inflight_seconds <= 0:
            raise ValueError("max_inflight_seconds must be > 0")
        if self.status_interval < 0:
            raise ValueError("status_interval must be >= 0")
        if self.max_write_buffer_bytes < 1:
            raise ValueError("max_write_buffer_bytes must be >= 1")

        token_problem = name_problem(
            "--token", self.token, optional=True, limit=self.limits.max_name_length
        )
        if token_problem is not None:  # no client could ever present it
            raise ValueError(token_problem)

    @property
    def write_buffer_limit(self) -> int:
        """Bytes queued to one session beyond which it is cut: the
        configured ``max_write_buffer_bytes``, but never less than one batch
        of audio plus two frames of ``max_frame_size`` (a STATUS reply)."""
        floor = self.max_batch_bytes + 2 * (self.limits.max_frame_size + 16)
        return max(self.max_write_buffer_bytes, floor)


async def listen(
    host: str,
    port: int,
    on_connect: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    budget: InputBudget,
    *,
    access: AccessControl | None = None,
    handshake_timeout: float = 5.0,
) -> asyncio.Server | TLSListener:
    """The relay's listening server on ``host``:``port``, each connection's
    input counted in ``budget``: plain TCP, or TLS when ``access`` has a context
    (``access.start_tls_server``; ``handshake_timeout`` seconds for a handshake).

    The IPv6 wildcard ``::`` is one dual-stack socket (``IPV6_V6ONLY=0``: IPv4
    clients too) where the OS allows it; asyncio alone would bind it IPv6-only.
    Raises ``AddressInUse`` (one sentence) when another program holds the
    address, ``ConfigError`` when this host cannot listen there at all (a name
    that does not resolve, an address it does not have, a port it may not bind).
    """
    try:
        if access is not None and access.tls is not None:
            return await start_tls_server(
                access,
                on_connect,
                host,
                port,
                handshake_timeout=handshake_timeout,
                reader=lambda: AccountedReader(64 << 10, budget),
            )
        sock = None
        if host == "::" and socket.has_dualstack_ipv6():
            sock = socket.create_server((host, port), family=socket.AF_INET6, dualstack_ipv6=True)
        return await start_accounted_server(on_connect, host, port, budget, sock=sock)
    except OSError as exc:
        where = str(RelayAddress(host, port)).removeprefix("tcp://")
        if exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            raise AddressInUse(f"cannot listen on {where}: address already in use") from exc
        # A name that does not resolve, an address not on this host, a port we may
        # not bind: the configuration is wrong, not the moment (exit 2, not 4).
        raise ConfigError(f"cannot listen on {where}: {exc.strerror or exc}") from exc


class Relay:
    """The relay server. ``start()`` binds and returns; ``serve_forever()``
    runs until ``stop()`` (or a signal, via ``run``).

    State: ``streams`` (by name; they outlive their publishers),
    ``subscriptions`` (every subscriber's cursor in every stream), ``groups``
    (by name), ``sessions`` and ``subscribers`` (live ones). ``clock`` is the
    monotonic clock (seconds) arrivals, heartbeats and staleness are measured
    with; ``metrics`` the registry everything is counted in.
    """

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
        cfg = self.config
        self.access = AccessControl(
            self.metrics, tls=cfg.tls, token=cfg.token, credentials=cfg.credentials, clock=clock
        )
        self.streams: dict[str, StreamState] = {}
        self.delivery = DeliveryCounters(self.metrics)  # per-subscriber counts
        self.window_memory = MemoryLedger()  # what every window holds, bytes
        self.input_budget = InputBudget(self.config.max_input_bytes)
        self.refusals_logged = LogRateLimit(10.0, clock)  # protocol errors, by reason
        self.stream_ids: dict[int, StreamState] = {}  # by relay-wide id
        self.subscriptions = Subscriptions()
        self.groups: dict[str, Group] = {}
        self.sessions: set[Session] = set()
        self.subscribers: set[SubscriberSession] = set()
        self._next_stream_id = itertools.count(1)
        self.session_ids = itertools.count(1)  # numbers sessions, from 1
        self._server: asyncio.Server | TLSListener | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # one per connection
        self._stopped = asyncio.Event()
        self.address: RelayAddress | None = None
        self.started_at = time.time()
        self.metrics.registry.register(CallbackCollector(lambda: collect_gauges(self)))
        self.guard = Guard(self)  # the limits: caps, cuts, their counters and log
        self.housekeeping = Housekeeping(self)
        self.status_cache = StatusCache()

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> RelayAddress:
        """Bind the listening socket and return the address clients reach it
        at (the real port when the config says 0). Raises ``AddressInUse``
        when it cannot listen there (see ``listen``). Raises the descriptor
        limit first (``Guard.start``)."""
        if self._server is not None and self.address is not None:
            return self.address  # already started (e.g. by a test before run())
        self.guard.start(asyncio.get_running_loop())
        self._server = await listen(
            self.config.host,
            self.config.port,
            self._on_connect,
            self.input_budget,
            access=self.access,
            handshake_timeout=self.config.limits.handshake_timeout,
        )
        sock = self._server.sockets[0]
        host, port = sock.getsockname()[:2]
        self.address = RelayAddress(
            self.config.host if host in ("0.0.0.0", "::") else host,
            port,
            "tcp" if self.access.tls is None else "tls",
        )
        self.housekeeping.start()
        log.debug("relay listening on %s", self.address)  # the CLI announces it
        return self.address

    @property
    def url(self) -> str:
        """``audiosockets://host:port`` once started (AssertionError before)."""
        assert self.address is not None, "relay not started"
        return str(self.address)

    def readiness(self) -> str | None:
        """None while the relay accepts clients, else why not (one sentence):
        the readiness check of ``/readyz`` (see ``health.py``). Callable from
        any thread: it only reads the listener's state."""
        server = self._server
        if server is None or self.address is None:
            return "relay has not started listening"
        if not server.is_serving():
            return f"relay not listening on {self.address}"
        return None

    async def serve_forever(self) -> None:
        """Return once the relay has stopped (``stop()`` was called)."""
        await self._stopped.wait()

    async def stop(self, *, timeout: float = 2.0) -> None:
        """Tell every client goodbye, close the listener, wait for sessions to
        end (at most ``timeout`` seconds for each step)."""
        if self._server is not None:
            self._server.close()
        self.housekeeping.stop()
        self.guard.stop()
        farewell = Goodbye(ErrorCode.SHUTTING_DOWN, "relay shutting down")
        await asyncio.gather(
            *(s.channel.close(farewell, timeout=timeout) for s in list(self.sessions)),
            return_exceptions=True,
        )
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        if self._server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(timeout):
                    await self._server.wait_closed()
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
        async with self.guard.admitted(writer) as admitted:
            if admitted:
                self._tasks.add(task)
                try:
                    await serve_connection(self, reader, writer)
                finally:
                    self._tasks.discard(task)

    # -- publishing ----------------------------------------------------------

    def open_stream(self, publisher: PublisherSession, name: str, fmt: AudioFormat) -> StreamState:
        """Make ``publisher`` the publisher of stream ``name`` and return it.

        A new name makes a new stream (and its zeroed metric series); a known
        one keeps its window, unless ``fmt`` differs (window cleared, readers
        get OPEN_STREAM again). A stream has one publisher at a time: the same
        owner (its identity with ``--credentials``, else the publisher run, HELLO
        ``instance``) reconnecting takes it back at once, and
        its earlier (stale) session is told GOODBYE ``REPLACED``; any other is
        refused: ``RelayRefused`` STREAM_IN_USE, which ends its session. Readers
        waiting for a CLOSE_STREAM of it no longer get one.

        Raises ``StreamRefused`` past a stream cap (``Guard.check_stream``);
        only a new stream is offered (re-declaring rebalances nothing)."""
        self.guard.check_stream(publisher, name)
        publisher.names.add(name)
        stream = self.streams.get(name)
        holder = stream.publisher if stream is not None else None
        if holder is not None and holder is not publisher and not holder.same_owner(publisher):
            raise RelayRefused(
                f"stream {name} is already published by {holder.name} from {holder.channel.peer}",
                ErrorCode.STREAM_IN_USE,
            )
        new = stream is None
        if stream is None:
            stream = StreamState.create(
                next(self._next_stream_id), name, fmt, self.metrics, self.window_memory
            )
            stream.owner = publisher.identity.name  # "" without per-client credentials
            self.streams[name] = stream
            self.stream_ids[stream.id] = stream
            log.info("stream %r opened by %r (%s)", name, publisher.name, fmt)
        elif stream.format != fmt:
            stream.change_format(fmt, self.subscriptions.readers(name).values())
        old = stream.publisher
        if old is not None and old is not publisher:
            old.replaced_by(publisher, name)
        stream.publisher = publisher
        stream.abandoned_at = None
        for cursor in self.subscriptions.readers(name).values():
            cursor.end_after = None  # back before readers caught up: not ended
        if new:
            self._offer(stream)
        return stream

    def publish(self, stream: StreamState, chunk: ChunkData) -> None:
        """Append ``chunk`` to ``stream``'s window (``budget.hold_frame``), wake its readers.
        A seq at or below the last is a duplicate (``duplicates_suppressed_total``,
        dropped); one beyond the next counts the missing in ``sequence_gaps_total``."""
        name = stream.name
        m = self.metrics
        if chunk.seq <= stream.last_seq:
            m.duplicates_suppressed.labels(name).inc()
            return
        if stream.last_seq >= 0 and chunk.seq > stream.last_seq + 1:
            m.sequence_gaps.labels(name).inc(chunk.seq - stream.last_seq - 1)
        nbytes = len(chunk.payload)
        frame = encode_chunk(stream.id, chunk.seq, chunk.captured_ns, chunk.payload)
        stream.last_arrival = now = self.clock()
        hold_frame(self, stream, chunk.seq, frame, stream.format.seconds(nbytes), now)
        stream.last_seq = chunk.seq
        stream.last_captured_ns = chunk.captured_ns
        stream.chunks_total += 1
        counters = stream.counters
        counters.received.inc()
        counters.received_bytes.inc(nbytes)
        counters.latency.observe(max(0.0, (time.time_ns() - chunk.captured_ns) / 1e9))
        for reader in self.subscriptions.readers(name):
            reader.wake.set()

    def stream_ended(self, stream: StreamState) -> None:
        """The publisher closed the stream: each reader gets CLOSE_STREAM after
        the last chunk (processors finish their files), unless it reopens first."""
        log.info("stream %r closed by its publisher at seq %d", stream.name, stream.last_seq)
        for reader, cursor in self.subscriptions.readers(stream.name).items():
            cursor.end_after = stream.last_seq
            reader.wake.set()

    # -- subscribing ---------------------------------------------------------

    def subscribe(self, session: SubscriberSession) -> None:
        """``session`` sent SUBSCRIBE: join its group (and rebalance it) or
        attach every matching stream at its resume point."""
        _point_out_a_shared_name(self, session)
        self.subscribers.add(session)
        group_name = session.group_name
        if group_name:
            group = self.groups.setdefault(group_name, Group(group_name))
            group.members.append(session)
            group.empty_since = None
            session.group = group
            group.rebalance(self.streams, self.subscriptions)
        else:
            for stream in list(self.streams.values()):
                if session.matches(stream.name):
                    session.attach(stream, session.resume.get(stream.name))

    def unsubscribe(self, session: SubscriberSession) -> None:
        """``session`` ended: leave its group, whose other members take over."""
        self.subscribers.discard(session)
        if session.group is not None:
            session.group.leave(session, self.streams, self.subscriptions, self.clock())
            session.group = None

    def _offer(self, stream: StreamState) -> None:
        """A stream appeared (or came back): attach it where it belongs."""
        for session in list(self.subscribers):
            if (
                session.group is None
                and session.matches(stream.name)
                and self.subscriptions.get(session, stream.name) is None
            ):
                session.attach(stream, session.resume.get(stream.name))
        for group in list(self.groups.values()):
            if any(m.matches(stream.name) for m in group.members):
                group.rebalance(self.streams, self.subscriptions)

    def ack(self, session: SubscriberSession, stream_id: int, seq: int) -> None:
        """``session`` confirmed ``seq`` in the stream with relay id ``stream_id``
        (its group's resume point; ignored outside a group or for another
        member's stream)."""
        stream = self.stream_ids.get(stream_id)
        if stream is not None and session.group is not None:
            session.group.ack(session, stream.name, seq)

    # -- accounting ----------------------------------------------------------

    def status(self) -> dict[str, object]:
        """The report ``audiosockets status`` prints (see ``status_report``)."""
        return status_report(self)

    # -- credentials ----------------------------------------------------------

    def reload_credentials(self) -> bool:
        """Read ``--credentials`` again (SIGHUP); see ``access.reload_credentials``."""
        return reload_credentials(self)

    # -- running as a service -------------------------------------------------

    async def run(
        self,
        *,
        ready: Callable[[Relay], None] | None = None,
        signals: Iterable[signal.Signals] = TERMINATE_SIGNALS,
    ) -> None:
        """Serve until SIGINT/SIGTERM (or ``stop()``), then drain and return.

        The one service lifecycle (``service.run_service``): signal handlers go in
        before the socket is bound and ``ready`` is called, so a signal sent as soon
        as we announce ourselves is handled; the previous handlers are restored on
        the way out. Raises ``AddressInUse`` as ``start`` does.
        """
        # SIGHUP reloads --credentials (sessions stay). Without them it is handled
        # too: its default action would kill the relay (and every stream) for a
        # habitual `kill -HUP` (logrotate, an operator following the README).
        with signal_handlers(lambda: _on_hangup(self), HANGUP_SIGNALS):
            await run_service(self, ready=ready, signals=signals)


def _point_out_a_shared_name(relay: Relay, session: SubscriberSession) -> None:
    """Log (once per interval) that ``session`` takes a client name another live
    subscriber has: per-subscriber series and status rows are keyed by name."""
    twin = next((s for s in relay.subscribers if s.name == session.name), None)
    if twin is not None:
        relay.refusals_logged.warning(
            log,
            "duplicate_subscriber_name",
            "two subscribers are named %r (from %s and %s): their per-subscriber "
            "counters and status rows add up as one; give each its own --name",
            session.name,
            twin.channel.peer,
            session.channel.peer,
        )


def _on_hangup(relay: Relay) -> None:
    """SIGHUP: reload ``--credentials``, or say there are none to reload."""
    if relay.access.credentials_path is None:
        log.info("SIGHUP: nothing to reload (the relay runs without --credentials)")
    else:
        relay.reload_credentials()
