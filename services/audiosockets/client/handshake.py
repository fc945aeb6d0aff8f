"""A client's way into a session: TCP connect (and TLS for ``tls://``), HELLO,
WELCOME, and every way that can fail said as one error: ``RelayUnreachable``
(retrying may help), ``RelayRefused`` (it will not), ``ConnectionClosed``."""

from __future__ import annotations

import asyncio
import ssl
import time

from ..errors import (
    ConnectionClosed,
    ErrorCode,
    RelayRefused,
    RelayUnreachable,
    RemoteProtocolError,
)
from ..protocol import Connection, ErrorFrame, Goodbye, Hello, Limits, Welcome
from ..tls import TLS_REFUSED, client_context, untrusted_relay
from ..transport import READ_SIZE, Channel, Clock, tune_socket
from ..urls import RelayAddress


async def connect(
    address: RelayAddress,
    hello: Hello,
    *,
    limits: Limits | None = None,
    connect_timeout: float = 5.0,
    rcvbuf: int = 0,
    tls: ssl.SSLContext | None = None,
    clock: Clock = time.monotonic,
) -> Channel:
    """Open a session: TCP connect (and TLS for ``tls://``), HELLO, wait for WELCOME.

    ``tls``: the context for a ``tls://`` address (``tls.client_context``);
    None there means the system's trust store with the host name checked.
    Raises RelayUnreachable when the relay cannot be reached (retrying may
    help), Refused when it refuses the session or we refuse its certificate
    (retrying will not), and ConnectionClosed when it ends the session in
    the handshake for another reason.
    """
    limits = limits or Limits()
    context: ssl.SSLContext | None = None
    if address.tls:
        context = tls or client_context()
    try:
        async with asyncio.timeout(connect_timeout):
            reader, writer = await asyncio.open_connection(
                address.host,
                address.port,
                limit=READ_SIZE,
                ssl=context,
                server_hostname=address.host if context is not None else None,
            )
    except TimeoutError:
        raise RelayUnreachable(
            f"relay {address} did not answer within {connect_timeout:g} s"
        ) from None
    except ConnectionRefusedError as exc:
        raise RelayUnreachable(f"cannot reach relay {address}: connection refused") from exc
    except ssl.SSLCertVerificationError as exc:
        raise RelayRefused(untrusted_relay(address, address.host, exc)) from exc
    except ssl.SSLError as exc:
        raise RelayUnreachable(f"TLS with relay {address} failed: {exc.reason or exc}") from exc
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise RelayUnreachable(f"cannot reach relay {address}: {reason}") from exc
    tune_socket(writer, rcvbuf=rcvbuf)
    channel = Channel(reader, writer, Connection("client", limits), clock=clock)
    try:
        channel.send(hello)
        async with asyncio.timeout(limits.handshake_timeout):
            event = await channel.next_event()
    except TimeoutError:
        channel.abort()
        raise RelayUnreachable(
            f"relay {address} did not complete the handshake within {limits.handshake_timeout:g} s"
        ) from None
    except (ConnectionClosed, RemoteProtocolError) as exc:
        channel.abort()
        if (
            context is not None
            and isinstance(exc, ConnectionClosed)
            and channel.bytes_received == 0
        ):
            # Our relay answers every HELLO with WELCOME or ERROR; silence after the
            # TLS handshake is its TLS layer refusing our certificate (see tls.py).
            raise RelayRefused(TLS_REFUSED.format(address=address)) from exc
        hint = ""
        if context is None and isinstance(exc, ConnectionClosed) and channel.bytes_received == 0:
            hint = f" (if the relay serves TLS, connect to tls://{str(address)[6:]})"
        raise RelayUnreachable(f"relay {address} broke off the handshake: {exc}{hint}") from exc
    if isinstance(event, ErrorFrame | Goodbye):
        channel.abort()
        if event.code == ErrorCode.UNAUTHORIZED:
            raise RelayRefused(f"relay {address} refused the session: {event.message}", event.code)
        raise ConnectionClosed(f"relay {address} refused the session: {event.message}", event.code)
    assert isinstance(event, Welcome)
    interval = event.heartbeat_interval_ms / 1000
    channel.heartbeat_interval = interval
    channel.heartbeat_timeout = 3 * interval
    channel.start_heartbeat()
    return channel
