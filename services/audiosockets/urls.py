"""Relay addresses: ``tcp://HOST:PORT`` (IPv6 as ``tcp://[::1]:7400``)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import ConfigError

DEFAULT_PORT = 7400


@dataclass(frozen=True, slots=True)
class RelayAddress:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse_url(url: str, *, default_port: int = DEFAULT_PORT) -> RelayAddress:
    """Parse a relay URL; a bad one raises ConfigError naming what is wrong."""
    text = url.strip()
    if "://" not in text:
        text = "tcp://" + text
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # e.g. an unclosed "[" of an IPv6 address
        raise ConfigError(f"relay URL {url!r} does not parse: {exc}") from None
    if parts.scheme != "tcp":
        raise ConfigError(f"relay URL {url!r} must start with tcp:// (got {parts.scheme}://)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"relay URL {url!r} must be tcp://HOST:PORT with nothing after the port")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"relay URL {url!r} has an invalid port") from None
    host = parts.hostname
    if not host:
        raise ConfigError(f"relay URL {url!r} has no host")
    return RelayAddress(host, default_port if port is None else port)
