"""The one NATS connection of a client: connect, watch, translate errors.

nats-py reconnects by itself (``max_reconnect_attempts=-1``) and re-subscribes;
``NatsLink`` adds what audiosockets needs on top: the ``connected`` gauge and
``reconnects_total`` counter, quiet logging (one line per state change, not a
traceback per failed attempt), permission violations turned into a ``Refused``
for the subject concerned, and the JetStream stream created when missing.

State: ``client`` (the nats-py connection, once ``connect`` returned),
``refused`` (subject -> the server's sentence), ``last_error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import ExternalStream, StorageType, StreamConfig, StreamSource

import nats

from ..errors import ConfigError, Refused
from ..metrics import Metrics
from ..tasks import cancel_and_wait
from ..urls import NatsAddress, parse_nats_url
from .mapping import NatsSettings

log = logging.getLogger(__name__)

_PERMISSION = "permissions violation for"


def address_of(url: str | NatsAddress) -> NatsAddress:
    return url if isinstance(url, NatsAddress) else parse_nats_url(url)


def settings_of(address: NatsAddress, settings: NatsSettings | None) -> NatsSettings:
    if settings is not None:
        return settings
    return NatsSettings.from_options(dict(address.options))


def stream_config(settings: NatsSettings, *, sources: tuple[str, ...] = ()) -> StreamConfig:
    raw = settings.stream_config(sources=sources)
    return StreamConfig(
        name=raw["name"],
        description=raw["description"],
        subjects=raw.get("subjects"),
        max_age=raw["max_age"],
        duplicate_window=raw["duplicate_window"],
        num_replicas=raw["num_replicas"],
        storage=StorageType(raw["storage"]),
        allow_direct=raw["allow_direct"],
        sources=[
            StreamSource(name=s["name"], external=ExternalStream(api=s["external"]["api"]))
            for s in raw.get("sources", [])
        ]
        or None,
    )


class NatsLink:
    """A reconnecting NATS connection for one audiosockets client."""

    def __init__(
        self,
        address: NatsAddress,
        *,
        name: str,
        role_label: str,
        token: str,
        metrics: Metrics,
        settings: NatsSettings,
        connect_timeout: float = 3.0,
        reconnect_wait: float = 0.25,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.address = address
        self.name = name
        self.role_label = role_label
        self.token = token
        self.metrics = metrics
        self.settings = settings
        self.connect_timeout = connect_timeout
        self.reconnect_wait = reconnect_wait
        self.tls = tls
        self.client: Client | None = None
        self.js: JetStreamContext | None = None
        self.connected = asyncio.Event()
        #: Subject (lower case) -> the server's permission violation for it.
        self.refused: dict[str, str] = {}
        self.fatal: Refused | None = None
        self._fatal = asyncio.Event()
        self.last_error: str | None = None
        self.sessions = 0
        self._last_log = 0.0
        self._closing = False
        self.on_reconnect: Callable[[], None] | None = None
        metrics.reconnects.labels(role_label)
        metrics.connected.labels(role_label).set(0)

    async def connect(self) -> JetStreamContext:
        """Connect (retrying forever, like nats-py's own reconnects); raises
        ``Refused`` when the server rejects our credentials."""
        if self.tls is None and (self.address.tls or self.settings.ca):
            try:
                self.tls = ssl.create_default_context(cafile=self.settings.ca)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"NATS CA file {self.settings.ca!r}: {exc}") from exc
        kwargs: dict[str, Any] = {
            "servers": list(self.address.servers),
            "name": self.name,
            "connect_timeout": self.connect_timeout,
            "reconnect_time_wait": self.reconnect_wait,
            "max_reconnect_attempts": -1,
            # Servers in the order listed: the nearest first (a leaf node on
            # this PC, the local cluster node); the others are the fallback.
            "dont_randomize": True,
            "ping_interval": 2,
            "max_outstanding_pings": 2,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "closed_cb": self._on_closed,
            "user": self.address.user,
            "password": self.address.password,
            "token": self.token or None,
            "tls": self.tls,
        }
        # nats-py retries a rejected login forever; a refusal ends the client.
        connecting = asyncio.create_task(nats.connect(**kwargs))
        refused = asyncio.create_task(self._fatal.wait())
        try:
            await asyncio.wait({connecting, refused}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            refused.cancel()
        if not connecting.done():
            with contextlib.suppress(Exception):
                await cancel_and_wait(connecting)
        if self.fatal is not None:
            raise self.fatal
        try:
            client = connecting.result()
        except nats.errors.Error as exc:
            if "authorization" in str(exc).lower():
                raise Refused(f"the NATS server {self.address} refused our credentials") from exc
            raise
        self.client = client
        self.js = client.jetstream(domain=self.settings.domain, timeout=self.connect_timeout)
        self.sessions = 1
        self._set_connected(True)
        return self.js

    async def ensure_stream(self, *, sources: tuple[str, ...] = ()) -> None:
        """Create the JetStream stream if it is missing (``create`` allowing)."""
        js = self.js
        assert js is not None
        try:
            await js.stream_info(self.settings.stream)
            return
        except nats.js.errors.NotFoundError:
            if not self.settings.create:
                raise ConfigError(
                    f"JetStream stream {self.settings.stream!r} does not exist "
                    "(run `audiosockets nats init` or allow create=1)"
                ) from None
        try:
            await js.add_stream(stream_config(self.settings, sources=sources))
            log.info(
                "created JetStream stream %s (%s.>, %d replica(s), %g s)",
                self.settings.stream,
                self.settings.prefix,
                self.settings.replicas,
                self.settings.max_age,
            )
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code == 10058:  # created by another client in between: fine
                return
            raise

    async def close(self) -> None:
        self._closing = True
        client, self.client = self.client, None
        if client is not None and not client.is_closed:
            try:
                async with asyncio.timeout(2.0):
                    await client.close()
            except (TimeoutError, nats.errors.Error, OSError):
                pass
        self._set_connected(False)

    def _set_connected(self, up: bool) -> None:
        if up:
            self.connected.set()
        else:
            self.connected.clear()
        self.metrics.connected.labels(self.role_label).set(1 if up else 0)

    def api_refusal(self) -> Refused | None:
        """A permission violation on the JetStream API or our inbox, as one sentence."""
        subjects = sorted(s for s in self.refused if s.startswith(("$js.", "$kv.", "_inbox.")))
        if not subjects:
            return None
        user = self.address.user or "(anonymous)"
        return Refused(
            f"the NATS server refuses {self.role_label} {self.name!r}: user {user} may not "
            f"use {subjects[0]}"
        )

    async def _on_error(self, exc: Exception) -> None:
        text = str(exc)
        lowered = text.lower()
        if _PERMISSION in lowered:
            # nats-py hands the server's sentence over in lower case: keys are lower case.
            subject = lowered.split('"')[1] if lowered.count('"') >= 2 else lowered
            self.refused[subject] = text
            log.error("%s %r: %s", self.role_label, self.name, text)
            return
        if "authorization violation" in lowered or "authentication" in lowered:
            user = self.address.user or ("token" if self.token else "anonymous")
            self.fatal = Refused(
                f"the NATS server {self.address} refused our credentials (user {user})"
            )
            self._fatal.set()
            return
        self.last_error = text
        now = time.monotonic()
        if now - self._last_log > 5.0:  # one line per 5 s, not one per attempt
            self._last_log = now
            log.warning("%s %r: %s", self.role_label, self.name, text or type(exc).__name__)

    async def _on_disconnected(self) -> None:
        self._set_connected(False)
        if self._closing:
            return
        log.warning("%s %r: disconnected from NATS", self.role_label, self.name)

    async def _on_reconnected(self) -> None:
        self.sessions += 1
        self.metrics.reconnects.labels(self.role_label).inc()
        self._set_connected(True)
        client = self.client
        url = client.connected_url.netloc if client and client.connected_url else "?"
        log.info("%s %r: reconnected to NATS at %s", self.role_label, self.name, url)
        if self.on_reconnect is not None:
            self.on_reconnect()

    async def _on_closed(self) -> None:
        self._set_connected(False)
