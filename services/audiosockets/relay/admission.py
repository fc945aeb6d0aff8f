"""Who gets a session, and how refusals and cuts are counted and logged.

- ``LimitCounters``: the counters every limit of the relay reports to, each
  with a ``reason`` label, created at zero so a scrape shows them before the
  first refusal.
- ``Admission``: the session caps, relay-wide and per source address,
  checked when a connection is accepted (before anything is read from it, so
  a refused client costs a descriptor for the time it takes to say why).
- ``raise_nofile``: the soft descriptor limit raised to the hard one at start,
  and the session cap held below it.
- ``Guard``: the relay's limits at run time, built on the above: admission at
  accept, stream caps at OPEN_STREAM, cutting a session, accept errors; its
  log lines go through ``lograte.LogRateLimit`` (one per reason per interval,
  the rest counted into the next line), so a flood of refusals cannot flood
  the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter as Tally
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter

from ..errors import ErrorCode
from ..lograte import LogRateLimit
from ..protocol import Connection, ErrorFrame, Goodbye

if TYPE_CHECKING:
    from .server import Relay
    from .sessions import PublisherSession, Session

log = logging.getLogger("audiosockets.relay")

#: Descriptors kept free of sessions: the listener, the metrics endpoint and
#: its scrapes, log files, and the accept() that tells a refused client why.
DESCRIPTOR_RESERVE: Final = 64

SESSION_REFUSALS: Final = ("relay_full", "address_full")
SESSION_CUTS: Final = ("idle", "write_buffer_full")
STREAM_REFUSALS: Final = ("relay_streams_full", "publisher_streams_full")
THROTTLES: Final = ("status_rate",)


class LimitCounters:
    """The relay's limit counters on ``registry``.

    ``sessions_refused{reason}``: connections refused at accept
    (``relay_full``, ``address_full``); ``sessions_cut{reason}``: open sessions
    the relay ended to protect itself (``idle``, ``write_buffer_full``);
    ``streams_refused{reason}``: OPEN_STREAMs answered CLOSE_STREAM
    ``refused`` (``relay_streams_full``, ``publisher_streams_full``);
    ``streams_forgotten``: streams forgotten after their grace period;
    ``requests_throttled{reason}``: requests answered late by a rate limit
    (``status_rate``); ``accept_errors``: failed ``accept()`` calls (out of
    descriptors, usually).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.sessions_refused = Counter(
            "audiosockets_sessions_refused",
            "Connections the relay refused at accept because a session cap was reached.",
            ["reason"],
            registry=r,
        )
        self.sessions_cut = Counter(
            "audiosockets_sessions_cut",
            "Open sessions the relay ended to protect itself, by reason.",
            ["reason"],
            registry=r,
        )
        self.streams_refused = Counter(
            "audiosockets_streams_refused",
            "OPEN_STREAMs refused because a stream cap was reached, by reason.",
            ["reason"],
            registry=r,
        )
        self.streams_forgotten = Counter(
            "audiosockets_streams_forgotten",
            "Streams forgotten (window, position, metric series) after their grace period.",
            registry=r,
        )
        self.requests_throttled = Counter(
            "audiosockets_requests_throttled",
            "Requests answered late because of a per-session rate limit, by reason.",
            ["reason"],
            registry=r,
        )
        self.accept_errors = Counter(
            "audiosockets_accept_errors",
            "accept() calls that failed on the listening socket (e.g. out of descriptors).",
            registry=r,
        )
        for counter, reasons in (
            (self.sessions_refused, SESSION_REFUSALS),
            (self.sessions_cut, SESSION_CUTS),
            (self.streams_refused, STREAM_REFUSALS),
            (self.requests_throttled, THROTTLES),
        ):
            for reason in reasons:
                counter.labels(reason)


class Admission:
    """Session caps: ``max_sessions`` relay-wide and ``per_address`` per source
    address (IP, port ignored). ``admit`` takes a place or says why not;
    ``release`` gives it back."""

    def __init__(self, max_sessions: int, per_address: int) -> None:
        self.max_sessions = max_sessions
        self.per_address = per_address
        self.total = 0
        self.by_address = Tally[str]()

    def admit(self, address: str) -> str | None:
        """Take a place for a connection from ``address``; None when admitted,
        else the refusal reason (``relay_full`` or ``address_full``)."""
        if self.total >= self.max_sessions:
            return "relay_full"
        if self.by_address[address] >= self.per_address:
            return "address_full"
        self.total += 1
        self.by_address[address] += 1
        return None

    def release(self, address: str) -> None:
        """Give back the place an admitted connection from ``address`` held."""
        self.total -= 1
        self.by_address[address] -= 1
        if self.by_address[address] <= 0:
            del self.by_address[address]


def raise_nofile() -> int | None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; returns the soft
    limit now in force (None where there is no such limit, e.g. Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    elif hard == resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < 1 << 16:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 16, hard))
            soft = 1 << 16
        except (ValueError, OSError):
            pass
    return None if soft == resource.RLIM_INFINITY else int(soft)


def session_cap(configured: int, nofile: int | None) -> int:
    """The session cap in force: ``configured``, held below the descriptor
    limit ``nofile`` by ``DESCRIPTOR_RESERVE`` (at least 1)."""
    if nofile is None:
        return configured
    return max(1, min(configured, nofile - DESCRIPTOR_RESERVE))


class StreamRefused(Exception):
    """An OPEN_STREAM would pass a stream cap; ``reason`` is the
    ``audiosockets_streams_refused_total`` label. The publisher gets
    CLOSE_STREAM ``refused`` for that stream; its session goes on."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Guard:
    """The limits of one relay at run time (``relay.guard``).

    ``counters`` (``LimitCounters``), ``logged`` (``LogRateLimit``, one line
    per kind of refusal per 10 s), ``admission`` (session caps). ``start``
    raises the descriptor limit and installs the accept-error handler;
    ``stop`` restores the loop's previous handler.
    """

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        cfg = relay.config
        self.counters = LimitCounters(relay.metrics.registry)
        self.logged = LogRateLimit(10.0, relay.clock)
        self.admission = Admission(cfg.max_sessions, cfg.max_sessions_per_address)
        self._restore: Callable[[], None] = lambda: None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Raise the soft descriptor limit, hold the session cap below it
        (``session_cap``), count and rate-limit accept errors on ``loop``."""
        configured = self.relay.config.max_sessions
        nofile = raise_nofile()
        cap = session_cap(configured, nofile)
        if cap < configured:
            log.info(
                "at most %d sessions: the descriptor limit is %s (max_sessions %d)",
                cap,
                nofile,
                configured,
            )
        self.admission.max_sessions = cap
        previous = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
            # Failed accept() calls (out of descriptors): counted, logged once
            # per interval instead of a traceback each; the rest goes on.
            message = str(context.get("message", ""))
            if "accept" in message and isinstance(context.get("exception"), OSError):
                self.counters.accept_errors.inc()
                self.logged.warning(
                    log, "accept", "cannot accept connections: %s", context["exception"]
                )
            elif previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)

        def restore() -> None:
            if loop.get_exception_handler() is handler:
                loop.set_exception_handler(previous)

        self._restore = restore

    def stop(self) -> None:
        """Give the loop its previous exception handler back."""
        self._restore()

    async def refuse(self, writer: asyncio.StreamWriter, address: str, reason: str) -> None:
        """Tell a client over a session cap why (ERROR OVERLOADED, without
        reading anything from it) and close; counted and logged at a rate limit."""
        self.counters.sessions_refused.labels(reason).inc()
        if reason == "relay_full":
            why = f"the relay holds its maximum of {self.admission.max_sessions} sessions"
        else:
            why = f"{self.admission.per_address} sessions from {address} already"
        self.logged.warning(
            log, f"refuse:{reason}", "refused a connection from %s (%s): %s", address, reason, why
        )
        frame = ErrorFrame(ErrorCode.OVERLOADED, f"{why}; retry later")
        with contextlib.suppress(Exception):
            writer.write(Connection("relay", self.relay.config.limits).send(frame))
            async with asyncio.timeout(1.0):
                await writer.drain()
        writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await writer.wait_closed()

    @contextlib.asynccontextmanager
    async def admitted(self, writer: asyncio.StreamWriter) -> AsyncIterator[bool]:
        """Admit the connection of ``writer`` for the block (its place is given
        back after), or refuse it (``refuse``) and yield False."""
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        refused = self.admission.admit(address)
        if refused is not None:
            await self.refuse(writer, address, refused)
            yield False
            return
        try:
            yield True
        finally:
            self.admission.release(address)

    def check_stream(self, publisher: PublisherSession, name: str) -> None:
        """Raise ``StreamRefused`` (counted in
        ``audiosockets_streams_refused_total``) when ``name`` would be more than
        ``max_streams_per_publisher`` names declared by ``publisher``, or a new
        stream beyond ``max_streams`` on the relay. At the relay's cap, streams
        that hold nothing (no publisher, empty window) are forgotten first,
        without waiting for their grace period."""
        relay = self.relay
        cfg = relay.config
        if name not in publisher.names and len(publisher.names) >= cfg.max_streams_per_publisher:
            self.counters.streams_refused.labels("publisher_streams_full").inc()
            raise StreamRefused(
                "publisher_streams_full",
                f"this session already declared {cfg.max_streams_per_publisher} stream names",
            )
        if name in relay.streams or len(relay.streams) < cfg.max_streams:
            return
        from .expiry import forget_streams  # expiry imports the sessions, which import us

        forget_streams(
            relay,
            [s for s in relay.streams.values() if s.publisher is None and not len(s.window)],
        )
        if len(relay.streams) >= cfg.max_streams:
            self.counters.streams_refused.labels("relay_streams_full").inc()
            raise StreamRefused(
                "relay_streams_full", f"the relay holds its maximum of {cfg.max_streams} streams"
            )

    def cut_session(self, session: Session, reason: str, farewell: Goodbye | ErrorFrame) -> None:
        """End ``session`` to protect the relay: counted in
        ``audiosockets_sessions_cut_total{reason}``, logged at a rate limit,
        ``farewell`` sent and the connection closed."""
        session.cut_reason = reason
        self.counters.sessions_cut.labels(reason).inc()
        self.logged.warning(
            log,
            f"cut:{reason}",
            "closing %s %r from %s (%s): %s",
            session.role.label,
            session.name,
            session.channel.peer,
            reason,
            farewell.message,
        )
        if session.start_task(session.channel.close(farewell), name=f"cut {session.name}") is None:
            session.channel.abort()
