"""The relay counts a lost chunk only where it was lost (issue 17).

A subscriber's sequence gap is the sum of what the publisher never got to the
relay (counted ``spool_full`` by the publisher) and what the relay held but
trimmed or skipped before this subscriber got it (counted by the relay, per
subscriber). The relay must never count the publisher's gap as its own: each
test below makes a publisher gap, and checks the books balance exactly.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from _support import wait_until
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.client import Publisher, RetryPolicy, Subscriber
from audiosockets.metrics import Metrics
from audiosockets.protocol import (
    ChunkData,
    Connection,
    Hello,
    NeedData,
    Ping,
    Pong,
    Role,
    Subscribe,
    Welcome,
)
from audiosockets.relay import Relay, RelayConfig
from audiosockets.relay.inflight import peer_closed

FMT = AudioFormat(16000, 1, SampleType.INT16)
BLOCK = 320  # 20 ms
FAST_RETRY = RetryPolicy(initial=0.02, cap=0.2, jitter=0.02, connect_timeout=1.0)
#: The subscriber had seqs 0..RESUME_AT before (as after a relay outage).
RESUME_AT = 20
#: The publisher numbered this many chunks while it could not send...
NUMBERED = 250
#: ...and its spool (history) holds the newest HELD of them: 100..249.
HELD = 150
PUBLISHER_GAP = (NUMBERED - HELD) - (RESUME_AT + 1)  # seqs 21..99: never reached the relay


def block(seq: int) -> np.ndarray:
    return np.full((BLOCK, 1), seq % 30000, dtype=np.int16)


def value(relay: Relay, name: str, **labels: str) -> float:
    return relay.metrics.registry.get_sample_value(name, labels) or 0.0


def relay_lost(relay: Relay, subscriber: str) -> float:
    return sum(
        value(
            relay,
            "audiosockets_subscriber_chunks_dropped_total",
            subscriber=subscriber,
            stream="mic",
            reason=reason,
        )
        for reason in ("replay_window_exceeded", "subscriber_slow")
    )


@pytest.fixture
async def spooled(relay: Relay) -> AsyncIterator[Publisher]:
    """A publisher that recorded NUMBERED chunks into a HELD-chunk spool, not yet started."""
    pub = Publisher(
        relay.url, name="rec", retry=FAST_RETRY, history_seconds=HELD * 0.02, metrics=Metrics()
    )
    stream = pub.stream("mic", FMT)
    for seq in range(NUMBERED):
        stream.send(block(seq))
    assert stream.dropped == NUMBERED - HELD  # spool_full: lost at the source
    yield pub
    await pub.close(timeout=0.5)


async def resuming_subscriber(relay: Relay, name: str) -> Subscriber:
    sub = Subscriber(relay.url, "mic", name=name, retry=FAST_RETRY, metrics=Metrics())
    sub.received["mic"] = RESUME_AT
    await sub.start()
    await wait_until(
        lambda: any(s.subscription for s in relay.subscribers if s.name == name),
        what="the relay to register the subscription",
    )
    return sub


async def read_until(sub: Subscriber, last: int, timeout: float = 10.0) -> list[int]:
    seqs: list[int] = []
    async with asyncio.timeout(timeout):
        async for chunk in sub:
            seqs.append(chunk.seq)
            if chunk.seq >= last:
                return seqs
    return seqs


async def start_publishing(relay: Relay, pub: Publisher) -> None:
    await pub.start()
    await wait_until(
        lambda: value(relay, "audiosockets_chunks_received_total", stream="mic") == HELD,
        what="the relay to take the spool",
    )


@pytest.mark.parametrize("relay_config", [RelayConfig(port=0, replay_seconds=1.0)])
async def test_a_subscriber_attached_before_the_burst_is_charged_only_what_the_relay_trimmed(
    relay: Relay, spooled: Publisher
) -> None:
    sub = await resuming_subscriber(relay, "early")
    await start_publishing(relay, spooled)
    got = await read_until(sub, NUMBERED - 1)
    lost_here = relay_lost(relay, "early")
    # Everything the relay held reached the subscriber or is counted, once.
    assert len(got) + lost_here == HELD
    assert got == sorted(set(got))
    assert got[-1] == NUMBERED - 1
    # The subscriber's gap is the publisher's gap plus the relay's loss, exactly.
    assert sub.gaps == PUBLISHER_GAP + lost_here
    assert value(
        relay, "audiosockets_chunks_dropped_total", stream="mic", reason="replay_window_exceeded"
    ) == value(
        relay,
        "audiosockets_subscriber_chunks_dropped_total",
        subscriber="early",
        stream="mic",
        reason="replay_window_exceeded",
    )
    await sub.close()


@pytest.mark.parametrize("relay_config", [RelayConfig(port=0, replay_seconds=1.0)])
async def test_a_subscriber_resuming_after_the_trim_is_charged_only_what_the_relay_held(
    relay: Relay, spooled: Publisher
) -> None:
    await start_publishing(relay, spooled)  # 150 chunks into a 50-chunk window
    sub = await resuming_subscriber(relay, "late")
    got = await read_until(sub, NUMBERED - 1)
    window = 50
    assert got == list(range(NUMBERED - window, NUMBERED))
    # The relay held and trimmed 100..199: those are its loss. 21..99 never
    # reached it (the old count charged all 179 to the relay).
    assert relay_lost(relay, "late") == HELD - window
    assert sub.gaps == PUBLISHER_GAP + (HELD - window)
    status = relay.status()
    (entry,) = [s for s in status["subscribers"] if s["name"] == "late"]  # type: ignore[union-attr]
    assert entry["dropped"] == HELD - window
    await sub.close()


@pytest.mark.parametrize("relay_config", [RelayConfig(port=0, replay_seconds=60.0)])
async def test_a_publisher_gap_alone_is_no_relay_loss(relay: Relay, spooled: Publisher) -> None:
    early = await resuming_subscriber(relay, "early")
    await start_publishing(relay, spooled)
    late = await resuming_subscriber(relay, "late")
    for sub in (early, late):
        assert await read_until(sub, NUMBERED - 1) == list(range(NUMBERED - HELD, NUMBERED))
        assert sub.gaps == PUBLISHER_GAP
        assert relay_lost(relay, sub.name) == 0
        # declared up front: a zero the dashboards can rate from
        assert (
            relay.metrics.registry.get_sample_value(
                "audiosockets_subscriber_chunks_dropped_total",
                {"subscriber": sub.name, "stream": "mic", "reason": "replay_window_exceeded"},
            )
            == 0
        )
        assert (
            value(
                relay,
                "audiosockets_subscriber_chunks_sent_total",
                subscriber=sub.name,
                stream="mic",
            )
            == HELD
        )
        await sub.close()
    assert value(relay, "audiosockets_chunks_sent_total", stream="mic") == 2 * HELD


@pytest.mark.parametrize("relay_config", [RelayConfig(port=0, replay_seconds=1.0)])
async def test_a_session_the_client_abandoned_is_not_charged(
    relay: Relay, spooled: Publisher
) -> None:
    """A client that gave up on a session (a handshake the relay answered too
    late, a reset while the relay hung) resumes on its next session; the
    abandoned one must not charge it for the same chunks a second time."""
    await start_publishing(relay, spooled)  # 100..199 trimmed
    conn, peer = Connection("client"), Connection("relay")
    hello = conn.send(Hello(Role.SUBSCRIBER, "late"))
    peer.receive_data(hello)
    peer.next_event()
    conn.receive_data(peer.send(Welcome("relay", 1000, 1 << 20, 1000)))
    conn.next_event()  # what the relay will say; the client does not wait for it
    data = hello + conn.send(Subscribe("mic", resume=(("mic", RESUME_AT),)))
    assert relay.address is not None
    # Handshake, subscription and reset reach the relay before it reads any.
    with socket.create_connection((relay.address.host, relay.address.port)) as raw:
        raw.sendall(data)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await wait_until(
        lambda: not any(s.name == "late" for s in relay.sessions),
        what="the relay to end the abandoned session",
    )
    sub = await resuming_subscriber(relay, "late")
    got = await read_until(sub, NUMBERED - 1)
    assert got == list(range(NUMBERED - 50, NUMBERED))
    assert relay_lost(relay, "late") == HELD - 50  # once, by the session that delivered
    await sub.close()


def test_the_window_remembers_what_it_trimmed_not_the_gaps_between() -> None:
    from audiosockets.relay.window import ReplayWindow

    window = ReplayWindow()
    for seq in [*range(0, 10), *range(50, 60)]:  # 10..49 never reached the relay
        window.append(seq, b"x", 0.02, arrived=float(seq))
        window.trim(max_seconds=0.1, max_bytes=1 << 20)  # keeps 5 chunks
    assert window.first_seq() == 55
    assert window.trimmed_runs == [[0, 9], [50, 54]]
    assert window.trimmed_after(-1) == (15, 54)
    assert window.trimmed_after(5) == (9, 54)  # 6..9 and 50..54
    assert window.trimmed_after(20) == (5, 54)  # not 21..49
    assert window.trimmed_after(54) == (0, 54)


#: Another format for the same stream name: 20 ms is 7680 bytes, so a few
#: seconds of it are more than one batch the relay writes to a subscriber.
FMT_WIDE = AudioFormat(48000, 2, SampleType.FLOAT32)


def silence(fmt: AudioFormat) -> np.ndarray:
    """20 ms of zeros in ``fmt``."""
    return np.zeros((fmt.rate // 50, fmt.channels), dtype=fmt.dtype)


async def publish_then_change_format(
    relay: Relay, old: int, new: int, first_format: AudioFormat = FMT
) -> None:
    """``old`` 20 ms chunks of "mic" in ``first_format`` from one publisher
    run, then, once that run has left, ``new`` chunks in FMT_WIDE (or FMT when
    that was the first) from another; the numbering goes on."""
    second_format = FMT if first_format == FMT_WIDE else FMT_WIDE
    taken = 0
    for name, fmt, n in (("rec-a", first_format, old), ("rec-b", second_format, new)):
        publisher = Publisher(relay.url, name=name, retry=FAST_RETRY, metrics=Metrics())
        await publisher.start()
        stream = publisher.stream("mic", fmt)
        for _ in range(n):
            stream.send(silence(fmt))
        taken += n
        await wait_until(
            lambda expected=taken: (
                value(relay, "audiosockets_chunks_received_total", stream="mic") == expected
            ),
            what=f"the relay to take {name}'s chunks",
        )
        await publisher.close(timeout=2.0)


@pytest.mark.parametrize("relay_config", [RelayConfig(port=0, replay_seconds=60.0)])
async def test_a_format_change_charges_a_resume_into_the_old_audio(relay: Relay) -> None:
    """The old format's audio leaves the window at the change: a subscriber
    resuming into it gets the new audio and the relay counts what it held and
    dropped, as for any trim (it used to count nothing)."""
    await publish_then_change_format(relay, old=30, new=5)
    sub = Subscriber(relay.url, "mic", name="late", retry=FAST_RETRY, metrics=Metrics())
    sub.received["mic"] = 9  # it had 0..9 before
    await sub.start()
    got = await read_until(sub, 34)
    assert got == list(range(30, 35))
    assert relay_lost(relay, "late") == 20  # 10..29: held by the relay, never sent
    assert sub.gaps == 20
    await sub.close()


@pytest.mark.parametrize(
    "relay_config", [RelayConfig(port=0, replay_seconds=60.0, max_inflight_seconds=0.1)]
)
async def test_a_format_change_charges_a_reader_not_yet_sent_the_old_audio(relay: Relay) -> None:
    """A subscriber that has not read (its receive buffer full, the relay holding
    the rest in the window) when the format changes: what it gets plus what the
    relay counts for it is everything published."""
    conn = Connection("client")
    assert relay.address is not None
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # before connect: no autotuning
    raw.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(raw, (relay.address.host, relay.address.port))
    await loop.sock_sendall(raw, conn.send(Hello(Role.SUBSCRIBER, "stalled")))
    async with asyncio.timeout(5):
        while not isinstance(conn.next_event(), Welcome):  # NEED_DATA until it came
            conn.receive_data(await loop.sock_recv(raw, 1 << 16))
    await loop.sock_sendall(raw, conn.send(Subscribe("mic")))
    await wait_until(
        lambda: any(s.subscription for s in relay.subscribers if s.name == "stalled"),
        what="the relay to register the subscription",
    )
    # 4 s, 1.5 MB: far past 0.1 s in flight and one 256 KiB batch
    await publish_then_change_format(relay, old=200, new=5, first_format=FMT_WIDE)
    seqs: list[int] = []
    with raw:
        async with asyncio.timeout(10):
            while not seqs or seqs[-1] < 204:
                data = await loop.sock_recv(raw, 1 << 16)
                assert data, "the relay closed the connection"
                conn.receive_data(data)
                while not isinstance(event := conn.next_event(), NeedData):
                    if isinstance(event, ChunkData):
                        seqs.append(event.seq)
                    elif isinstance(event, Ping):
                        await loop.sock_sendall(raw, conn.send(Pong(event.nonce)))
    lost = relay_lost(relay, "stalled")
    assert seqs == sorted(set(seqs))
    assert len(seqs) + lost == 205
    assert lost > 0, "the relay sent everything before the change: the test proves nothing"


async def test_a_session_the_client_closed_while_the_relay_hung_is_not_charged(
    relay: Relay,
) -> None:
    """A client closes a session while the relay cannot read (hung, stalled):
    its FIN waits in the socket behind what the client sent before. When the
    relay runs again, the session's writer can run before the relay has read
    that end, and a write into the half-closed socket succeeds. What the
    session lost meanwhile the client's next session resumes; it must not be
    charged to the client. (The live stack's books were one chunk over when a
    dead session was charged subscriber_slow this way.)"""
    assert relay.address is not None
    conn = Connection("client")
    raw = socket.create_connection((relay.address.host, relay.address.port))
    try:
        raw.sendall(conn.send(Hello(Role.SUBSCRIBER, "gone")))
        while not isinstance(conn.next_event(), Welcome):
            conn.receive_data(await asyncio.to_thread(raw.recv, 65536))
        raw.sendall(conn.send(Subscribe("mic")))
        await wait_until(
            lambda: any(s.subscription for s in relay.subscribers if s.name == "gone"),
            what="the relay to register the subscription",
        )
        (session,) = [s for s in relay.subscribers if s.name == "gone"]
    finally:
        raw.close()  # a FIN: the client read everything the relay sent
    # From here until the first await the relay's loop does not run, as if hung.
    deadline = time.monotonic() + 5
    while not peer_closed(session.channel):  # the FIN reached the relay's kernel
        assert time.monotonic() < deadline, "the close never reached the relay's socket"
        time.sleep(0.001)  # noqa: ASYNC251 - the loop must not run: the relay hangs
    session.count_drop("mic", "subscriber_slow", 1)  # what went stale during the hang
    await wait_until(
        lambda: session not in relay.subscribers, what="the relay to end the closed session"
    )
    assert relay_lost(relay, "gone") == 0
    assert (
        value(relay, "audiosockets_chunks_dropped_total", stream="mic", reason="subscriber_slow")
        == 0
    )
