"""A Channel declares its peer dead when one read waits ``heartbeat_timeout``: not
earlier while bytes keep arriving, and not while the owner is not reading."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from audiosockets.audio import AudioFormat, SampleType
from audiosockets.errors import ConnectionClosed, ErrorCode
from audiosockets.protocol import Connection, Hello, OpenStream, Ping, Role, Welcome
from audiosockets.transport import Channel

TIMEOUT = 0.3
MONO16 = AudioFormat(16000, 1, SampleType.INT16)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Channel, Connection, asyncio.StreamWriter]]:
    """A relay-side Channel (handshake done) and the raw client writing to it."""
    accepted: asyncio.Queue[Channel] = asyncio.Queue()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put(Channel(reader, writer, Connection("relay"), heartbeat_timeout=TIMEOUT))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client_reader, client_writer = await asyncio.open_connection("127.0.0.1", port)
    channel = await asyncio.wait_for(accepted.get(), 5)
    client = Connection("client")
    client_writer.write(client.send(Hello(Role.PUBLISHER, "p")))
    assert isinstance(await asyncio.wait_for(channel.next_event(), 5), Hello)
    channel.send(Welcome("relay", 1000, 1 << 20, 0))
    client.receive_data(await asyncio.wait_for(client_reader.read(65536), 5))
    assert isinstance(client.next_event(), Welcome)
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


#: Longer than the watchdog's stall threshold plus the timeout: the process did
#: not run at all for this long (what SIGSTOP, swapping or a long GC pause do).
STALL = 1.5


def _stall_the_process(seconds: float) -> None:
    """Block the event loop, as a stopped process: a deliberate blocking sleep."""
    time.sleep(seconds)  # the stall under test


async def test_a_stalled_process_reads_what_the_peer_sent_meanwhile(
    pair: tuple[Channel, Connection, asyncio.StreamWriter],
) -> None:
    """The peer kept talking while this process was stopped: its bytes wait in the
    socket, and the session goes on with them instead of timing the peer out."""
    channel, client, writer = pair
    read = asyncio.create_task(channel.next_event())
    await asyncio.sleep(0.05)
    writer.write(client.send(OpenStream(1, "a", MONO16)))  # into the socket, unread
    _stall_the_process(STALL)
    first = await asyncio.wait_for(read, 5)
    writer.write(client.send(OpenStream(2, "b", MONO16)))
    second = await asyncio.wait_for(channel.next_event(), 5)
    assert (first, second) == (OpenStream(1, "a", MONO16), OpenStream(2, "b", MONO16))


async def test_a_peer_heard_right_after_a_stall_stays(
    pair: tuple[Channel, Connection, asyncio.StreamWriter],
) -> None:
    """Silence the process could not have heard does not count: a peer that speaks
    just after the stall (within the grace) stays; later silence times out as usual."""
    channel, client, writer = pair
    read = asyncio.create_task(channel.next_event())
    await asyncio.sleep(0.05)  # the read is pending
    _stall_the_process(STALL)
    await asyncio.sleep(TIMEOUT / 3)  # the peer speaks within the grace
    writer.write(client.send(OpenStream(1, "a", MONO16)))
    assert await asyncio.wait_for(read, 5) == OpenStream(1, "a", MONO16)
    started = time.monotonic()
    with pytest.raises(ConnectionClosed) as caught:
        await asyncio.wait_for(channel.next_event(), 5)
    assert caught.value.code is ErrorCode.HEARTBEAT_TIMEOUT
    assert time.monotonic() - started >= TIMEOUT * 0.9


async def test_a_loop_that_stays_slow_still_times_a_dead_peer_out(
    pair: tuple[Channel, Connection, asyncio.StreamWriter],
) -> None:
    """Every iteration blocks longer than the stall threshold, so every timer fires
    late: the dead peer gets one grace, not one per late timer (it used to be kept
    for as long as the load lasted)."""
    channel, _client, _writer = pair
    stop = asyncio.Event()

    async def hog() -> None:
        while not stop.is_set():
            _stall_the_process(STALL)
            await asyncio.sleep(0)

    hogging = asyncio.create_task(hog())
    try:
        with pytest.raises(ConnectionClosed) as caught:
            await asyncio.wait_for(channel.next_event(), 8 * STALL)
    finally:
        stop.set()
        await hogging
    assert caught.value.code is ErrorCode.HEARTBEAT_TIMEOUT
