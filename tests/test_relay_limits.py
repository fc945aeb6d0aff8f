"""The relay's limits in process, driven by a fake clock where time matters:
stream caps that count names, audio expiring by age, abandoned streams and
their metric series forgotten, empty groups deleted, rebalances only where a
new stream matches, session caps, idle sessions, bounded write buffers,
STATUS throttled and cut to fit a frame (issue 11, items 4, 7, 8)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import generate_latest

from _support import wait_until
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.errors import ErrorCode
from audiosockets.metrics import Metrics
from audiosockets.protocol import (
    ChunkData,
    CloseReason,
    CloseStream,
    Connection,
    ErrorFrame,
    Goodbye,
    Hello,
    Limits,
    NeedData,
    OpenStream,
    Ping,
    Role,
    Status,
    StatusRequest,
    StreamAccepted,
    Subscribe,
    Welcome,
)
from audiosockets.relay import Relay, RelayConfig
from audiosockets.relay.groups import Group
from audiosockets.relay.status import fit_status

FMT = AudioFormat(16000, 1, SampleType.INT16)
BLOCK = b"\x00\x01" * 320  # 20 ms at 16 kHz


class FakeClock:
    """The relay's clock, advanced by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Raw:
    """A raw client on loopback (optionally from another 127.x address)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = Connection("client")

    @classmethod
    async def connect(
        cls, relay: Relay, role: Role = Role.PUBLISHER, *, source: str = "127.0.0.1"
    ) -> Raw:
        """Connect and say HELLO; does not wait for the answer."""
        assert relay.address is not None
        reader, writer = await asyncio.open_connection(
            relay.address.host, relay.address.port, local_addr=(source, 0)
        )
        raw = cls(reader, writer)
        raw.send(Hello(role, f"raw-{role.label}", ""))
        return raw

    @classmethod
    async def session(cls, relay: Relay, role: Role = Role.PUBLISHER, **kw: Any) -> Raw:
        raw = await cls.connect(relay, role, **kw)
        assert isinstance(await raw.next(), Welcome)
        return raw

    def send(self, event: Any) -> None:
        self.writer.write(self.conn.send(event))

    async def next(self, timeout: float = 10.0) -> Any:
        """The next event other than PING/PONG (None at the end of the connection)."""
        async with asyncio.timeout(timeout):
            while True:
                event = self.conn.next_event()
                if isinstance(event, NeedData):
                    try:
                        data = await self.reader.read(1 << 16)
                    except ConnectionError:
                        return None
                    if not data:
                        self.conn.receive_eof()
                        return None
                    self.conn.receive_data(data)
                    continue
                if isinstance(event, Ping):
                    continue
                return event

    def close(self) -> None:
        self.writer.transport.abort()


def counter(relay: Relay, name: str, **labels: str) -> float:
    value = relay.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def config(**kw: Any) -> RelayConfig:
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "replay_seconds": 5.0,
        "heartbeat_interval": 60.0,  # no heartbeats on the fake clock's account
    }
    return RelayConfig(**{**base, **kw})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_relay(clock: FakeClock) -> AsyncIterator[Any]:
    relays: list[Relay] = []

    async def make(**kw: Any) -> Relay:
        relay = Relay(config(**kw), metrics=Metrics(), clock=clock)
        await relay.start()
        relays.append(relay)
        return relay

    yield make
    for relay in relays:
        await relay.stop()


# -- item 4: streams ---------------------------------------------------------


async def test_audio_expires_by_age_and_an_abandoned_stream_is_forgotten_with_its_series(
    make_relay: Any, clock: FakeClock
) -> None:
    relay = await make_relay(replay_seconds=5.0, stream_grace_seconds=10.0)
    sub = await Raw.session(relay, Role.SUBSCRIBER)
    sub.send(Subscribe("*"))
    await wait_until(lambda: len(relay.subscribers) == 1, what="subscribed")
    pub = await Raw.session(relay)
    pub.send(OpenStream(1, "dead", FMT))
    assert isinstance(await pub.next(), StreamAccepted)
    for seq in range(3):
        pub.send(ChunkData(1, seq, time.time_ns(), BLOCK))
    await wait_until(lambda: relay.streams["dead"].last_seq == 2, what="3 chunks")
    clock.now += 4.9
    relay.housekeeping.run_once()
    assert len(relay.streams["dead"].window) == 3  # younger than replay_seconds
    clock.now += 0.2
    relay.housekeeping.run_once()
    # No chunk arrived, yet the audio expired: the newest chunk too.
    assert len(relay.streams["dead"].window) == 0
    assert relay.streams["dead"].window.total_seconds == 0
    # With its publisher connected, an empty stream stays.
    clock.now += 100
    relay.housekeeping.run_once()
    assert "dead" in relay.streams
    pub.close()
    await wait_until(lambda: relay.streams["dead"].publisher is None, what="publisher gone")
    relay.housekeeping.run_once()  # abandoned from now
    clock.now += 9.9
    relay.housekeeping.run_once()
    assert "dead" in relay.streams
    text = generate_latest(relay.metrics.registry).decode()
    assert 'stream="dead"' in text
    clock.now += 0.1
    relay.housekeeping.run_once()
    assert "dead" not in relay.streams
    assert counter(relay, "audiosockets_streams_forgotten_total") == 1
    # The subscriber had been told of it: it hears the stream is gone.
    events = [await sub.next() for _ in range(5)]
    assert isinstance(events[0], OpenStream)
    assert events[-1] == CloseStream(events[0].stream_id, CloseReason.PUBLISHER_LOST)
    text = generate_latest(relay.metrics.registry).decode()
    assert 'stream="dead"' not in text, [ln for ln in text.splitlines() if '"dead"' in ln]


async def test_a_publisher_comes_back_to_a_forgotten_name_as_a_new_stream(
    make_relay: Any, clock: FakeClock
) -> None:
    relay = await make_relay(replay_seconds=1.0, stream_grace_seconds=0.0)
    pub = await Raw.session(relay)
    pub.send(OpenStream(1, "s", FMT))
    assert isinstance(await pub.next(), StreamAccepted)
    pub.send(ChunkData(1, 0, time.time_ns(), BLOCK))
    pub.send(CloseStream(1))
    await wait_until(lambda: relay.streams["s"].publisher is None, what="closed")
    clock.now += 2
    relay.housekeeping.run_once()
    assert "s" not in relay.streams
    pub.send(OpenStream(1, "s", FMT))
    accepted = await pub.next()
    assert isinstance(accepted, StreamAccepted)
    assert accepted.next_seq == 0


async def test_names_count_against_the_publisher_cap_and_a_refusal_keeps_the_session(
    make_relay: Any,
) -> None:
    relay = await make_relay(max_streams_per_publisher=10)
    pub = await Raw.session(relay)
    for i in range(100):  # one stream id re-declared under 100 names
        pub.send(OpenStream(1, f"name-{i}", FMT))
    replies = [await pub.next() for _ in range(100)]
    accepted = [r for r in replies if isinstance(r, StreamAccepted)]
    refused = [r for r in replies if isinstance(r, CloseStream)]
    assert len(accepted) == 10
    assert len(refused) == 90
    assert all(r.reason is CloseReason.REFUSED for r in refused)
    assert (
        counter(relay, "audiosockets_streams_refused_total", reason="publisher_streams_full") == 90
    )
    # Re-declaring the id under another name released the previous one, also
    # when the new name was refused: the id now names nothing.
    assert sum(1 for s in relay.streams.values() if s.publisher is not None) == 0
    assert len(relay.streams) == 10
    # A name it already declared is no new name: still accepted; the session lives.
    pub.send(OpenStream(2, "name-3", FMT))
    assert isinstance(await pub.next(), StreamAccepted)
    pub.send(ChunkData(2, 0, time.time_ns(), BLOCK))
    await wait_until(lambda: relay.streams["name-3"].last_seq == 0, what="chunk")


async def test_the_relay_wide_cap_counts_names_and_makes_room_from_empty_abandoned_streams(
    make_relay: Any, clock: FakeClock
) -> None:
    relay = await make_relay(max_streams=5, replay_seconds=1.0, stream_grace_seconds=3600)
    a = await Raw.session(relay)
    b = await Raw.session(relay)
    for i in range(3):
        a.send(OpenStream(i, f"a-{i}", FMT))
        b.send(OpenStream(i, f"b-{i}", FMT))
    replies = [await a.next() for _ in range(3)] + [await b.next() for _ in range(3)]
    assert sum(isinstance(r, StreamAccepted) for r in replies) == 5
    assert sum(isinstance(r, CloseStream) for r in replies) == 1
    assert counter(relay, "audiosockets_streams_refused_total", reason="relay_streams_full") == 1
    # a-0 is given up and holds no audio: a new name may take its place at once.
    a.send(CloseStream(0))
    await wait_until(lambda: relay.streams["a-0"].publisher is None, what="closed")
    b.send(OpenStream(9, "b-9", FMT))
    assert isinstance(await b.next(), StreamAccepted)
    assert "a-0" not in relay.streams
    assert len(relay.streams) == 5


async def test_empty_groups_are_deleted_and_a_new_stream_rebalances_only_matching_groups(
    make_relay: Any, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = await make_relay(stream_grace_seconds=10.0)
    calls: list[str] = []
    original = Group.rebalance

    def counting(self: Group, *args: Any) -> None:
        calls.append(self.name)
        original(self, *args)

    monkeypatch.setattr(Group, "rebalance", counting)
    members = []
    for i in range(20):
        sub = await Raw.session(relay, Role.SUBSCRIBER)
        sub.send(Subscribe(f"x-{i % 2}-*", group=f"g{i}"))
        members.append(sub)
    await wait_until(lambda: len(relay.groups) == 20, what="20 groups")
    calls.clear()
    pub = await Raw.session(relay)
    pub.send(OpenStream(1, "y-1", FMT))
    assert isinstance(await pub.next(), StreamAccepted)
    assert calls == []  # no group matches it
    pub.send(OpenStream(2, "x-0-a", FMT))
    assert isinstance(await pub.next(), StreamAccepted)
    assert sorted(calls) == sorted(f"g{i}" for i in range(0, 20, 2))
    calls.clear()
    pub.send(OpenStream(2, "x-0-a", FMT))  # re-declared: nothing to rebalance
    assert isinstance(await pub.next(), StreamAccepted)
    assert calls == []
    for sub in members:
        sub.close()
    await wait_until(
        lambda: not any(g.members for g in relay.groups.values()), what="every member gone"
    )
    calls.clear()
    clock.now += 10.0  # empty groups keep their ACKs for the grace period, then go
    relay.housekeeping.run_once()
    assert not relay.groups
    assert calls == []  # leaving an empty group rebalances nothing


# -- item 8: sessions ---------------------------------------------------------


async def test_session_caps_relay_wide_and_per_address_refuse_with_overloaded(
    make_relay: Any,
) -> None:
    relay = await make_relay(max_sessions=6, max_sessions_per_address=4)
    held = [await Raw.session(relay, Role.OBSERVER) for _ in range(4)]
    extra = await Raw.connect(relay, Role.OBSERVER)
    refusal = await extra.next()
    assert isinstance(refusal, ErrorFrame)
    assert refusal.code is ErrorCode.OVERLOADED
    assert counter(relay, "audiosockets_sessions_refused_total", reason="address_full") == 1
    # Another address still gets in, up to the relay-wide cap.
    held += [await Raw.session(relay, Role.OBSERVER, source="127.0.0.2") for _ in range(2)]
    extra2 = await Raw.connect(relay, Role.OBSERVER, source="127.0.0.3")
    refusal = await extra2.next()
    assert isinstance(refusal, ErrorFrame)
    assert refusal.code is ErrorCode.OVERLOADED
    assert counter(relay, "audiosockets_sessions_refused_total", reason="relay_full") == 1
    # A place freed is a place taken.
    held.pop().close()
    await wait_until(lambda: relay.guard.admission.total == 5, what="a place freed")
    again = await Raw.session(relay, Role.OBSERVER, source="127.0.0.3")
    again.send(StatusRequest())
    assert isinstance(await again.next(), Status)


async def test_idle_sessions_are_closed_and_counted_but_busy_ones_stay(
    make_relay: Any, clock: FakeClock
) -> None:
    relay = await make_relay(idle_timeout=30.0)
    observers = [await Raw.session(relay, Role.OBSERVER) for _ in range(5)]
    idle_pub = await Raw.session(relay)
    pub = await Raw.session(relay)
    pub.send(OpenStream(1, "kept", FMT))
    assert isinstance(await pub.next(), StreamAccepted)
    sub = await Raw.session(relay, Role.SUBSCRIBER)
    sub.send(Subscribe("*"))
    await wait_until(lambda: len(relay.subscribers) == 1, what="subscribed")
    clock.now += 29.9
    relay.housekeeping.run_once()
    assert counter(relay, "audiosockets_sessions_cut_total", reason="idle") == 0
    observers[0].send(StatusRequest())  # a request keeps it
    assert isinstance(await observers[0].next(), Status)
    clock.now += 0.1
    relay.housekeeping.run_once()
    for raw in [*observers[1:], idle_pub]:
        farewell = await raw.next()
        assert isinstance(farewell, Goodbye)
        assert farewell.code is ErrorCode.NORMAL
    assert counter(relay, "audiosockets_sessions_cut_total", reason="idle") == 5
    await wait_until(lambda: len(relay.sessions) == 3, what="5 idle sessions gone")


def test_the_soft_descriptor_limit_caps_sessions() -> None:
    from audiosockets.relay.admission import DESCRIPTOR_RESERVE, session_cap

    assert session_cap(1024, 1024) == 1024 - DESCRIPTOR_RESERVE
    assert session_cap(100, 1 << 20) == 100
    assert session_cap(100, None) == 100


# -- item 7: replies nobody reads ------------------------------------------------


@pytest.mark.parametrize("flood", ["status", "ping"])
async def test_a_client_that_never_reads_its_replies_is_cut_once_its_buffer_is_full(
    make_relay: Any, flood: str
) -> None:
    relay = await make_relay(
        status_interval=0.0,
        max_write_buffer_bytes=1,  # the floor: one batch plus two frames
        limits=Limits(max_frame_size=64 << 10),
        socket_buffer_bytes=16 << 10,
    )
    pub = await Raw.session(relay)
    for i in range(300):  # a status report of some size
        pub.send(OpenStream(i, f"stream-with-a-long-name-{i:04d}", FMT))
    for _ in range(300):
        await pub.next()
    attacker = await Raw.session(relay, Role.OBSERVER)
    sock = attacker.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    one = attacker.conn.send(StatusRequest() if flood == "status" else Ping(7))
    cut = lambda: counter(relay, "audiosockets_sessions_cut_total", reason="write_buffer_full")  # noqa: E731
    deadline = asyncio.get_running_loop().time() + 60.0
    while not cut() and asyncio.get_running_loop().time() < deadline:
        try:
            attacker.writer.write(one * 5000)
            async with asyncio.timeout(1.0):
                await attacker.writer.drain()
        except TimeoutError:
            continue  # the relay stopped reading us: its buffer decides
        except ConnectionError:
            break
    await wait_until(lambda: cut() == 1, timeout=30.0, what="the non-reader cut")
    await wait_until(lambda: len(relay.sessions) == 1, what="its session gone")
    # The relay answers others at once.
    other = await Raw.session(relay, Role.OBSERVER)
    other.send(StatusRequest())
    assert isinstance(await other.next(timeout=5.0), Status)


async def test_status_is_throttled_per_session(make_relay: Any, clock: FakeClock) -> None:
    relay = await make_relay(status_interval=0.2)
    obs = await Raw.session(relay, Role.OBSERVER)
    for _ in range(3):
        obs.send(StatusRequest())
    for _ in range(3):
        assert isinstance(await obs.next(), Status)
    # The fake clock stood still: each later request waited the interval in real time.
    assert counter(relay, "audiosockets_requests_throttled_total", reason="status_rate") == 2


def test_the_status_document_is_cut_to_fit_a_frame_with_counts() -> None:
    streams = [{"name": f"s{i:05d}", "subscribers": ["x"] * 3} for i in range(20000)]
    subscribers = [{"name": "sub", "streams": [f"s{i:05d}" for i in range(20000)]}]
    report: dict[str, object] = {
        "server": "r",
        "streams": streams,
        "publishers": [],
        "subscribers": subscribers,
        "groups": {f"g{i}": {"members": ["m"], "assignment": {}} for i in range(300)},
        "drops": {},
    }
    document = fit_status(report, 64 << 10)
    assert len(document.encode()) <= 64 << 10
    out = json.loads(document)
    kept = len(out["streams"])
    assert 100 < kept < 20000
    assert out["truncated"]["streams"] == 20000 - kept
    assert out["truncated"]["groups"] == 300 - len(out["groups"])
    assert out["subscribers"][0]["streams_omitted"] == 20000 - len(out["subscribers"][0]["streams"])
    small = {**report, "streams": streams[:3], "subscribers": [], "groups": {}}
    assert "truncated" not in json.loads(fit_status(small, 64 << 10))


async def test_accept_errors_are_counted_each_and_logged_once_per_interval(
    make_relay: Any, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await make_relay()
    loop = asyncio.get_running_loop()
    handler = loop.get_exception_handler()
    assert handler is not None
    for _ in range(100):
        handler(
            loop,
            {
                "message": "socket.accept() out of system resource",
                "exception": OSError(24, "Too many open files"),
            },
        )
    assert counter(relay, "audiosockets_accept_errors_total") == 100
    lines = [r for r in caplog.records if "cannot accept" in r.getMessage()]
    assert len(lines) == 1


def test_every_relay_limit_is_a_config_field_a_flag_and_an_env_var_with_one_default() -> None:
    import dataclasses

    import click

    from audiosockets.cli import main
    from audiosockets.cli_support import RELAY_LIMITS

    fields = {f.name for f in dataclasses.fields(RelayConfig)}
    command = main.commands["relay"]
    for flag, _, default, _ in RELAY_LIMITS:
        name = flag.lstrip("-").replace("-", "_")
        assert name in fields
        assert getattr(RelayConfig(), name) == default
        option = next(p for p in command.params if flag in p.opts)
        assert isinstance(option, click.Option)
        assert option.envvar == f"AUDIOSOCKETS_RELAY_{name.upper()}"
