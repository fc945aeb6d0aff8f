"""The reconnect machinery Publisher and Subscriber share.

``ReconnectingClient`` owns one background task that connects (HELLO/WELCOME
through ``client.handshake.connect``), runs the subclass's ``_session`` on the
channel, and reconnects with tenacity (exponential backoff with jitter and a
cap) when the session ends. Every retry is logged and counted in
``audiosockets_reconnects_total``. The API-facing state (spool, positions)
lives in the subclasses and survives reconnects; this module knows only the
wire session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from dataclasses import dataclass

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential_jitter,
)

from ..errors import (
    FATAL_REFUSALS,
    AudiosocketsError,
    ConfigError,
    ConnectionClosed,
    ErrorCode,
    Refused,
    RelayRefused,
    RelayUnreachable,
    RemoteProtocolError,
)
from ..metrics import Metrics
from ..protocol import (
    ErrorFrame,
    Goodbye,
    Hello,
    Limits,
    Role,
)
from ..tasks import cancel_and_wait
from ..transport import Channel
from ..urls import RelayAddress, parse_url
from .handshake import connect

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Reconnect backoff: ``initial`` doubling up to ``cap`` seconds, plus jitter.

    All values in seconds. ``jitter``: up to this much random delay added to
    each wait (tenacity's ``wait_exponential_jitter``); ``connect_timeout``:
    TCP connect plus nothing else (the handshake has
    ``Limits.handshake_timeout``); ``healthy_session``: a session the relay
    ends sooner than this (refusing what we send) backs off like a failed
    connect instead of reconnecting at once.
    """

    initial: float = 0.05
    cap: float = 2.0
    jitter: float = 0.1
    connect_timeout: float = 3.0
    healthy_session: float = 5.0  # a session shorter than this counts as a failed attempt


_RETRYABLE = (RelayUnreachable, ConnectionClosed, RemoteProtocolError, OSError)


def refusal(exc: BaseException, address: RelayAddress | None = None) -> Refused | None:
    """The relay's answer in ``exc`` as a refusal no retry can change, else None.

    A session the relay ended with such a code (e.g. UNAUTHORIZED: a request
    refused by rule, credentials reloaded) is said with the relay's own
    sentence, naming ``address`` when given.
    """
    if isinstance(exc, ConnectionClosed) and exc.code in FATAL_REFUSALS:
        return RelayRefused(_refusal_sentence(exc, address), exc.code)
    if isinstance(exc, Refused):
        return exc
    return None


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, _RETRYABLE) and refusal(exc) is None


def check_wire_name(value: str, what: str, limits: Limits | None = None) -> None:
    """``ValueError`` naming ``what`` when ``value`` is longer than the wire allows
    (``max_name_length`` bytes of UTF-8: a relay would refuse it on every attempt)."""
    limit = (limits or Limits()).max_name_length
    size = len(value.encode("utf-8"))
    if size > limit:
        shown = value if len(value) <= 40 else value[:37] + "..."
        raise ValueError(f"{what} {shown!r} is {size} bytes of UTF-8; the protocol allows {limit}")


def check_wire_names(names: dict[str, str], limits: Limits | None = None) -> None:
    """Check every name a command will send, keyed by what the user sets it with
    (``{"--stream": ..., "--name": ...}``); ``ConfigError`` (exit 2) for the first too long."""
    for what, value in names.items():
        try:
            check_wire_name(value, what, limits)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


#: Session ends that are nobody's fault: reconnect at once (tenacity still
#: backs off if the relay is not back yet).
_BENIGN_CLOSE = frozenset({ErrorCode.NORMAL, ErrorCode.SHUTTING_DOWN, ErrorCode.HEARTBEAT_TIMEOUT})


class ReconnectingClient:
    """Shared connect/reconnect machinery of Publisher and Subscriber.

    One background task (``start``) connects through ``client.handshake.connect``,
    runs the subclass's ``_session(channel)`` until it ends, and reconnects.
    Public state: ``channel`` (the current session or None), ``connected``
    (an ``asyncio.Event``), ``attempts`` (connects tried), ``sessions``
    (sessions established), ``last_error`` (the last failure, one sentence),
    ``failure`` and ``failed``: set when the relay refused for a reason no retry
    can change (``errors.FATAL_REFUSALS``: a bad token, a role, stream or group
    not allowed, a certificate refused either way, a stream another publisher
    holds, what we send too large); the client has then stopped, and
    ``wait_connected`` and the subclasses raise ``failure`` to the application.

    Raises ValueError at construction for a name or token over
    ``Limits.max_name_length`` bytes of UTF-8.
    """

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
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.address = url if isinstance(url, RelayAddress) else parse_url(url)
        self.limits = limits or Limits()
        check_wire_name(name, "client name", self.limits)
        check_wire_name(token, "token", self.limits)
        self.name = name
        self.token = token
        self.tls = tls
        self.metrics = metrics or Metrics()
        self.retry = retry or RetryPolicy()
        self.rcvbuf = 0
        self.channel: Channel | None = None
        self.connected = asyncio.Event()
        self.attempts = 0
        self.sessions = 0
        self.last_error: str | None = None
        #: Why the client ended by itself (a refusal no retry can change), if it did.
        self.failure: AudiosocketsError | None = None
        #: Set when ``failure`` is.
        self.failed = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.metrics.reconnects.labels(self.role.label)
        self.metrics.connected.labels(self.role.label).set(0)

    async def start(self) -> None:
        """Start connecting in the background; returns at once."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"{self.role.label} {self.name}")

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until a session is established (a publisher's streams accepted).

        Returns False if ``timeout`` seconds passed first (None: no limit).
        Raises ``failure`` (a ``Refused``) when the relay refused this client for good.
        """
        try:
            async with asyncio.timeout(timeout):
                waiters = [
                    asyncio.ensure_future(self.connected.wait()),
                    asyncio.ensure_future(self.failed.wait()),
                ]
                try:
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waiters:
                        waiter.cancel()
        except TimeoutError:
            return False
        if self.failure is not None and not self.connected.is_set():
            raise self.failure
        return True

    async def _connect_once(self) -> Channel:
        self.attempts += 1
        if self.attempts > 1:
            self.metrics.reconnects.labels(self.role.label).inc()
        return await connect(
            self.address,
            self._hello(),
            limits=self.limits,
            connect_timeout=self.retry.connect_timeout,
            rcvbuf=self.rcvbuf,
            tls=self.tls,
        )

    def _hello(self) -> Hello:
        return Hello(self.role, self.name, self.token)

    def _fail(self, failure: AudiosocketsError) -> None:
        """End the client: ``failure`` cannot be cured by retrying."""
        if self.failure is None:
            self.failure = failure
            self.last_error = str(failure)
            log.info("%s %r: giving up: %s", self.role.label, self.name, failure)
        self.failed.set()

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
            retry=retry_if_exception(_retryable),
            before_sleep=self._before_sleep,
            reraise=True,
        )
        short_sessions = 0
        fatal: Refused | None = None  # a refusal retrying cannot change
        while not self._closing:
            try:
                channel: Channel = await retrying(self._connect_once)
            except (Refused, ConnectionClosed) as exc:  # the handshake was refused for good
                fatal = refusal(exc)
                if fatal is None:
                    raise
                self._fail(fatal)
                return
            self.channel = channel
            self.sessions += 1
            started = time.monotonic()
            refused = False  # did the relay end this session because of us?
            fatal = None
            try:
                await self._session(channel)
            except Refused as exc:  # we found we cannot send what we have
                self._fail(exc)
            except _RETRYABLE as exc:
                fatal = refusal(exc, self.address)
                if fatal is not None and not self._closing:
                    self._fail(fatal)
                refused = isinstance(exc, RemoteProtocolError) or (
                    isinstance(exc, ConnectionClosed) and exc.code not in _BENIGN_CLOSE
                )
                if fatal is None and not self._closing:
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
            if self._closing or self.failure is not None:
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
        raise NotImplementedError  # Publisher and Subscriber define the session

    def _session_ended(self) -> None:
        pass

    async def _stop_task(self, farewell: bool) -> None:
        self._closing = True
        channel = self.channel
        if channel is not None and farewell:
            await channel.close(Goodbye(ErrorCode.NORMAL, "bye"))
        with contextlib.suppress(Exception):
            await cancel_and_wait(self._task)
        self._task = None


def _refusal_sentence(exc: ConnectionClosed, address: RelayAddress | None) -> str:
    """``relay ended the session: SENTENCE`` said as a refusal (``relay ADDRESS
    refused: SENTENCE``); other texts as they are."""
    text = str(exc)
    prefix = "relay ended the session: "
    if not text.startswith(prefix):
        return text
    relay = f"relay {address}" if address is not None else "relay"
    return f"{relay} refused: {text[len(prefix) :]}"
