"""The relay over real loopback sockets: fan-out, groups, slow subscribers,
restarts, and bad input that must close one connection and nothing else."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator

import numpy as np
import pytest

from _support import free_port, wait_until
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.client import PublishedStream, Publisher, RetryPolicy, Subscriber
from audiosockets.connect import fetch_status
from audiosockets.errors import ErrorCode
from audiosockets.metrics import Metrics
from audiosockets.protocol import (
    HEADER,
    MAGIC,
    Connection,
    ErrorFrame,
    FrameType,
    Hello,
    Limits,
    OpenStream,
    Role,
)
from audiosockets.relay import Relay, RelayConfig

FMT = AudioFormat(16000, 1, SampleType.INT16)
BLOCK = 320  # 20 ms at 16 kHz
FAST_RETRY = RetryPolicy(initial=0.02, cap=0.2, jitter=0.02, connect_timeout=1.0)


def block(seq: int, frames: int = BLOCK, channels: int = 1) -> np.ndarray:
    """A block whose samples encode its sequence number (checkable end to end)."""
    return np.full((frames, channels), seq % 30000, dtype=np.int16)


def sample(relay: Relay, name: str, **labels: str) -> float:
    value = relay.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def collect(
    sub: Subscriber, want: dict[str, int], timeout: float = 10.0
) -> dict[str, list[int]]:
    """Iterate until every stream in ``want`` reached its last seq."""
    got: dict[str, list[int]] = defaultdict(list)
    async with asyncio.timeout(timeout):
        async for chunk in sub:
            got[chunk.stream].append(chunk.seq)
            assert int(chunk.samples[0, 0]) == chunk.seq % 30000, "payload does not match seq"
            if all(got[s] and got[s][-1] >= last for s, last in want.items()):
                break
    return got


@pytest.fixture
async def publisher(relay: Relay) -> AsyncIterator[Publisher]:
    pub = Publisher(relay.url, name="rec", retry=FAST_RETRY, metrics=Metrics())
    await pub.start()
    yield pub
    await pub.close(timeout=0.5)


async def start_subscriber(relay: Relay, pattern: str = "*", **kw: object) -> Subscriber:
    sub = Subscriber(relay.url, pattern, retry=FAST_RETRY, metrics=Metrics(), **kw)  # type: ignore[arg-type]
    await sub.start()
    assert await sub.wait_connected(5)
    await wait_until(
        lambda: any(s.subscription for s in relay.subscribers if s.name == sub.name),
        what="relay to register the subscription",
    )
    return sub


async def test_fanout_every_subscriber_gets_every_chunk(relay: Relay, publisher: Publisher) -> None:
    subs = [await start_subscriber(relay, "mic-*", name=f"p{i}") for i in range(3)]
    streams = [publisher.stream(f"mic-{i}", FMT) for i in range(2)]
    other = publisher.stream("other", FMT)
    n = 200
    for seq in range(n):
        for s in (*streams, other):
            s.send(block(seq))
    for sub in subs:
        got = await collect(sub, {"mic-0": n - 1, "mic-1": n - 1})
        assert set(got) == {"mic-0", "mic-1"}, "pattern mic-* must not match 'other'"
        for name in ("mic-0", "mic-1"):
            assert got[name] == list(range(n)), f"{sub.name}/{name} not contiguous"
        assert sub.gaps == 0
    assert sample(relay, "audiosockets_chunks_received_total", stream="mic-0") == n
    assert sample(relay, "audiosockets_chunks_sent_total", stream="mic-0") == 3 * n
    assert sample(relay, "audiosockets_connected_clients", role="subscriber") == 3
    for sub in subs:
        await sub.close()


async def test_subscriber_sees_streams_that_appear_later(
    relay: Relay, publisher: Publisher
) -> None:
    sub = await start_subscriber(relay, "*", name="late")
    await wait_until(lambda: publisher.connected.is_set(), what="publisher connected")
    first = publisher.stream("a", FMT)
    for seq in range(5):
        first.send(block(seq))
    await collect(sub, {"a": 4})
    second = publisher.stream("b", FMT)
    for seq in range(5):
        second.send(block(seq))
    got = await collect(sub, {"b": 4})
    assert got["b"] == list(range(5))
    await sub.close()


async def publish_and_settle(
    relay: Relay, publisher: Publisher, name: str, n: int
) -> PublishedStream:
    """Publish seqs 0..n-1 of ``name`` and wait until the relay holds them all."""
    stream = publisher.stream(name, FMT)
    for seq in range(n):
        stream.send(block(seq))
    assert await publisher.flush(5)
    await wait_until(lambda: name in relay.streams and relay.streams[name].last_seq == n - 1)
    return stream


async def test_earliest_start_replays_the_window(relay: Relay, publisher: Publisher) -> None:
    await publish_and_settle(relay, publisher, "mic", 50)
    sub = await start_subscriber(relay, "mic", name="from-start", start="earliest")
    got = await collect(sub, {"mic": 49})
    assert got["mic"] == list(range(50))
    await sub.close()


async def test_group_gives_each_stream_to_exactly_one_member(
    relay: Relay, publisher: Publisher
) -> None:
    members = [await start_subscriber(relay, "s-*", group="g", name=f"m{i}") for i in range(3)]
    streams = [publisher.stream(f"s-{i}", FMT) for i in range(6)]
    await wait_until(lambda: len(relay.groups["g"].assignment) == 6, what="all streams assigned")
    n = 100
    for seq in range(n):
        for s in streams:
            s.send(block(seq))
    owners: dict[str, list[str]] = defaultdict(list)
    for m in members:
        want = {
            name: n - 1
            for name, owner in relay.groups["g"].assignment.items()
            if owner.name == m.name
        }
        assert len(want) == 2, "six streams over three members: two each"
        got = await collect(m, want)
        for name, seqs in got.items():
            owners[name].append(m.name)
            assert seqs == list(range(n))
    assert sorted(owners) == [f"s-{i}" for i in range(6)]
    assert all(len(v) == 1 for v in owners.values()), owners
    for m in members:
        await m.close()


async def test_group_handover_on_leave_loses_nothing(relay: Relay, publisher: Publisher) -> None:
    a = await start_subscriber(relay, "*", group="g", name="a")
    b = await start_subscriber(relay, "*", group="g", name="b")
    streams = [publisher.stream(f"s-{i}", FMT) for i in range(2)]
    await wait_until(lambda: len(relay.groups["g"].assignment) == 2)
    owned_by_a = [n for n, m in relay.groups["g"].assignment.items() if m.name == "a"]
    assert len(owned_by_a) == 1
    processed: dict[str, set[int]] = defaultdict(set)
    for seq in range(40):
        for s in streams:
            s.send(block(seq))
    async with asyncio.timeout(10):
        async for chunk in a:
            processed[chunk.stream].add(chunk.seq)
            if chunk.seq == 19:
                break  # a has processed (and will ACK) up to seq 18/19, then dies
    channel = a.channel
    assert channel is not None
    channel.abort()  # a crash, not a goodbye
    await a._stop_task(farewell=False)
    for seq in range(40, 80):
        for s in streams:
            s.send(block(seq))
    got = await collect(b, {"s-0": 79, "s-1": 79})
    for name, seqs in got.items():
        processed[name].update(seqs)
    for name in ("s-0", "s-1"):
        assert processed[name] == set(range(80)), f"{name}: lost {set(range(80)) - processed[name]}"
    assert relay.groups["g"].assignment[owned_by_a[0]].name == "b"
    await b.close()


async def test_group_rebalances_when_a_member_joins(relay: Relay, publisher: Publisher) -> None:
    a = await start_subscriber(relay, "*", group="g", name="a")
    for i in range(4):
        publisher.stream(f"s-{i}", FMT)
    await wait_until(lambda: len(relay.groups["g"].assignment) == 4)
    b = await start_subscriber(relay, "*", group="g", name="b")
    group = relay.groups["g"]
    await wait_until(
        lambda: sorted(group.load(m) for m in group.members) == [2, 2], what="2/2 split"
    )
    await a.close()
    await wait_until(lambda: [group.load(m) for m in group.members] == [4], what="b owns all four")
    await b.close()


class FakeClock:
    """The relay's clock, advanced by the test: arrival times and staleness
    follow it, not the machine's load."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    # Heartbeats every 60 s of the fake clock: none during the test's 3 s of it.
    "relay_config",
    [RelayConfig(port=0, queue_seconds=0.3, replay_seconds=60, heartbeat_interval=60)],
)
@pytest.mark.parametrize("relay_clock", [FakeClock()])
async def test_stalled_subscriber_loses_only_its_own_chunks_counted_exactly(
    relay: Relay, relay_clock: FakeClock, publisher: Publisher
) -> None:
    clock = relay_clock
    fmt = AudioFormat(48000, 2, SampleType.INT16)
    frames = 4800  # 100 ms, 19.2 kB: a few hundred overflow any socket buffer
    healthy = await start_subscriber(relay, "mic", name="healthy")
    stalled = await start_subscriber(relay, "mic", name="stalled", queue_chunks=4)
    stream = publisher.stream("mic", fmt)
    await wait_until(lambda: publisher.connected.is_set())
    n = 300
    healthy_task = asyncio.create_task(collect(healthy, {"mic": n - 1}, timeout=30))
    for first in range(0, n, 10):
        # Ten chunks arrive at one relay time, then 0.1 s of it passes: 3 s in
        # all, ten times queue_seconds, whatever the wall clock does.
        for seq in range(first, first + 10):
            stream.send(block(seq, frames, 2))
        last = first + 9
        await wait_until(
            lambda last=last: "mic" in relay.streams and relay.streams["mic"].last_seq == last,  # type: ignore[misc]
            what=f"the relay to hold seq {last}",
        )
        await wait_until(
            lambda: all(
                c.next_ord == c.stream.window.end
                for s in relay.subscribers
                if s.name == "healthy"
                for c in relay.subscriptions.of_session(s)
            ),
            what="the healthy subscriber's writer to catch up",
        )
        clock.now += 0.1
    got_healthy = await healthy_task
    assert got_healthy["mic"] == list(range(n))
    # Now the stalled one reads everything that is left.
    got = await collect(stalled, {"mic": n - 1}, timeout=30)
    received = len(got["mic"])
    dropped = sample(
        relay, "audiosockets_chunks_dropped_total", stream="mic", reason="subscriber_slow"
    )
    assert dropped > 0, "the stall should have cost the stalled subscriber something"
    assert received + dropped == n
    assert stalled.gaps == dropped
    assert got["mic"] == sorted(set(got["mic"]))
    assert publisher.streams["mic"].dropped == 0
    assert (
        sample(
            relay,
            "audiosockets_chunks_dropped_total",
            stream="mic",
            reason="replay_window_exceeded",
        )
        == 0
    )
    await healthy.close()
    await stalled.close()


async def stream_through_restart(url: str, restart: object, *, chunks: int = 150) -> None:
    """Publish paced chunks, call ``restart()`` midway, check the subscriber
    saw every seq exactly once, in order."""
    pub = Publisher(url, name="rec", retry=FAST_RETRY, history_seconds=30)
    # earliest: whether the relay registers the subscription before or after
    # the first chunk, the subscriber starts at seq 0 (no race to sleep over).
    sub = Subscriber(url, "mic", name="proc", retry=FAST_RETRY, start="earliest")
    await pub.start()
    await sub.start()
    stream = pub.stream("mic", FMT)
    assert await pub.wait_connected(5)
    assert await sub.wait_connected(5)
    got: list[int] = []
    duplicates_seen: list[int] = []

    async def consume() -> None:
        async for chunk in sub:
            if got and chunk.seq <= got[-1]:
                duplicates_seen.append(chunk.seq)
            got.append(chunk.seq)
            if chunk.seq == chunks - 1:
                return

    consumer = asyncio.create_task(consume())
    for seq in range(chunks):
        stream.send(block(seq))
        if seq == chunks // 3:
            await restart()  # type: ignore[operator]
        await asyncio.sleep(0.01)  # pacing the producer, not waiting for anything
    async with asyncio.timeout(20):
        await consumer
    assert duplicates_seen == []
    assert got == list(range(chunks)), f"missing: {sorted(set(range(chunks)) - set(got))}"
    assert pub.metrics.registry.get_sample_value(
        "audiosockets_reconnects_total", {"role": "publisher"}
    )
    assert sub.metrics.registry.get_sample_value(
        "audiosockets_reconnects_total", {"role": "subscriber"}
    )
    await pub.close(0.5)
    await sub.close()


async def test_graceful_relay_restart_no_gap_no_duplicate() -> None:
    port = free_port()
    config = RelayConfig(port=port, heartbeat_interval=0.5)
    holder = {"relay": Relay(config)}
    await holder["relay"].start()

    async def restart() -> None:
        await holder["relay"].stop()
        holder["relay"] = Relay(config)
        await holder["relay"].start()

    try:
        await stream_through_restart(f"tcp://127.0.0.1:{port}", restart)
    finally:
        await holder["relay"].stop()


def spawn_relay(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "audiosockets",
            "--log-level",
            "warning",
            "relay",
            "--listen",
            f"tcp://127.0.0.1:{port}",
            "--metrics-port",
            "0",
            "--heartbeat-seconds",
            "0.5",
        ],
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()  # "relay listening on ..." once bound
    assert b"listening" in line, line
    return proc


async def test_relay_sigkill_and_restart_no_gap_no_duplicate() -> None:
    port = free_port()
    holder = {"proc": await asyncio.to_thread(spawn_relay, port)}

    async def crash_and_restart() -> None:
        holder["proc"].send_signal(signal.SIGKILL)
        await asyncio.to_thread(holder["proc"].wait)
        await asyncio.sleep(0.5)  # the outage: chunks keep being produced
        holder["proc"] = await asyncio.to_thread(spawn_relay, port)

    try:
        await stream_through_restart(f"tcp://127.0.0.1:{port}", crash_and_restart)
    finally:
        holder["proc"].kill()
        holder["proc"].wait()


async def test_relay_exits_zero_on_sigterm() -> None:
    proc = await asyncio.to_thread(spawn_relay, free_port())
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 10) == 0


async def test_sighup_without_credentials_leaves_the_relay_running() -> None:
    """SIGHUP's default action killed a relay run without --credentials (exit 129),
    every stream with it, for a habitual `kill -HUP` (logrotate, the README's reload)."""
    port = free_port()
    proc = await asyncio.to_thread(spawn_relay, port)
    try:
        proc.send_signal(signal.SIGHUP)
        report = await fetch_status(f"tcp://127.0.0.1:{port}")
        assert report["server"] == "audiosockets-relay"
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0


# --- bad input --------------------------------------------------------------


def frame(ftype: int, payload: bytes, *, version: int = 1, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return HEADER.pack(MAGIC, version, ftype, n) + payload


def hello_bytes(role: Role = Role.PUBLISHER) -> bytes:
    return Connection("client").send(Hello(role, "attacker"))


def publisher_preamble() -> bytes:
    conn = Connection("client")
    data = conn.send(Hello(Role.PUBLISHER, "attacker"))
    conn.state = conn.state.OPEN  # we do not wait for WELCOME on a raw socket
    return data + conn.send(OpenStream(1, "evil", FMT))


BAD_INPUTS = {
    "garbage": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ErrorCode.MALFORMED_FRAME),
    "wrong_version": (
        frame(FrameType.HELLO, b"\x01\x00\x00\x00\x00\x00", version=9),
        ErrorCode.UNSUPPORTED_VERSION,
    ),
    "oversized": (frame(FrameType.HELLO, b"", length=0xFFFF_FFF0), ErrorCode.FRAME_TOO_LARGE),
    "truncated_payload": (frame(FrameType.HELLO, b"\x01"), ErrorCode.MALFORMED_FRAME),
    "truncated_then_eof": (
        frame(FrameType.HELLO, b"\x01\x00", length=40),
        ErrorCode.MALFORMED_FRAME,
    ),
    "chunk_before_hello": (frame(FrameType.CHUNK, bytes(20)), ErrorCode.UNEXPECTED_FRAME),
    "unknown_stream": (
        hello_bytes() + frame(FrameType.CHUNK, struct.pack(">IQq", 7, 0, 0) + b"\x00\x00"),
        ErrorCode.UNKNOWN_STREAM,
    ),
    "odd_payload": (
        publisher_preamble()
        + frame(FrameType.CHUNK, struct.pack(">IQq", 1, 0, 0) + b"\x00\x00\x00"),
        ErrorCode.BAD_FORMAT,
    ),
}


def read_reply(sock: socket.socket) -> list[tuple[int, bytes]]:
    """Read frames until the relay closes the socket."""
    data = b""
    sock.settimeout(10)
    while True:
        try:
            part = sock.recv(65536)
        except ConnectionResetError:
            break
        if not part:
            break
        data += part
    frames = []
    while len(data) >= HEADER.size:
        _magic, _v, ftype, n = HEADER.unpack_from(data)
        frames.append((ftype, data[HEADER.size : HEADER.size + n]))
        data = data[HEADER.size + n :]
    return frames


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
async def test_bad_input_closes_only_that_connection(
    relay: Relay, publisher: Publisher, case: str
) -> None:
    payload, code = BAD_INPUTS[case]
    sub = await start_subscriber(relay, "mic", name="bystander")
    stream = publisher.stream("mic", FMT)
    for seq in range(20):
        stream.send(block(seq))
    await collect(sub, {"mic": 19})

    def attack() -> list[tuple[int, bytes]]:
        with socket.create_connection(("127.0.0.1", relay.address.port)) as sock:  # type: ignore[union-attr]
            sock.sendall(payload)
            if case == "truncated_then_eof":
                sock.shutdown(socket.SHUT_WR)
            return read_reply(sock)

    reply = await asyncio.to_thread(attack)
    errors = [p for t, p in reply if t == FrameType.ERROR]
    assert errors, f"no ERROR frame in reply {reply!r}"
    got_code = struct.unpack(">H", errors[-1][:2])[0]
    message = errors[-1][4:].decode()
    assert got_code == code, message
    assert message, "the error frame must say why"
    assert sample(relay, "audiosockets_protocol_errors_total", reason=code.name.lower()) == 1
    # Everything else carries on.
    for seq in range(20, 40):
        stream.send(block(seq))
    got = await collect(sub, {"mic": 39})
    assert got["mic"] == list(range(20, 40))
    assert publisher.connected.is_set()
    assert publisher.sessions == 1
    await sub.close()


@pytest.mark.parametrize(
    "relay_config",
    [RelayConfig(port=0, limits=Limits(handshake_timeout=0.3), heartbeat_interval=0.2)],
)
async def test_handshake_timeout_and_half_open_peer(relay: Relay) -> None:
    port = relay.address.port  # type: ignore[union-attr]

    def silent() -> list[tuple[int, bytes]]:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            return read_reply(sock)

    reply = await asyncio.to_thread(silent)
    assert reply[-1][0] == FrameType.ERROR
    assert struct.unpack(">H", reply[-1][1][:2])[0] == ErrorCode.HANDSHAKE_TIMEOUT
    assert sample(relay, "audiosockets_protocol_errors_total", reason="handshake_timeout") == 1

    def half_open() -> float:
        # Completes the handshake, then never sends again: dead after 3 heartbeats.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(hello_bytes(Role.SUBSCRIBER))
            start = time.monotonic()
            read_reply(sock)
            return time.monotonic() - start

    elapsed = await asyncio.to_thread(half_open)
    assert elapsed >= 0.5, "closed before three heartbeat intervals"
    await wait_until(
        lambda: sample(relay, "audiosockets_connected_clients", role="subscriber") == 0
    )


async def test_error_frame_in_reply_is_decodable(relay: Relay) -> None:
    """Clients get a frame they can decode, with a sentence, not just a reset."""
    port = relay.address.port  # type: ignore[union-attr]

    def attack() -> list[tuple[int, bytes]]:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"\x00" * 64)
            return read_reply(sock)

    reply = await asyncio.to_thread(attack)
    client = Connection("client")
    client.send(Hello(Role.SUBSCRIBER, "x"))
    client.receive_data(b"".join(frame(t, p) for t, p in reply))
    event = client.next_event()
    assert isinstance(event, ErrorFrame)
    assert "magic" in event.message


async def test_a_long_goodbye_message_is_clipped_in_the_log(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """A GOODBYE's message is free text up to 64 KiB: one frame per connection must
    not write that much into the relay's log."""
    port = relay.address.port  # type: ignore[union-attr]
    goodbye = frame(FrameType.GOODBYE, struct.pack(">HH", 0, 60_000) + b"y" * 60_000)

    def farewell() -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(hello_bytes(Role.OBSERVER) + goodbye)
            read_reply(sock)

    with caplog.at_level(logging.INFO, logger="audiosockets.relay"):
        await asyncio.to_thread(farewell)
        await wait_until(lambda: any("said goodbye" in r.getMessage() for r in caplog.records))
    line = next(r.getMessage() for r in caplog.records if "said goodbye" in r.getMessage())
    assert len(line) < 400, f"{len(line)} characters logged for one GOODBYE"
    assert "59800 more characters" in line


@pytest.mark.parametrize("relay_config", [RelayConfig(port=0, replay_seconds=1.0)])
async def test_resent_history_longer_than_the_window_is_not_counted_as_loss(relay: Relay) -> None:
    """After a relay restart the publisher re-sends more history than the
    window holds; trimming chunks the subscriber already has loses nothing."""
    sub = Subscriber(relay.url, "mic", name="resumer", retry=FAST_RETRY)
    sub.received["mic"] = 120  # as if it had seen 0..120 before the restart
    await sub.start()
    await wait_until(lambda: any(s.subscription for s in relay.subscribers), what="subscribed")
    pub = Publisher(relay.url, name="rec", retry=FAST_RETRY, history_seconds=10)
    stream = pub.stream("mic", FMT)
    for seq in range(150):  # 3 s of spooled audio into a 1 s window
        stream.send(block(seq))
    await pub.start()
    got = await collect(sub, {"mic": 149})
    assert got["mic"] == list(range(121, 150))
    assert (
        sample(
            relay,
            "audiosockets_chunks_dropped_total",
            stream="mic",
            reason="replay_window_exceeded",
        )
        == 0
    )
    assert sub.gaps == 0
    await pub.close()
    await sub.close()


@pytest.mark.parametrize("relay_config", [RelayConfig(port=0, token="s3cret")])
async def test_token_is_required_when_the_relay_has_one(relay: Relay) -> None:
    from audiosockets.client import fetch_status
    from audiosockets.errors import Refused, RelayRefused

    # A refusal retrying cannot change: RelayRefused, a Refused (the CLI's exit status 1).
    with pytest.raises(RelayRefused, match="bad token") as info:
        await fetch_status(relay.url, token="wrong")
    assert isinstance(info.value, Refused)
    assert info.value.code is ErrorCode.UNAUTHORIZED
    assert info.value.exit_code == 1
    assert relay.metrics.registry.get_sample_value("audiosockets_auth_failures_total") == 1
    report = await fetch_status(relay.url, token="s3cret")
    assert report["streams"] == []


async def test_closing_a_stream_reaches_subscribers_after_its_last_chunk(relay: Relay) -> None:
    events: list[str] = []
    sub = Subscriber(
        relay.url,
        "mic",
        name="p",
        retry=FAST_RETRY,
        on_stream_closed=lambda s: events.append(f"closed {s}"),
    )
    await sub.start()
    await wait_until(lambda: any(s.subscription for s in relay.subscribers), what="subscribed")
    pub = Publisher(relay.url, name="rec", retry=FAST_RETRY)
    stream = pub.stream("mic", FMT)
    await pub.start()
    for seq in range(30):
        stream.send(block(seq))
    await pub.close()
    got = await collect(sub, {"mic": 29})
    assert got["mic"] == list(range(30))
    assert events == []  # the close waits behind the chunks: here, until we ask for more
    reader = asyncio.create_task(sub.get())
    await wait_until(lambda: events == ["closed mic"], what="CLOSE_STREAM")
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    assert "mic" not in sub.assigned
    # The stream comes back: declared again, delivered again.
    pub2 = Publisher(relay.url, name="rec", retry=FAST_RETRY)
    stream2 = pub2.stream("mic", FMT)
    await pub2.start()
    stream2.send(block(30))
    got = await collect(sub, {"mic": 30})
    assert got["mic"] == [30]
    assert "mic" in sub.assigned
    await pub2.close()
    await sub.close()


async def test_replicas_sharing_a_name_give_one_metric_series(
    relay: Relay, publisher: Publisher
) -> None:
    """Scaled containers may share a client name; a duplicate series would make
    Prometheus reject the relay's whole scrape."""
    from prometheus_client import generate_latest

    subs = [await start_subscriber(relay, "*", group="g", name="same") for _ in range(2)]
    for i in range(4):
        publisher.stream(f"s-{i}", FMT)
    await wait_until(lambda: len(relay.groups["g"].assignment) == 4)
    lines = [
        line.rsplit(" ", 1)[0]
        for line in generate_latest(relay.metrics.registry).decode().splitlines()
        if line and not line.startswith("#")
    ]
    assert len(lines) == len(set(lines)), "duplicate series"
    assert sample(relay, "audiosockets_group_streams", group="g", member="same") == 4
    for s in subs:
        await s.close()


async def test_two_subscribers_with_one_name_are_pointed_out_once(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """Per-subscriber counters are keyed by client name: the operator is told, once
    per interval, that two sessions share one and which addresses they come from."""
    caplog.set_level(logging.WARNING, logger="audiosockets.relay")
    subs = [await start_subscriber(relay, "*", name="proc\u00e9") for _ in range(3)]
    subs.append(await start_subscriber(relay, "*", name="other"))
    await wait_until(lambda: len(relay.subscribers) == 4)
    lines = [
        r.getMessage() for r in caplog.records if "two subscribers are named" in r.getMessage()
    ]
    assert len(lines) == 1, lines
    assert "'proc\u00e9'" in lines[0]
    assert "give each its own --name" in lines[0]
    for s in subs:
        await s.close()


async def group_member(relay: Relay, name: str, acked: dict[str, int]) -> Subscriber:
    sub = Subscriber(relay.url, "s*", group="g", name=name, retry=FAST_RETRY)
    sub.acked.update(acked)  # as if it had processed these before the relay restarted
    await sub.start()
    await wait_until(lambda: any(s.name == name and s.subscription for s in relay.subscribers))
    return sub


async def test_after_a_relay_restart_a_stream_resumes_where_its_old_owner_stopped(
    relay: Relay, publisher: Publisher
) -> None:
    """The relay lost its group ACKs; members bring theirs. Whoever gets a
    stream starts after the furthest point any member finished."""
    a = await group_member(relay, "a", {"s0": 30})
    b = await group_member(relay, "b", {"s1": 20})
    streams = [publisher.stream(f"s{i}", FMT) for i in range(2)]
    for seq in range(50):  # the publisher re-sends its history
        for s in streams:
            s.send(block(seq))
    got: dict[str, list[int]] = defaultdict(list)
    owners = relay.groups["g"].assignment
    await wait_until(lambda: len(owners) == 2)
    for member in (a, b):
        mine = {n: 49 for n, m in owners.items() if m.name == member.name}
        for name, seqs in (await collect(member, mine)).items():
            got[name] += seqs
    assert got["s0"] == list(range(31, 50))
    assert got["s1"] == list(range(21, 50))
    await a.close()
    await b.close()


async def test_a_stream_no_returning_member_knows_starts_at_the_oldest_chunk(
    relay: Relay, publisher: Publisher
) -> None:
    """Its old owner is not back yet: replay what the relay holds rather than
    skip to live and lose the chunks since that owner's last ACK."""
    await publish_and_settle(relay, publisher, "s0", 40)
    b = await group_member(relay, "b", {"s1": 20})  # b owned another stream
    got = await collect(b, {"s0": 39})
    assert got["s0"] == list(range(40))
    await b.close()


async def test_a_new_group_starts_live(relay: Relay, publisher: Publisher) -> None:
    stream = await publish_and_settle(relay, publisher, "s0", 10)
    fresh = await group_member(relay, "fresh", {})
    await wait_until(lambda: "s0" in fresh.assigned or "s0" in relay.groups["g"].assignment)
    stream.send(block(10))
    got = await collect(fresh, {"s0": 10})
    assert got["s0"] == [10]
    await fresh.close()


async def test_a_bug_in_one_session_ends_that_session_only_counted_and_logged(
    relay: Relay,
    publisher: Publisher,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unexpected exception in a subscriber's writer task closes that
    connection (ERROR internal), is counted as ``internal_error`` and logged
    once with its traceback; the relay and every other session keep going."""
    from audiosockets.relay import SubscriberSession

    collect_frames = SubscriberSession._collect
    failed: list[SubscriberSession] = []

    def faulty(self: SubscriberSession) -> list[bytes]:
        if self.name == "doomed" and not failed:
            failed.append(self)
            raise RuntimeError("injected writer bug")
        return collect_frames(self)

    monkeypatch.setattr(SubscriberSession, "_collect", faulty)
    healthy = await start_subscriber(relay, "other", name="healthy")
    doomed = await start_subscriber(relay, "mic", name="doomed")
    mic = publisher.stream("mic", FMT)
    other = publisher.stream("other", FMT)
    mic.send(block(0))
    await wait_until(lambda: bool(failed), what="the injected bug to fire")
    victim = failed[0]
    await wait_until(lambda: victim not in relay.sessions, what="the failed session to end")
    assert victim.channel.closed
    assert sample(relay, "audiosockets_protocol_errors_total", reason="internal_error") == 1
    logged = [r for r in caplog.records if r.exc_info and "internal error" in r.getMessage()]
    assert len(logged) == 1
    assert "injected writer bug" in caplog.text
    for seq in range(20):
        other.send(block(seq))
    got = await collect(healthy, {"other": 19})
    assert got["other"] == list(range(20))
    assert any(s.name == "healthy" for s in relay.sessions)
    await healthy.close()
    await doomed.close()
