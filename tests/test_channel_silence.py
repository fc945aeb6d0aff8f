"""A Channel declares its peer dead when one read waits ``heartbeat_timeout``: not
earlier while bytes keep arriving, and not while the owner is not reading."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from audiosockets.errors import ConnectionClosed, ErrorCode
from audiosockets.protocol import Connection, Hello, Ping, Role, Welcome
from audiosockets.transport import Channel

TIMEOUT = 0.3


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Channel, Connection, asyncio.StreamWriter]]:
    """A relay-side Channel (handshake done) and the raw client writing to it."""
    accepted: asyncio.Queue[Channel] = asyncio.Queue()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put(Channel(reader, writer, Connection("relay"), heartbeat_timeout=TIMEOUT))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _reader, client_writer = await asyncio.open_connection("127.0.0.1", port)
    channel = await asyncio.wait_for(accepted.get(), 5)
    client = Connection("client")
    client_writer.write(client.send(Hello(Role.PUBLISHER, "p")))
    assert isinstance(await asyncio.wait_for(channel.next_event(), 5), Hello)
    channel.send(Welcome("relay", 1000, 1 << 20, 0))
    try:
        yield channel, client, client_writer
    finally:
        channel.abort()
        client_writer.close()
        server.close()


async def test_a_silent_peer_times_out_after_heartbeat_timeout(
    pair: tuple[Channel, Connection, asyncio.StreamWriter],
) -> None:
    channel, _client, _writer = pair
    started = time.monotonic()
    with pytest.raises(ConnectionClosed) as caught:
        await asyncio.wait_for(channel.next_event(), 5)
    waited = time.monotonic() - started
    assert caught.value.code is ErrorCode.HEARTBEAT_TIMEOUT
    assert TIMEOUT * 0.9 <= waited < TIMEOUT + 1.0


async def test_bytes_arriving_keep_the_peer_alive_and_silence_then_ends_it(
    pair: tuple[Channel, Connection, asyncio.StreamWriter],
) -> None:
    channel, client, writer = pair

    async def ping_for(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        nonce = 0
        while time.monotonic() < deadline:
            nonce += 1
            writer.write(client.send(Ping(nonce)))
            await asyncio.sleep(TIMEOUT / 4)  # pacing the peer's pings

    pinger = asyncio.create_task(ping_for(3 * TIMEOUT))
    started = time.monotonic()
    with pytest.raises(ConnectionClosed) as caught:
        await asyncio.wait_for(channel.next_event(), 5)  # PINGs are answered, not returned
    waited = time.monotonic() - started
    await pinger
    assert caught.value.code is ErrorCode.HEARTBEAT_TIMEOUT
    assert waited >= 3 * TIMEOUT  # alive while the pings came


async def test_not_reading_is_not_silence(
    pair: tuple[Channel, Connection, asyncio.StreamWriter],
) -> None:
    """Backpressure: the owner stops reading for longer than the timeout (the peer is
    silent meanwhile); its next read still waits a whole timeout."""
    channel, _client, _writer = pair
    await asyncio.sleep(2 * TIMEOUT)  # the owner is busy elsewhere: not a condition wait
    started = time.monotonic()
    with pytest.raises(ConnectionClosed) as caught:
        await asyncio.wait_for(channel.next_event(), 5)
    assert caught.value.code is ErrorCode.HEARTBEAT_TIMEOUT
    assert time.monotonic() - started >= TIMEOUT * 0.9
