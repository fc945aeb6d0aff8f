"""The reference: a minimal length-prefixed fan-out forwarder, written as anyone would.

One asyncio server, no features: a connection's first byte says what it is (``P``
publisher, ``S`` subscriber); a publisher sends frames ``<u32 length><payload>``; the
forwarder reads each whole frame (``readexactly``) and writes it to every subscriber's
transport (a "group": to one subscriber per publisher, round robin). No replay, no
bounds, no drop accounting, no heartbeats: whatever a subscriber does not read piles
up in the forwarder's memory. Its subscribers batch-parse frames out of one buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
import time
from multiprocessing.connection import Connection as Pipe
from typing import Any

from audiosockets import loops
from audiosockets.loadtest import LoadTestConfig

from .reference import Sender, Tally, publish, relay_result, subscribe

LENGTH = struct.Struct("<I")


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("tcp://").rsplit(":", 1)
    return host, int(port)


def relay_process(pipe: Pipe, cfg: LoadTestConfig) -> None:
    async def main() -> None:
        subscribers: list[asyncio.StreamWriter] = []
        publishers = itertools.count()
        received = 0
        delivered = 0
        handlers: set[asyncio.Task[Any]] = set()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal received, delivered
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)  # owned here, so stopping can wait for them
            _nodelay(writer)
            # RuntimeError: uvloop refuses a write to a subscriber that just hung up.
            # CancelledError: the relay is stopping; ending quietly spares asyncio's
            # stream callback a traceback for every connection.
            with contextlib.suppress(
                ConnectionError,
                RuntimeError,
                asyncio.IncompleteReadError,
                asyncio.CancelledError,
            ):
                if await reader.readexactly(1) == b"S":
                    subscribers.append(writer)
                    writer.write(b"K")  # registered: the subscriber may report ready
                    try:
                        await reader.read()  # until the subscriber hangs up
                    finally:
                        subscribers.remove(writer)
                    return
                k = next(publishers)
                while True:
                    head = await reader.readexactly(LENGTH.size)
                    frame = head + await reader.readexactly(LENGTH.unpack(head)[0])
                    received += 1
                    targets = subscribers[k % len(subscribers) :][:1] if cfg.group else subscribers
                    for w in targets:
                        w.write(frame)
                    delivered += len(targets)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        pipe.send(server.sockets[0].getsockname()[1])
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # "stop"
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        pipe.send(relay_result(received, delivered))

    loops.run(main())


class _Publisher(Sender):
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    async def send(self, payload: bytes) -> None:
        self.writer.write(LENGTH.pack(len(payload)) + payload)

    async def flush(self) -> None:
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()


def publisher_process(pipe: Pipe, url: str, cfg: LoadTestConfig) -> None:
    async def main() -> None:
        host, port = _address(url)
        senders = []
        for _ in range(cfg.streams):
            _reader, writer = await asyncio.open_connection(host, port)
            _nodelay(writer)
            writer.write(b"P")
            senders.append(_Publisher(writer))
        await publish(pipe, cfg, senders)

    loops.run(main())


def subscriber_process(
    pipe: Pipe, url: str, cfg: LoadTestConfig, names: list[str], progress: Any
) -> None:
    async def connect(name: str, tally: Tally) -> Any:
        reader, writer = await asyncio.open_connection(*_address(url))
        _nodelay(writer)
        writer.write(b"S")
        await reader.readexactly(1)  # registered
        return _read(reader, writer, tally)

    async def _read(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tally: Tally
    ) -> None:
        # ``writer`` is held here: a collected StreamWriter closes its transport.
        buf = bytearray()
        while data := await reader.read(1 << 20):
            buf += data
            now = time.time_ns()
            off, end = 0, len(buf)
            while end - off >= LENGTH.size:
                (length,) = LENGTH.unpack_from(buf, off)
                if end - off < LENGTH.size + length:
                    break
                tally.chunk(buf, off + LENGTH.size, now)
                off += LENGTH.size + length
            del buf[:off]

    loops.run(subscribe(pipe, cfg, names, progress, connect))
