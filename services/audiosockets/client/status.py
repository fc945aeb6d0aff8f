"""One-shot status query of a relay (an OBSERVER session)."""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any

from ..errors import ConnectionClosed, ErrorCode, RelayRefused, RelayUnreachable
from ..protocol import (
    ErrorFrame,
    Goodbye,
    Hello,
    Role,
    Status,
    StatusRequest,
)
from ..urls import RelayAddress, parse_url
from .handshake import connect
from .session import check_wire_names, refusal


async def fetch_status(
    url: str | RelayAddress,
    *,
    timeout: float = 5.0,
    token: str = "",
    tls: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """Ask a relay for its status report (one attempt, no retries).

    ``timeout`` (seconds) bounds the connect and, separately, the answer.
    Returns the report's JSON document as a dict (see the relay's status
    module for its keys). ``tls``: as for ``Publisher``. Raises ConfigError
    for a token over the protocol's name limit (before connecting),
    RelayUnreachable when the relay cannot be reached or does not answer with
    STATUS, Refused (``RelayRefused`` from our relay) when it refuses the
    session or the request for good (token, role, certificate: exit 1),
    ConnectionClosed for any other end.
    """
    address = url if isinstance(url, RelayAddress) else parse_url(url)
    check_wire_names({"--token": token})
    try:
        channel = await connect(
            address, Hello(Role.OBSERVER, "status", token), connect_timeout=timeout, tls=tls
        )
    except ConnectionClosed as exc:
        fatal = refusal(exc)
        if fatal is None:
            raise
        raise fatal from exc
    try:
        channel.send(StatusRequest())
        async with asyncio.timeout(timeout):
            event = await channel.next_event()
    except TimeoutError:
        raise RelayUnreachable(f"relay {address} did not answer the status request") from None
    finally:
        await channel.close(Goodbye(ErrorCode.NORMAL, "bye"))
    if isinstance(event, ErrorFrame) and event.code == ErrorCode.UNAUTHORIZED:
        raise RelayRefused(f"relay {address} refused: {event.message}", event.code)
    if not isinstance(event, Status):
        raise RelayUnreachable(f"relay {address} answered {type(event).__name__}, not STATUS")
    result: dict[str, Any] = json.loads(event.document)
    return result
