"""Relay addresses: ``tcp://HOST:PORT`` or ``tls://HOST:PORT`` (IPv6 as ``tcp://[::1]:7400``).

``tls://`` means TLS on the protocol port (see ``tls.py``): clients verify the
relay's certificate and host name by default. A URL without a scheme is ``tcp://``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

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
    parts = urlsplit(text)
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
