"""One client connection on the relay: the handshake, the session's task
group, and how the connection ends.

Every task a session starts (the subscriber's writer, a takeover's goodbye)
lives in the session's ``asyncio.TaskGroup``, so none can die unseen: a
protocol error ends the session with its ERROR code, an unexpected exception
(a bug of ours) with ERROR ``INTERNAL``, a count in
``audiosockets_protocol_errors_total{reason="internal_error"}`` and one log
line with the traceback. Either way only that connection ends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..credentials import Identity, Refusal, may_open
from ..errors import ConnectionClosed, ErrorCode, RelayRefused, RemoteProtocolError
from ..protocol import ChunkData, Connection, ErrorFrame, Event, Goodbye, Hello, Welcome
from ..transport import Channel, WriteBufferFull, tune_socket
from ..untrusted import clip
from .access import RequestRefused, source_address, token_digest
from .sessions import SESSION_TYPES, PublisherSession, Session, SubscriberSession

if TYPE_CHECKING:
    from .server import Relay

_FAREWELL = (Goodbye, ErrorFrame)

log = logging.getLogger("audiosockets.relay")

#: SO_RCVBUF of a relay connection (Linux doubles it): 64 KiB holds 100 ms of
#: 48 kHz 64-channel int16 audio, and bounds what one read brings in.
RECEIVE_BUFFER_BYTES = 64 << 10
#: Events one session handles before it lets the others run.
FAIR_SHARE = 32


def _the_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception of a session's task group to handle: a bug first,
    then whatever came first."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending[:0] = exc.exceptions
        else:
            leaves.append(exc)
    expected = (
        RemoteProtocolError,
        RelayRefused,
        RequestRefused,
        ConnectionClosed,
        asyncio.CancelledError,
    )
    return next((e for e in leaves if not isinstance(e, expected)), leaves[0])


async def serve_connection(
    relay: Relay, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Serve one client of ``relay`` until it leaves, breaks the protocol,
    goes silent for three heartbeat intervals, is refused, or the relay stops.
    Raises nothing but ``CancelledError``: every end is handled here."""
    # A small receive buffer: each read takes at most this much off the socket,
    # so what a connection holds before the input budget sees it stays small.
    tune_socket(writer, sndbuf=relay.config.socket_buffer_bytes, rcvbuf=RECEIVE_BUFFER_BYTES)
    writer.transport.set_write_buffer_limits(high=64 * 1024)
    cfg = relay.config
    address = source_address(writer)  # (on a TLS port the handshake is done: TLSListener)
    channel = Channel(
        reader,
        writer,
        Connection("relay", cfg.limits),
        heartbeat_interval=cfg.heartbeat_interval,
        heartbeat_timeout=3 * cfg.heartbeat_interval,
        clock=relay.clock,
        frame_timeout=cfg.frame_timeout,
        input_account=relay.input_budget,
        max_write_buffer=cfg.write_buffer_limit,
    )
    session: Session | None = None
    certificate = relay.access.certificate_name(writer)
    try:
        admitted = await _handshake(relay, channel, certificate)
        if admitted is None:
            return
        hello, identity = admitted
        session = SESSION_TYPES[hello.role](relay, channel, hello, next(relay.session_ids))
        session.identity = identity
        session.token_sha256 = token_digest(hello.token)
        session.certificate = certificate
        relay.sessions.add(session)
        relay.metrics.connected_clients.labels(session.role.label).inc()
        log.info("%s %r connected from %s", session.role.label, session.name, channel.peer)
        try:
            async with asyncio.TaskGroup() as session.tasks:
                await _read_events(session)
        except BaseExceptionGroup as group:
            raise _the_error(group) from None
    except RemoteProtocolError as exc:
        relay.metrics.protocol_errors.labels(exc.reason).inc()
        # One line per reason per interval; the counter has every one.
        now, held = relay.refusals_logged.allow(exc.reason)
        if now:
            who = f"{session.role.label} {session.name!r}" if session else "client"
            more = f" ({held} more {exc.reason} since the last line)" if held else ""
            log.warning("closing %s from %s: %s%s", who, channel.peer, exc, more)
        await channel.close(ErrorFrame(exc.code, str(exc)))
    except RequestRefused as exc:
        who = f"{session.role.label} {session.name!r}" if session else exc.who or "client"
        await relay.access.refuse(address, exc.refusal, who)
        await channel.close(ErrorFrame(ErrorCode.UNAUTHORIZED, exc.refusal.message))
    except WriteBufferFull as exc:
        # It does not read: no farewell could reach it, and waiting for one
        # to flush would hold the buffer longer.
        channel.abort()
        if session is not None:
            relay.guard.cut_session(
                session, "write_buffer_full", ErrorFrame(ErrorCode.INTERNAL, str(exc))
            )
        else:
            relay.guard.counters.sessions_cut.labels("write_buffer_full").inc()
    except RelayRefused as exc:  # e.g. a stream another publisher holds
        if exc.code == ErrorCode.STREAM_IN_USE:  # another run (or identity) owns it
            relay.metrics.refusals.labels("stream_owned").inc()
        # A client retrying a refused claim must not flood the log: one line per
        # code per interval, the counter has every one.
        now, held = relay.refusals_logged.allow(f"refused_{exc.code.name.lower()}")
        if now:
            who = f"{session.role.label} {session.name!r}" if session else "client"
            more = f" ({held} more like it since the last line)" if held else ""
            log.warning("refused %s from %s: %s%s", who, channel.peer, exc, more)
        await channel.close(ErrorFrame(exc.code, str(exc)))
    except ConnectionClosed as exc:
        if session is not None:
            log.info("%s %r disconnected: %s", session.role.label, session.name, exc)
    except asyncio.CancelledError:
        raise
    except Exception:  # a bug of ours: close this connection, keep the relay
        relay.metrics.protocol_errors.labels("internal_error").inc()
        log.exception("internal error serving %s", channel.peer)
        await channel.close(ErrorFrame(ErrorCode.INTERNAL, "internal relay error"))
    finally:
        if session is not None:
            relay.sessions.discard(session)
            session.detach()
            relay.metrics.connected_clients.labels(session.role.label).dec()
        await channel.close()


async def _handshake(
    relay: Relay, channel: Channel, certificate: str | None
) -> tuple[Hello, Identity] | None:
    """Read HELLO, identify the client (by its token and ``certificate``, the
    verified client certificate's CN) and check its role, answer WELCOME,
    start heartbeats. None when the client left; ``RequestRefused`` when a
    rule refuses it (its certificate, token or role)."""
    cfg = relay.config
    try:
        async with asyncio.timeout(cfg.limits.handshake_timeout):
            hello = await channel.next_event()
    except TimeoutError:
        raise RemoteProtocolError(
            f"no HELLO within {cfg.limits.handshake_timeout:g} s",
            ErrorCode.HANDSHAKE_TIMEOUT,
        ) from None
    if not isinstance(hello, Hello):
        return None  # GOODBYE/ERROR before the handshake: just close
    access = relay.access
    found: Identity | Refusal | None = access.client_certificate_refusal(channel.writer)
    if found is None:
        found = access.identify(hello.token, certificate)
    if isinstance(found, Identity):
        found = may_open(found, hello.role) or found
    if isinstance(found, Refusal):
        raise RequestRefused(found, f"{hello.role.label} {hello.client_name!r}")
    heartbeat_ms = max(1, int(cfg.heartbeat_interval * 1000))
    replay_ms = int(cfg.replay_seconds * 1000)
    channel.send(Welcome(cfg.server_name, heartbeat_ms, cfg.limits.max_frame_size, replay_ms))
    channel.start_heartbeat()
    return hello, found


async def _read_events(session: Session) -> None:
    """Hand the session its events until GOODBYE/ERROR; then stop its writer.

    Every event of one read is handled before the next read, without an await
    per event, and a publisher's chunks (nearly every event) go to
    ``PublisherSession.on_chunk`` directly, runs of them decoded together
    (``Channel.poll_chunks``). Every ``FAIR_SHARE`` events it yields to the
    other sessions."""
    channel = session.channel
    clock = session.relay.clock
    on_chunk = session.on_chunk if isinstance(session, PublisherSession) else None
    handled = 0
    while True:
        event: Event | None = await channel.next_event()
        while event is not None:
            if isinstance(event, _FAREWELL):
                log.info(
                    "%s %r said goodbye: %s", session.role.label, session.name, clip(event.message)
                )
                if isinstance(session, SubscriberSession) and session.writer is not None:
                    session.writer.cancel()
                return
            session.last_active = clock()
            if on_chunk is not None and type(event) is ChunkData:
                on_chunk(event)
            else:
                await session.handle(event)
            handled += 1
            if on_chunk is not None and handled % FAIR_SHARE:
                # The CHUNKs right behind it, within this turn's fair share,
                # decoded as a run (Channel.poll_chunks), not one event each.
                for fields in channel.poll_chunks(FAIR_SHARE - handled % FAIR_SHARE):
                    on_chunk(ChunkData(*fields))
                    handled += 1
            if handled % FAIR_SHARE == 0:
                # A client whose frames arrive faster than we handle them would
                # keep the loop to itself for a whole read (thousands of frames):
                # let the other sessions run.
                await asyncio.sleep(0)
            event = channel.poll_event()
