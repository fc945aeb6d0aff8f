"""Hostile case 9: a subscriber that stops reading. The relay bounds what it
has written and the subscriber has not taken (``max_inflight_seconds``), so
what the subscriber reads when it resumes is at most about ``queue_seconds``
+ ``max_inflight_seconds`` old, and every chunk it missed is counted
``subscriber_slow`` while it stalls: received + counted == published, exactly.
"""

from __future__ import annotations

import asyncio
import threading
import time

from audiosockets.protocol import (
    ChunkData,
    CloseReason,
    CloseStream,
    OpenStream,
    Ping,
    Role,
    Subscribe,
)

from .harness import HEALTHY_STREAM, healthy_stream, relay_process
from .test_sessions_streams import Client, connect, poll, run_attack

QUEUE_SECONDS = 2.0
INFLIGHT_SECONDS = 1.0
STALL_SECONDS = 15.0
CLIENT_BUFFER_SECONDS = 5.0  # what a raw client's own receive buffer takes in (loopback)
NAME = "stalled-raw"


async def _stalled_reader(
    relay: object, resumed: threading.Event
) -> tuple[list[int], float, float, float, bool]:
    """Subscribe to the healthy stream with a small receive buffer, read for
    1 s, read nothing for ``STALL_SECONDS``, then read to the stream's end.
    Returns (seqs read, subscriber_slow counted when the stall ended, oldest
    age among the chunks read from buffers after it and among those the relay
    wrote after it (s), whether CLOSE_STREAM ended came)."""
    client = await connect(relay, Role.SUBSCRIBER, NAME, rcvbuf=4096)  # type: ignore[arg-type]
    assert isinstance(client, Client)
    client.send(Subscribe(HEALTHY_STREAM))
    seqs: list[int] = []
    ages: dict[int, float] = {}  # seq -> age when read (s)
    ended = False

    async def read_until(deadline: float) -> bool:
        while time.monotonic() < deadline:
            try:
                event = await client.next(timeout=max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                return False
            if isinstance(event, ChunkData):
                seqs.append(event.seq)
                ages[event.seq] = time.time() - event.captured_ns / 1e9
            elif isinstance(event, CloseStream):
                assert event.reason is CloseReason.ENDED
                return True
            elif event is None:
                return False
            else:
                assert isinstance(event, OpenStream)
        return False

    await read_until(time.monotonic() + 1.0)
    read_before = len(seqs)
    # The stall itself (the scenario, not a wait): nothing read, but a PING a
    # second keeps the session, as a live client that stopped reading would.
    for nonce in range(int(STALL_SECONDS)):
        client.send(Ping(nonce))
        await asyncio.sleep(1.0)
    # Counted while it stalled, not when it reads again:
    slow_at_resume = await asyncio.to_thread(
        relay.sample,  # type: ignore[attr-defined]
        "audiosockets_subscriber_chunks_dropped_total",
        reason="subscriber_slow",
        subscriber=NAME,
        stream=HEALTHY_STREAM,
    )
    ended = await read_until(time.monotonic() + 2.0)
    resumed.set()
    if not ended:
        ended = await read_until(time.monotonic() + 60.0)
    client.close()
    # The chunks read after the stall: first what sat in buffers (the
    # client's own receive buffer, then at most max_inflight_seconds the relay
    # had written), then, after the skipped ones, what the relay wrote anew.
    stalled = seqs[read_before:]
    gap = next(i for i in range(1, len(stalled)) if stalled[i] != stalled[i - 1] + 1)
    buffered = max(ages[q] for q in stalled[:gap])
    fresh = max(ages[q] for q in stalled[gap:])
    return seqs, slow_at_resume, buffered, fresh, ended


def test_case9_a_stalled_subscriber_gets_recent_audio_and_every_skip_is_counted() -> None:
    with relay_process(
        replay_seconds=30.0, queue_seconds=QUEUE_SECONDS, max_inflight_seconds=INFLIGHT_SECONDS
    ) as relay:
        with healthy_stream(relay.url) as healthy:
            resumed = threading.Event()
            result: list[tuple[list[int], float, float, float, bool]] = []
            attack = threading.Thread(
                target=lambda: result.append(run_attack(lambda: _stalled_reader(relay, resumed)))
            )
            attack.start()
            assert resumed.wait(STALL_SECONDS + 60.0), "the stalled reader never resumed"
            report = healthy.stop()  # the publisher ends the stream: CLOSE_STREAM ended
            attack.join(90.0)
        poll(
            lambda: relay.sample("audiosockets_connected_clients", role="subscriber") == 0,
            timeout=30.0,
            what="the subscribers gone",
        )
        text = relay.scrape()
        assert relay.alive()
    report.assert_lossless()
    seqs, slow_at_resume, buffered, fresh, ended = result[0]
    assert ended, "the stalled reader never saw the stream end"
    labels = {"subscriber": NAME, "stream": HEALTHY_STREAM}
    sent = relay.sample("audiosockets_subscriber_chunks_sent_total", text, **labels)
    slow = relay.sample(
        "audiosockets_subscriber_chunks_dropped_total", text, reason="subscriber_slow", **labels
    )
    trimmed = relay.sample(
        "audiosockets_subscriber_chunks_dropped_total",
        text,
        reason="replay_window_exceeded",
        **labels,
    )
    print(
        f"case 9: read {len(seqs)}, slow {slow} ({slow_at_resume} counted during the stall), "
        f"trimmed {trimmed}; after the stall: buffered audio up to {buffered:.2f} s old, "
        f"audio written anew up to {fresh:.2f} s old"
    )
    assert seqs == sorted(set(seqs))
    assert seqs[-1] == report.sent - 1  # to the publisher's last chunk
    published = seqs[-1] - seqs[0] + 1
    assert sent == len(seqs)
    assert len(seqs) + slow + trimmed == published
    # Skipped as the audio went stale, during the stall: all of it but what
    # the buffers took and the last queue_seconds (1 s of slack).
    least = (STALL_SECONDS - QUEUE_SECONDS - INFLIGHT_SECONDS - CLIENT_BUFFER_SECONDS - 1.0) * 50
    assert slow_at_resume >= least
    assert slow >= slow_at_resume
    # What the relay wrote after the stall was at most queue_seconds old (+1 s
    # for a loaded machine), not the length of the stall.
    assert fresh <= QUEUE_SECONDS + 1.0, fresh
