"""Wyoming's own Python library used as a relay: the peer a user would pick.

``wyoming.server.AsyncTcpServer`` with one ``AsyncEventHandler`` per connection: a
subscriber announces itself with a ``subscribe`` event; every ``audio-chunk`` event a
publisher sends is forwarded as it came (``write_event``, which awaits the socket's
drain, as Wyoming handlers do) to every subscriber (a "group": one subscriber per
publisher, round robin). Publishers and subscribers are ``AsyncTcpClient``s sending
and reading ``AudioChunk`` events. This is the library used as documented, not a copy
of its code.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from multiprocessing.connection import Connection as Pipe
from typing import Any

from wyoming.audio import AudioChunk
from wyoming.client import AsyncTcpClient
from wyoming.event import Event
from wyoming.server import AsyncEventHandler, AsyncTcpServer

from audiosockets import loops
from audiosockets.loadtest import LoadTestConfig

from .reference import Sender, Tally, publish, relay_result, subscribe

SUBSCRIBE = "subscribe"
SUBSCRIBED = "subscribed"


class _Hub:
    def __init__(self, group: bool) -> None:
        self.group = group
        self.subscribers: list[_Handler] = []
        self.publishers = itertools.count()
        self.received = 0
        self.delivered = 0


class _Handler(AsyncEventHandler):
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hub: _Hub
    ) -> None:
        super().__init__(reader, writer)
        self.hub = hub
        self.index = -1

    async def handle_event(self, event: Event) -> bool:
        hub = self.hub
        if AudioChunk.is_type(event.type):
            if self.index < 0:
                self.index = next(hub.publishers)
            hub.received += 1
            subs = hub.subscribers
            targets = subs[self.index % len(subs) :][:1] if hub.group else list(subs)
            for sub in targets:
                await sub.write_event(event)
            hub.delivered += len(targets)
        elif event.type == SUBSCRIBE:
            hub.subscribers.append(self)
            await self.write_event(Event(SUBSCRIBED))
        return True

    async def run(self) -> None:
        # A subscriber that hangs up fails the publisher's handler that was writing to
        # it (and with it that publisher's connection): the loss shows in the figures.
        with contextlib.suppress(ConnectionError):
            await super().run()

    async def disconnect(self) -> None:
        if self in self.hub.subscribers:
            self.hub.subscribers.remove(self)


def relay_process(pipe: Pipe, cfg: LoadTestConfig) -> None:
    async def main() -> None:
        hub = _Hub(bool(cfg.group))
        server = AsyncTcpServer("127.0.0.1", 0)
        await server.start(lambda r, w: _Handler(r, w, hub))
        assert server._server is not None  # the library keeps its listener here
        pipe.send(server._server.sockets[0].getsockname()[1])
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # "stop"
        pipe.send(relay_result(hub.received, hub.delivered))

    loops.run(main())


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("tcp://").rsplit(":", 1)
    return host, int(port)


class _Publisher(Sender):
    def __init__(self, client: AsyncTcpClient, cfg: LoadTestConfig) -> None:
        self.client = client
        self.rate = cfg.sample_rate

    async def send(self, payload: bytes) -> None:
        chunk = AudioChunk(
            rate=self.rate, width=2, channels=1, audio=payload, timestamp=time.time_ns() // 10**6
        )
        await self.client.write_event(chunk.event())

    async def flush(self) -> None:
        pass  # write_event already waited for the socket

    async def close(self) -> None:
        await self.client.disconnect()


def publisher_process(pipe: Pipe, url: str, cfg: LoadTestConfig) -> None:
    async def main() -> None:
        senders = []
        for _ in range(cfg.streams):
            client = AsyncTcpClient(*_address(url))
            await client.connect()
            senders.append(_Publisher(client, cfg))
        await publish(pipe, cfg, senders)

    loops.run(main())


def subscriber_process(
    pipe: Pipe, url: str, cfg: LoadTestConfig, names: list[str], progress: Any
) -> None:
    async def connect(name: str, tally: Tally) -> Any:
        client = AsyncTcpClient(*_address(url))
        await client.connect()
        await client.write_event(Event(SUBSCRIBE, {"name": name}))
        reply = await client.read_event()
        if reply is None or reply.type != SUBSCRIBED:
            raise ConnectionError(f"wyoming relay answered the subscription with {reply}")
        return _read(client, tally)

    async def _read(client: AsyncTcpClient, tally: Tally) -> None:
        while (event := await client.read_event()) is not None:
            if AudioChunk.is_type(event.type):
                chunk = AudioChunk.from_event(event)
                tally.chunk(chunk.audio, 0, time.time_ns())

    loops.run(subscribe(pipe, cfg, names, progress, connect))
