"""One-shot status query of a relay (an OBSERVER session)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ..errors import ErrorCode, RelayUnreachable
from ..protocol import (
    Goodbye,
    Hello,
    Role,
    Status,
    StatusRequest,
)
from ..transport import connect
from ..urls import RelayAddress, parse_url


async def fetch_status(
    url: str | RelayAddress, *, timeout: float = 5.0, token: str = ""
) -> dict[str, Any]:
    """Ask a relay for its status report (one attempt, no retries).

    ``timeout`` (seconds) bounds the connect and, separately, the answer.
    Returns the report's JSON document as a dict (see the relay's status
    module for its keys). Raises RelayUnreachable when the relay cannot be
    reached or does not answer with STATUS, ConnectionClosed when it refuses
    the session.
    """
    address = url if isinstance(url, RelayAddress) else parse_url(url)
    channel = await connect(address, Hello(Role.OBSERVER, "status", token), connect_timeout=timeout)
    try:
        channel.send(StatusRequest())
        async with asyncio.timeout(timeout):
            event = await channel.next_event()
    except TimeoutError:
        raise RelayUnreachable(f"relay {address} did not answer the status request") from None
    finally:
        await channel.close(Goodbye(ErrorCode.NORMAL, "bye"))
    if not isinstance(event, Status):
        raise RelayUnreachable(f"relay {address} answered {type(event).__name__}, not STATUS")
    result: dict[str, Any] = json.loads(event.document)
    return result
