"""Who may connect to the relay and what they may do: TLS, identities, refusals.

The decisions are the pure functions of ``credentials``; this module applies
them to connections and sessions:

* ``accept_tls``: the TLS handshake of one connection (``--tls-cert``), and
  with ``--tls-client-ca`` the check that the client presented a certificate,
  whose subject CN may itself identify the client (``certificate`` entries of
  the credentials file).
  A failed handshake (plain TCP on the TLS port, an untrusted certificate) is
  counted in ``audiosockets_tls_handshake_failures_total{reason}`` and logged
  at a rate limit per source address.
* ``AccessControl``: the relay's authenticator (open, ``--token`` or
  ``--credentials FILE``), reloaded from the file on SIGHUP
  (``Relay.reload_credentials``), and ``recheck`` for the sessions then open.
* ``RequestRefused``: raised by a session for a request a rule refuses; the
  connection ends with ERROR ``UNAUTHORIZED`` and the rule's sentence, counted
  in ``audiosockets_refusals_total{reason}``.
* ``AuthThrottle``: failed authentications from one source address wait
  longer and longer before their answer (0.1 s doubling to ``cap``), and
  refusals are logged at most once per ``log_every`` seconds per address,
  with the count of those not logged. Its table of addresses is bounded.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..credentials import (
    REFUSAL_REASONS,
    Authenticator,
    Credentials,
    Identity,
    OpenAccess,
    Refusal,
    SharedToken,
    load_credentials,
    may_open,
    may_publish,
    may_subscribe,
)
from ..errors import ConfigError, ErrorCode
from ..protocol import ErrorFrame
from ..tls import (
    HANDSHAKE_FAILURES,
    handshake_failure,
    requires_client_certificate,
    verified_client_name,
)
from ..transport import LISTEN_BACKLOG

if TYPE_CHECKING:
    from ..metrics import Metrics
    from .server import Relay
    from .sessions import Session

log = logging.getLogger("audiosockets.relay")

#: Refusals of a client neither its token nor its certificate identifies:
#: ``audiosockets_auth_failures_total``, and the throttle's delay.
_UNIDENTIFIED = frozenset({"bad_token", "certificate_unknown", "certificate_mismatch"})

Clock = Callable[[], float]


class RequestRefused(Exception):
    """A session's request (or its HELLO) broke a rule: end it with ERROR UNAUTHORIZED."""

    def __init__(self, refusal: Refusal, who: str = "") -> None:
        super().__init__(refusal.message)
        self.refusal = refusal
        self.who = who  # "publisher 'rec-1'": who asked, for the log line


@dataclass(frozen=True, slots=True)
class Penalty:
    """What ``AuthThrottle`` decided for one refusal: wait ``delay`` seconds before
    answering; write a log line if ``log`` (mentioning ``suppressed`` earlier
    refusals from the same address that were not logged)."""

    delay: float
    log: bool
    suppressed: int


class AuthThrottle:
    """Per source address: slow failed authentications, rate-limit refusal logs.

    ``base``: the first failure's delay (s), doubling per failure up to ``cap``
    (s; below the clients' 5 s handshake timeout so they still read the
    refusal); ``forget_after``: seconds without failures after which an
    address starts again from ``base``; ``log_every``: at most one log line
    per address in that many seconds; ``max_addresses``: the table's bound
    (the least recently refused address is forgotten first).
    """

    def __init__(
        self,
        *,
        base: float = 0.1,
        cap: float = 3.0,
        forget_after: float = 60.0,
        log_every: float = 10.0,
        max_addresses: int = 4096,
        clock: Clock = time.monotonic,
    ) -> None:
        self.base = base
        self.cap = cap
        self.forget_after = forget_after
        self.log_every = log_every
        self.max_addresses = max_addresses
        self.clock = clock
        # address -> [failures, last failure, last log line, refusals not logged]
        self._table: OrderedDict[str, list[float]] = OrderedDict()

    def refused(self, address: str, *, failed_auth: bool) -> Penalty:
        """Record a refusal from ``address``; ``failed_auth`` (a bad token, an
        untrusted certificate) also counts toward the delay."""
        now = self.clock()
        entry = self._table.pop(address, None)
        if entry is None or now - entry[1] > self.forget_after:
            entry = [0.0, now, float("-inf"), 0.0]
        self._table[address] = entry
        while len(self._table) > self.max_addresses:
            self._table.popitem(last=False)
        delay = 0.0
        if failed_auth:
            entry[0] += 1
            delay = min(self.cap, self.base * 2 ** (entry[0] - 1))
        entry[1] = now
        if now - entry[2] >= self.log_every:
            suppressed = int(entry[3])
            entry[2], entry[3] = now, 0.0
            return Penalty(delay, True, suppressed)
        entry[3] += 1
        return Penalty(delay, False, 0)

    def __len__(self) -> int:
        return len(self._table)


def source_address(writer: asyncio.StreamWriter) -> str:
    """The peer's IP address (no port): what throttling and logs key on."""
    peer = writer.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


class AccessControl:
    """The relay's TLS context, authenticator and throttle, in one place.

    ``tls``: the server context (None: plain TCP); ``token``/``credentials``:
    at most one (``ConfigError`` for both); a credentials file is read at once
    (``ConfigError`` naming the file and entry when it is bad).
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        tls: ssl.SSLContext | None = None,
        token: str = "",
        credentials: Path | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if token and credentials is not None:
            raise ConfigError("give the relay --token or --credentials, not both")
        self.metrics = metrics
        self.tls = tls
        self.credentials_path = credentials
        self.authenticator: Authenticator
        if credentials is not None:
            self.authenticator = self._reachable(load_credentials(credentials))
        elif token:
            self.authenticator = SharedToken(token)
        else:
            self.authenticator = OpenAccess()
        self.throttle = AuthThrottle(clock=clock)
        for reason in REFUSAL_REASONS:
            metrics.refusals.labels(reason)
        if tls is not None:
            for failure in HANDSHAKE_FAILURES:
                metrics.tls_handshake_failures.labels(failure)

    @property
    def mode(self) -> str:
        """``credentials``, ``token`` or ``open``: how clients are identified."""
        if isinstance(self.authenticator, Credentials):
            return "credentials"
        return "token" if isinstance(self.authenticator, SharedToken) else "open"

    def identify(self, token: str, certificate: str | None = None) -> Identity | Refusal:
        """The identity HELLO's ``token`` and the verified client certificate's CN
        (``certificate_name``; None: none) stand for, or the refusal."""
        return self.authenticator.authenticate(token, certificate)

    def certificate_name(self, writer: asyncio.StreamWriter) -> str | None:
        """The subject CN of the client certificate this connection's handshake
        verified; None without ``--tls-client-ca`` or without a certificate."""
        if not requires_client_certificate(self.tls):
            return None
        ssl_object = writer.get_extra_info("ssl_object")
        return verified_client_name(ssl_object) if ssl_object is not None else None

    async def refuse(self, address: str, refusal: Refusal, who: str) -> None:
        """Count ``refusal``, log it (rate-limited per address) and, for a bad
        token, wait the throttle's delay before the caller answers."""
        self.metrics.refusals.labels(refusal.reason).inc()
        if refusal.reason in _UNIDENTIFIED:
            self.metrics.auth_failures.inc()
        failed_auth = refusal.reason in _UNIDENTIFIED or refusal.reason == "certificate_required"
        penalty = self.throttle.refused(address, failed_auth=failed_auth)
        if penalty.log:
            more = (
                f" ({penalty.suppressed} more refused since the last line)"
                if penalty.suppressed
                else ""
            )
            log.warning("refused %s from %s: %s%s", who, address, refusal.message, more)
        if penalty.delay:
            await asyncio.sleep(penalty.delay)

    def reload(self) -> Credentials:
        """Read the credentials file again; raises ConfigError (the old ones stay)."""
        if self.credentials_path is None:
            raise ConfigError("the relay has no --credentials file to reload")
        credentials = self._reachable(load_credentials(self.credentials_path))
        self.authenticator = credentials
        return credentials

    def _reachable(self, credentials: Credentials) -> Credentials:
        """``credentials`` if every entry can log in on this relay; ConfigError
        naming the entries that only a client certificate identifies when the relay
        asks for none (without ``--tls-client-ca`` no certificate is ever seen)."""
        if requires_client_certificate(self.tls):
            return credentials
        stranded = [
            c.identity.name
            for c in credentials.clients
            if c.certificate is not None and c.token_sha256 is None
        ]
        if stranded:
            raise ConfigError(
                f"{credentials.source}: {', '.join(map(repr, stranded))} can only log in "
                "with a client certificate, but the relay asks for none: give it "
                "--tls-client-ca (and --tls-cert/--tls-key), or a token_sha256 to the "
                f"entr{'y' if len(stranded) == 1 else 'ies'}"
            )
        return credentials

    def recheck(self, session: Session) -> Refusal | None:
        """Is ``session`` still allowed under the reloaded credentials? Updates its
        identity when it is; returns the refusal (to close it with) when not."""
        assert isinstance(self.authenticator, Credentials), "recheck after reload only"
        found = self.authenticator.identify(session.token_sha256 or None, session.certificate)
        if isinstance(found, Refusal):
            if found.reason == "bad_token":
                return Refusal(found.reason, "credentials reloaded: this token is no longer valid")
            return Refusal(found.reason, f"credentials reloaded: {found.message}")
        refusal = may_open(found, session.role)
        from .sessions import PublisherSession, SubscriberSession

        if refusal is None and isinstance(session, PublisherSession):
            for stream in session.streams.values():
                refusal = refusal or may_publish(found, stream.name)
        if refusal is None and isinstance(session, SubscriberSession) and session.subscription:
            sub = session.subscription
            refusal = may_subscribe(found, sub.pattern, sub.group)
        if refusal is not None:
            return Refusal(refusal.reason, f"credentials reloaded: {refusal.message}")
        session.identity = found
        return None

    def tls_failed(self, exc: BaseException, address: str) -> None:
        """A TLS handshake with ``address`` failed: count it by reason, log it at a
        rate limit, and let an untrusted certificate count toward the throttle."""
        reason = handshake_failure(exc)
        self.metrics.tls_handshake_failures.labels(reason).inc()
        penalty = self.throttle.refused(
            address, failed_auth=reason == "client_certificate_untrusted"
        )
        if penalty.log:
            more = f" ({penalty.suppressed} more since the last line)" if penalty.suppressed else ""
            what = str(exc) or type(exc).__name__  # a reset or EOF says nothing itself
            log.warning("TLS handshake with %s failed (%s): %s%s", address, reason, what, more)

    def client_certificate_refusal(self, writer: asyncio.StreamWriter) -> Refusal | None:
        """With ``--tls-client-ca``: a refusal when the client sent no certificate
        (one from another CA already failed the handshake)."""
        if not requires_client_certificate(self.tls) or writer.get_extra_info("peercert"):
            return None
        return Refusal(
            "certificate_required",
            "a client certificate is required: this relay uses mutual TLS "
            "(give --tls-cert and --tls-key)",
        )


class TLSListener:
    """The relay's TLS port: accepts connections and runs each TLS handshake from
    the first byte (``loop.connect_accepted_socket(ssl=...)``), so that a failed
    handshake raises here, where it is counted and logged, instead of vanishing
    inside the event loop (``start_server(ssl=...)``) or racing a plain reader
    for the ClientHello (``start_tls`` after accepting). Has the parts of
    ``asyncio.Server`` the relay uses: ``sockets``, ``close``, ``wait_closed``.
    """

    def __init__(
        self,
        sockets: list[socket.socket],
        access: AccessControl,
        on_connect: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        *,
        handshake_timeout: float,
        reader: Callable[[], asyncio.StreamReader],
    ) -> None:
        self.sockets = sockets
        self._access = access
        self._on_connect = on_connect
        self._timeout = handshake_timeout
        self._reader = reader
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting = [
            asyncio.create_task(self._accept(sock), name=f"accept {sock.getsockname()}")
            for sock in sockets
        ]

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError as exc:  # out of file descriptors, say: keep accepting
                log.warning("accepting a connection failed: %s", exc)
                await asyncio.sleep(0.1)  # pacing: do not spin while the condition lasts
                continue
            task = asyncio.create_task(self._serve(conn, str(peer[0])))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket, address: str) -> None:
        loop = asyncio.get_running_loop()
        reader = self._reader()
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=self._access.tls, ssl_handshake_timeout=self._timeout
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            conn.close()
            self._access.tls_failed(exc, address)
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        await self._on_connect(reader, writer)

    def is_serving(self) -> bool:
        """True while it accepts connections."""
        return any(not task.done() for task in self._accepting)

    def close(self) -> None:
        """Stop accepting (connections already served go on)."""
        for task in self._accepting:
            task.cancel()
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        """Wait for the accept loops to end."""
        await asyncio.gather(*self._accepting, return_exceptions=True)


async def start_tls_server(
    access: AccessControl,
    on_connect: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    host: str,
    port: int,
    *,
    handshake_timeout: float,
    reader: Callable[[], asyncio.StreamReader],
) -> TLSListener:
    """Listen on ``host``:``port`` (every address it resolves to) for TLS clients;
    ``::`` is one dual-stack socket (IPv4 clients too) where the OS allows it, as
    for plain TCP (``server.listen``). Raises OSError when the address cannot be bound."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, sockaddr in dict.fromkeys(infos):
            address = (sockaddr[0], port or sockaddr[1], *sockaddr[2:])
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                dual = host == "::" and socket.has_dualstack_ipv6()
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
            port = port or int(sock.getsockname()[1])  # port 0: the others take the same one
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return TLSListener(
        sockets, access, on_connect, handshake_timeout=handshake_timeout, reader=reader
    )


def token_digest(token: str) -> bytes:
    """The SHA-256 a session keeps of its token (for rechecks; never the token);
    ``b""`` for no token."""
    return hashlib.sha256(token.encode()).digest() if token else b""


def reload_credentials(relay: Relay) -> bool:
    """Read ``relay``'s ``--credentials`` file again (SIGHUP).

    Sessions still allowed keep running with their new identity; the others
    are closed with ERROR UNAUTHORIZED saying which rule now refuses them
    (counted in ``audiosockets_refusals_total``). A file that does not load is
    logged and the previous credentials stay in force: returns False.
    """
    try:
        credentials = relay.access.reload()
    except ConfigError as exc:
        log.error("credentials not reloaded (the previous ones stay in force): %s", exc)
        return False
    closed = 0
    for session in list(relay.sessions):
        refusal = relay.access.recheck(session)
        if refusal is None:
            continue
        closed += 1
        relay.metrics.refusals.labels(refusal.reason).inc()
        log.warning("closing %s %r: %s", session.role.label, session.name, refusal.message)
        farewell = ErrorFrame(ErrorCode.UNAUTHORIZED, refusal.message)
        session.start_task(session.channel.close(farewell), name=f"revoke {session.name}")
    log.info(
        "credentials reloaded from %s: %d clients; %d sessions closed",
        credentials.source,
        len(credentials.clients),
        closed,
    )
    return True
