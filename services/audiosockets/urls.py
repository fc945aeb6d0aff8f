"""Relay addresses: ``tcp://HOST:PORT`` or ``tls://HOST:PORT`` (IPv6 as
``tcp://[::1]:7400``), and NATS server lists
``nats://HOST:4222[,nats://HOST2:4222][?OPTIONS]`` (``nats+tls://`` for TLS).

``tls://`` is the relay's protocol over TLS (see ``tls.py``): clients verify the
relay's certificate and host name by default. A URL without a scheme is
``tcp://``. NATS over TLS is spelled ``nats+tls://`` so that the two bindings
never claim the same URL; its servers are handed to the NATS client as
``tls://``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, urlsplit

from .errors import ConfigError

DEFAULT_PORT = 7400

Scheme = Literal["tcp", "tls"]
SCHEMES: tuple[Scheme, ...] = ("tcp", "tls")


@dataclass(frozen=True, slots=True)
class RelayAddress:
    """A relay's host, port and whether the session runs over TLS."""

    host: str
    port: int
    scheme: Scheme = "tcp"

    @property
    def tls(self) -> bool:
        """True for ``tls://``: the connection is wrapped in TLS before HELLO."""
        return self.scheme == "tls"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_url(url: str, *, default_port: int = DEFAULT_PORT) -> RelayAddress:
    """Parse a relay URL; a bad one raises ConfigError naming what is wrong."""
    text = url.strip()
    if "://" not in text:
        text = "tcp://" + text
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # e.g. an unclosed "[" of an IPv6 address
        raise ConfigError(f"relay URL {url!r} does not parse: {exc}") from None
    scheme = parts.scheme
    if scheme not in SCHEMES:
        raise ConfigError(
            f"relay URL {url!r} must start with tcp:// or tls:// (got {parts.scheme}://)"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(
            f"relay URL {url!r} must be {scheme}://HOST:PORT with nothing after the port"
        )
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"relay URL {url!r} has an invalid port") from None
    host = parts.hostname
    if not host:
        raise ConfigError(f"relay URL {url!r} has no host")
    return RelayAddress(
        host, default_port if port is None else port, "tls" if scheme == "tls" else "tcp"
    )


# --- NATS (the JetStream binding, PROTOCOL.md "Second binding") ----------------

NATS_SCHEMES = ("nats", "nats+tls")
DEFAULT_NATS_PORT = 4222


@dataclass(frozen=True, slots=True)
class NatsAddress:
    """A NATS server list: ``nats://h1:4222,nats://h2:4222?stream=AUDIO``.

    ``servers`` hold no credentials; ``user``/``password`` come from the URL's
    user info (the same on every server), ``options`` from its query.
    """

    servers: tuple[str, ...]
    user: str | None = None
    password: str | None = None
    options: tuple[tuple[str, str], ...] = ()

    @property
    def tls(self) -> bool:
        """True when a server is ``nats+tls://`` (held here as nats-py's ``tls://``)."""
        return any(s.startswith("tls://") for s in self.servers)

    def __str__(self) -> str:
        return ",".join(self.servers)


def is_nats_url(url: object) -> bool:
    """True for ``nats://`` and ``nats+tls://`` URLs (the JetStream binding)."""
    if isinstance(url, NatsAddress):
        return True
    if not isinstance(url, str):
        return False
    return url.strip().split("://", 1)[0].lower() in NATS_SCHEMES


def parse_nats_url(url: str) -> NatsAddress:
    """Parse a comma-separated NATS server list; a bad one raises ConfigError."""
    servers: list[str] = []
    users: set[tuple[str | None, str | None]] = set()
    options: dict[str, str] = {}
    for part in (p.strip() for p in url.split(",")):
        if not part:
            raise ConfigError(f"NATS URL {url!r} has an empty entry between commas")
        if "://" not in part:
            part = "nats://" + part
        parts = urlsplit(part)
        if parts.scheme not in NATS_SCHEMES:
            raise ConfigError(
                f"NATS URL {part!r} must start with nats:// or nats+tls:// (got {parts.scheme}://)"
            )
        if parts.path not in ("", "/") or parts.fragment:
            raise ConfigError(f"NATS URL {part!r} must be nats://HOST:PORT[?OPTIONS]")
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"NATS URL {part!r} has an invalid port") from None
        if not parts.hostname:
            raise ConfigError(f"NATS URL {part!r} has no host")
        for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
            if options.get(key, value) != value:
                raise ConfigError(f"NATS URL {url!r} sets {key!r} twice, differently")
            options[key] = value
        users.add((parts.username, parts.password))
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        scheme = "tls" if parts.scheme == "nats+tls" else "nats"  # nats-py's spelling
        servers.append(f"{scheme}://{host}:{DEFAULT_NATS_PORT if port is None else port}")
    if len(users) > 1:
        raise ConfigError(f"NATS URL {url!r} names different users for different servers")
    user, password = users.pop()
    return NatsAddress(tuple(servers), user, password, tuple(sorted(options.items())))


def check_url(url: str) -> None:
    """Validate a ``--relay`` value of either binding (tcp:// or tls:// relay, or NATS)."""
    if is_nats_url(url):
        parse_nats_url(url)
    else:
        parse_url(url)


def redact(url: str) -> str:
    """``url`` without passwords, for logs: ``nats://rec1:***@host:4222``."""
    return re.sub(r"(://[^:/@,]*):[^@/,]*@", r"\1:***@", url)
