"""Hostile load on streams and sessions (issue 11, cases 4, 7 and 8), each
against a relay in its own process with a healthy 16 kHz stream beside it.

Sizes: the default suite runs case 4 with 60 dying publishers (the issue's
300 with ``AUDIOSOCKETS_HOSTILE_FULL=1``) and the full 20,006 names, 200
groups; case 8 with 300 sessions from three addresses against caps of 200
sessions and 80 per address (the issue's 1100 and 3000 sessions need a test
process allowed that many descriptors: ``AUDIOSOCKETS_HOSTILE_FULL=1`` runs
the issue's 1100 against the default caps, in a relay whose descriptor limit is
1024 soft and hard). Everything else is full size.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from audiosockets.audio import AudioFormat, SampleType
from audiosockets.errors import ErrorCode
from audiosockets.protocol import (
    ChunkData,
    CloseReason,
    CloseStream,
    Connection,
    ErrorFrame,
    Goodbye,
    Hello,
    NeedData,
    OpenStream,
    Ping,
    Pong,
    Role,
    Status,
    StatusRequest,
    StreamAccepted,
    Subscribe,
    Welcome,
)

from .harness import HEALTHY_STREAM, RelayProcess, healthy_stream, relay_process

T = TypeVar("T")
FULL = os.environ.get("AUDIOSOCKETS_HOSTILE_FULL", "") == "1"
FMT = AudioFormat(16000, 1, SampleType.INT16)
BLOCK_100MS = b"\x00\x01" * 1600


@dataclass
class Client:
    """A raw client: frames out with ``send``, events in with ``next``."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: Connection

    def send(self, event: Any) -> None:
        self.writer.write(self.conn.send(event))

    async def next(self, timeout: float = 30.0) -> Any:
        """The next event but PING/PONG; None once the connection ended."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    event = self.conn.next_event()
                except Exception:
                    return None
                if isinstance(event, NeedData):
                    try:
                        data = await self.reader.read(1 << 16)
                    except (ConnectionError, OSError):
                        return None
                    if not data:
                        return None
                    self.conn.receive_data(data)
                    continue
                if isinstance(event, Ping):
                    self.send_quietly(event)
                    continue
                if isinstance(event, Pong):
                    continue
                return event

    def send_quietly(self, event: Ping) -> None:
        with contextlib.suppress(Exception):
            self.send(Pong(event.nonce))

    def close(self) -> None:
        self.writer.transport.abort()


async def connect(
    relay: RelayProcess, role: Role, name: str, *, source: str = "127.0.0.1", rcvbuf: int = 0
) -> Client | ErrorFrame:
    """A session past WELCOME, or the relay's refusal; ``rcvbuf`` sets a
    small receive buffer before connecting (so the window stays small)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    sock.bind((source, 0))
    await asyncio.get_running_loop().sock_connect(sock, (relay.host, relay.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    client = Client(reader, writer, Connection("client"))
    client.send(Hello(role, name, ""))
    answer = await client.next()
    if isinstance(answer, Welcome):
        return client
    client.close()
    assert isinstance(answer, ErrorFrame), answer
    return answer


def run_attack(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run the attack's coroutine in its own thread at a lower CPU priority
    (``nice`` is per thread on Linux): the attackers stand for other machines,
    so on a 2-core test box they must not take the CPU the relay and the
    healthy stream would have had. The relay's own work for them still counts."""
    result: list[T] = []

    def thread() -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.nice(10)
        result.append(asyncio.run(main()))

    worker = threading.Thread(target=thread, name="attack")
    worker.start()
    worker.join()
    if not result:
        raise AssertionError("the attack failed (see the thread's traceback above)")
    return result[0]


def poll(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Wait for ``predicate`` (which scrapes the relay) once a second: a
    scrape renders every series while holding the relay's GIL, so polling
    it faster would be an attack of its own (Prometheus scrapes every 15 s)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(1.0)


def metric_lines(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line and not line.startswith("#")]


# -- case 4: streams never die ----------------------------------------------------


async def _dying_publisher(relay: RelayProcess, i: int) -> None:
    """Stream 3 s of audio in 100 ms chunks, paced, then vanish."""
    client = await connect(relay, Role.PUBLISHER, f"dying-{i}")
    assert isinstance(client, Client)
    client.send(OpenStream(1, f"dying-{i:03d}", FMT))
    assert isinstance(await client.next(), StreamAccepted)
    start = time.monotonic()
    for seq in range(30):
        client.send(ChunkData(1, seq, time.time_ns(), BLOCK_100MS))
        await asyncio.sleep(max(0.0, start + (seq + 1) * 0.1 - time.monotonic()))
    await client.writer.drain()
    client.close()


async def _name_flood(relay: RelayProcess, names: int) -> tuple[int, int]:
    """One connection re-declaring stream id 1 under ``names`` names; returns
    (accepted, refused) as the relay answered."""
    client = await connect(relay, Role.PUBLISHER, "name-flood")
    assert isinstance(client, Client)
    accepted = refused = 0

    async def read() -> None:
        nonlocal accepted, refused
        while accepted + refused < names:
            event = await client.next(timeout=60.0)
            if isinstance(event, StreamAccepted):
                accepted += 1
            elif isinstance(event, CloseStream):
                assert event.reason is CloseReason.REFUSED
                refused += 1
            else:
                raise AssertionError(f"unexpected {event!r}")

    reader = asyncio.create_task(read())
    for i in range(names):
        client.send(OpenStream(1, f"flood-{i:05d}", FMT))
        if i % 500 == 0:
            await client.writer.drain()
    await client.writer.drain()
    await reader
    client.close()
    return accepted, refused


async def _groups_come_and_go(relay: RelayProcess, n: int) -> None:
    members = []
    for i in range(n):
        client = await connect(relay, Role.SUBSCRIBER, f"member-{i}")
        assert isinstance(client, Client)
        client.send(Subscribe("*", group=f"group-{i:03d}"))
        members.append(client)
    for client in members:
        client.send(Goodbye(ErrorCode.NORMAL, "bye"))
        await client.writer.drain()
        client.close()


async def _case4(relay: RelayProcess, publishers: int, names: int, groups: int) -> tuple[int, int]:
    await _groups_come_and_go(relay, groups)
    await asyncio.to_thread(
        poll,
        lambda: not metric_lines(relay.scrape(), "audiosockets_group_members{"),
        timeout=30.0,
        what=f"{groups} groups created and left deleted",
    )
    flood = asyncio.create_task(_name_flood(relay, names))
    await asyncio.gather(*(_dying_publisher(relay, i) for i in range(publishers)))
    return await flood


def test_case4_streams_die_names_are_capped_and_metrics_stay_small() -> None:
    publishers = 300 if FULL else 60
    names, groups, per_publisher = 20_006, 200, 64
    grace = 2.0
    with relay_process(
        replay_seconds=5.0,
        stream_grace_seconds=grace,
        max_streams_per_publisher=per_publisher,
        max_sessions_per_address=1024,  # all from loopback; case 8 tests this cap
    ) as relay:
        rss_before = relay.rss_bytes()
        with healthy_stream(relay.url) as healthy:
            accepted, refused = run_attack(lambda: _case4(relay, publishers, names, groups))
            peak_metrics = len(relay.scrape().encode())
            # Dead streams' audio expires (5 s) and after the grace (2 s) they go.
            poll(
                lambda: relay.sample("audiosockets_streams") == 1,
                timeout=60.0,
                what="every dead stream forgotten",
            )
            report = healthy.stop()
        text = relay.scrape()
        rss_growth = relay.rss_bytes() - rss_before
        assert relay.alive()
    report.assert_lossless()
    print(
        f"case 4: healthy p99 {report.p99_ms:.1f} ms, /metrics {peak_metrics} B at the peak, "
        f"{len(text.encode())} B after, RSS +{rss_growth >> 20} MiB"
    )
    assert report.p99_ms <= 100.0, report
    assert accepted == per_publisher
    assert refused == names - per_publisher
    assert (
        relay.sample("audiosockets_streams_refused_total", text, reason="publisher_streams_full")
        == refused
    )
    assert relay.sample("audiosockets_streams_forgotten_total", text) == publishers + accepted
    assert len(text.encode()) <= 5 << 20
    assert peak_metrics <= 5 << 20
    assert metric_lines(text, 'stream="dying-') == []
    assert metric_lines(text, 'stream="flood-') == []
    assert metric_lines(text, "audiosockets_group_members{") == []  # 200 groups gone
    assert relay.sample("audiosockets_chunks_received_total", text, stream=HEALTHY_STREAM) > 0
    assert rss_growth <= 128 << 20, rss_growth


# -- case 7: replies nobody reads --------------------------------------------------


async def _case7(relay: RelayProcess, flood_deadline: float) -> tuple[int, float, bool]:
    """A STATUS pipeliner (1000 requests) that reads nothing while a PING
    flood that never reads goes on until the relay cuts it (or
    ``flood_deadline`` seconds pass); returns (STATUS replies the pipeliner
    was sent meanwhile, seconds it did not read, whether the flood was cut)."""
    asker = await connect(relay, Role.OBSERVER, "status-pipeliner")
    flooder = await connect(relay, Role.OBSERVER, "ping-flooder", rcvbuf=4096)
    assert isinstance(asker, Client)
    assert isinstance(flooder, Client)
    started = time.monotonic()
    for _ in range(1000):
        asker.send(StatusRequest())
    await asker.writer.drain()
    pings = flooder.conn.send(Ping(1)) * 4096
    deadline = started + flood_deadline
    cut = False
    while time.monotonic() < deadline:
        try:
            flooder.writer.write(pings)
            async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                await flooder.writer.drain()
        except TimeoutError:
            continue
        except (ConnectionError, OSError):
            cut = True
            break
        if flooder.writer.transport.is_closing():
            cut = True
            break
    flooder.close()
    unread = time.monotonic() - started
    # Now read what the pipeliner was sent while it was not reading.
    replies = 0
    with contextlib.suppress(TimeoutError):
        while True:
            event = await asker.next(timeout=0.5)
            if not isinstance(event, Status):
                break
            replies += 1
    asker.close()
    return replies, unread, cut


def test_case7_replies_nobody_reads_cost_the_others_nothing() -> None:
    with relay_process(replay_seconds=5.0) as relay:
        rss_before = relay.rss_bytes()
        with healthy_stream(relay.url) as healthy:
            replies, unread, cut = run_attack(lambda: _case7(relay, flood_deadline=120.0))
            assert cut, "the PING flood was never cut"
            poll(
                lambda: (
                    relay.sample("audiosockets_sessions_cut_total", reason="write_buffer_full") == 1
                ),
                timeout=30.0,
                what="the PING flood cut",
            )
            report = healthy.stop()
        text = relay.scrape()
        rss_growth = relay.rss_bytes() - rss_before
        assert relay.alive()
    report.assert_lossless()
    print(
        f"case 7: healthy p99 {report.p99_ms:.1f} ms, {replies} STATUS in {unread:.1f} s, "
        f"RSS +{rss_growth >> 20} MiB"
    )
    assert report.p99_ms <= 100.0, report
    assert relay.sample("audiosockets_sessions_cut_total", text, reason="write_buffer_full") == 1
    # One STATUS per second: the first at once, each later one throttled. The
    # pipeliner stops reading at some instant, so one or two more may have
    # been sent (or be waiting) that it did not see.
    throttled = relay.sample("audiosockets_requests_throttled_total", text, reason="status_rate")
    assert 1 <= replies <= unread + 2
    assert replies - 1 <= throttled <= replies + 2
    assert rss_growth <= 64 << 20, rss_growth


# -- case 8: connections and descriptors ---------------------------------------------


async def _case8(
    relay: RelayProcess, counts: dict[str, int], idle: float
) -> tuple[int, dict[str, int], int]:
    """Open ``counts`` observer sessions per source address, each kept alive
    with a PING every 0.5 s from the moment it is admitted; returns (admitted,
    refusals by address, sessions the relay ended)."""

    async def keep_alive(client: Client) -> bool:
        """PING every 0.5 s until the relay ends the session; True if it did."""
        ended = asyncio.create_task(client.next(timeout=idle * 10))
        while not ended.done():
            with contextlib.suppress(Exception):
                client.send(Ping(3))
            await asyncio.wait([ended], timeout=0.5)
        event = ended.result()
        client.close()
        # GOODBYE NORMAL, or the end of the connection: a PING of ours that
        # crossed the relay's close makes its kernel reset the connection,
        # and a reset discards the GOODBYE we had not read yet.
        return event is None or (isinstance(event, Goodbye) and event.code is ErrorCode.NORMAL)

    held: list[asyncio.Task[bool]] = []
    refusals: dict[str, int] = {}
    for source, n in counts.items():
        for i in range(n):
            answer = await connect(relay, Role.OBSERVER, f"obs-{source}-{i}", source=source)
            if isinstance(answer, Client):
                held.append(asyncio.create_task(keep_alive(answer)))
            else:
                assert answer.code is ErrorCode.OVERLOADED, answer
                refusals[source] = refusals.get(source, 0) + 1
    told = await asyncio.gather(*held)
    return len(held), refusals, sum(told)


def test_case8_session_caps_keep_room_for_healthy_clients_and_idle_ones_go() -> None:
    idle = 10.0  # longer than it takes to open the sessions on a loaded machine
    if FULL:  # the reproduction: 1100 observers, a relay with nofile=1024
        idle = 30.0  # longer than it takes to open 1100 sessions
        from audiosockets.relay.admission import DESCRIPTOR_RESERVE, raise_nofile

        raise_nofile()  # this process holds 1100 sockets
        nofile: int | None = 1024
        caps = {"max_sessions": 1024, "max_sessions_per_address": 256}  # the defaults
        in_force = {**caps, "max_sessions": 1024 - DESCRIPTOR_RESERVE}
        counts = {"127.0.0.2": 300, "127.0.0.3": 300, "127.0.0.4": 300, "127.0.0.5": 200}
    else:
        nofile = None
        caps = in_force = {"max_sessions": 200, "max_sessions_per_address": 80}
        counts = {"127.0.0.2": 100, "127.0.0.3": 100, "127.0.0.4": 100}
    with relay_process(nofile=nofile, replay_seconds=5.0, idle_timeout=idle, **caps) as relay:
        with healthy_stream(relay.url) as healthy:  # 2 sessions from 127.0.0.1
            held, refusals, told = run_attack(lambda: _case8(relay, counts, idle))
            report = healthy.stop()
        text = relay.scrape()
        assert relay.alive()
        log = relay.log_text()
    report.assert_lossless()
    # What the caps give, attempt by attempt (the relay-wide cap is checked first).
    total = 2  # the healthy publisher and subscriber
    admitted = expect_address_full = expect_relay_full = 0
    for n in counts.values():
        from_address = 0
        for _ in range(n):
            if total >= in_force["max_sessions"]:
                expect_relay_full += 1
            elif from_address >= in_force["max_sessions_per_address"]:
                expect_address_full += 1
            else:
                total += 1
                from_address += 1
                admitted += 1
    assert expect_address_full > 0  # both cases are sized to hit both caps
    assert expect_relay_full > 0
    print(f"case 8: admitted {held}, refused {refusals}, ended {told}")
    print("\n".join(metric_lines(text, "_cut_total") + metric_lines(text, "protocol_errors_total")))
    print("heartbeat timeouts in the log:", log.count("HEARTBEAT") + log.count("no data from"))
    assert held == admitted
    assert sum(refusals.values()) == expect_address_full + expect_relay_full
    assert relay.sample("audiosockets_sessions_refused_total", text, reason="address_full") == (
        expect_address_full
    )
    assert relay.sample("audiosockets_sessions_refused_total", text, reason="relay_full") == (
        expect_relay_full
    )
    # Observers that only PING hold nothing: each closed once as idle.
    assert told == held
    assert relay.sample("audiosockets_sessions_cut_total", text, reason="idle") == held
    # Refusals are logged at a rate limit, not one line each.
    assert log.count("refused a connection") <= 10
