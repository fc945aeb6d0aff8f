"""Issue 11, item 1: half-sent frames. Sessions that send a CHUNK header
claiming 1 MiB, then 1 MiB - 64 bytes, then one byte now and then, against a
relay in its own process with a healthy 16 kHz stream beside it.

Right: every such session ends, either when the frame misses its deadline
(``frame_timeout``) or when the relay-wide input budget cuts the largest
holder (``input_budget``), and the two counts add up to the sessions sent;
the relay's RSS grows by at most 64 MB during and after; the healthy stream
loses nothing. ``HOSTILE_SESSIONS`` sets the number of sessions (default 800,
the issue's figure).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

from audiosockets.audio import AudioFormat, SampleType
from audiosockets.errors import ErrorCode
from audiosockets.protocol import CHUNK_HEAD, HEADER, MAGIC, PROTOCOL_VERSION, FrameType, OpenStream

from .harness import MiB, RelayProcess, healthy_stream, raw_session, relay_process, wait_for

SESSIONS = int(os.environ.get("HOSTILE_SESSIONS", "800"))
#: A format whose 2-s CHUNK bound is above the 1 MiB frame limit: the attacker
#: may legitimately announce a 1 MiB CHUNK, so only the deadline and the budget
#: stand between it and the relay's memory.
HUGE = AudioFormat(192000, 8, SampleType.FLOAT32)
CLAIMED = 1 << 20


class PeakRss:
    """Samples the relay's RSS in a thread; ``peak`` is the highest seen."""

    def __init__(self, relay: RelayProcess) -> None:
        self.relay = relay
        self.peak = relay.rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.peak = max(self.peak, self.relay.rss_bytes())
            except OSError:
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


async def _half_send(url: str, i: int, body: bytes) -> tuple[int, str] | None:
    session = await raw_session(url, "publisher", f"half-{i}")
    session.send(OpenStream(1, f"half-{i}", HUGE))
    header = HEADER.pack(MAGIC, PROTOCOL_VERSION, FrameType.CHUNK, CLAIMED)
    answer = asyncio.ensure_future(session.farewell(timeout=120))
    try:
        session.writer.write(header + body)
        await session.writer.drain()
        while not answer.done():  # one byte every second, as long as the relay lets us
            await asyncio.wait([answer], timeout=1.0)
            if not answer.done():
                session.writer.write(b"\x00")
    except ConnectionError:
        pass
    result = await answer
    session.close()
    return result


async def test_half_sent_frames_end_and_the_relay_keeps_its_memory() -> None:
    frame_timeout = 3.0
    body = CHUNK_HEAD.pack(1, 0, time.time_ns()) + b"\x00" * (CLAIMED - 64 - CHUNK_HEAD.size)
    # Every session comes from loopback: the per-address session cap (case 8,
    # tests/hostile/test_sessions_streams.py) is raised so this case tests the
    # frame deadline and the input budget, not admission.
    caps = {"max_sessions": SESSIONS + 64, "max_sessions_per_address": SESSIONS + 64}
    with (
        relay_process(frame_timeout=frame_timeout, **caps) as relay,
        healthy_stream(relay.url) as healthy,
    ):
        rss0 = relay.rss_bytes()
        with PeakRss(relay) as rss:
            answers = await asyncio.gather(
                *(_half_send(relay.url, i, body) for i in range(SESSIONS))
            )
        text = relay.scrape()
        healthy_reconnects = relay.log_text().count("publisher 'healthy-pub' connected") - 1
        await wait_for(
            lambda: relay.sample("audiosockets_connected_clients", role="publisher") == 1,
            timeout=60,
            what="every half-sending session to be gone",
        )
        after = relay.rss_bytes()
        report = healthy.stop()
        assert relay.alive()
    timed_out = relay.sample("audiosockets_protocol_errors_total", text, reason="frame_timeout")
    cut = relay.sample("audiosockets_protocol_errors_total", text, reason="input_budget")
    assert healthy_reconnects == 0, "the healthy publisher was cut"
    assert timed_out + cut == SESSIONS, (timed_out, cut)
    assert timed_out > 0
    assert cut > 0
    assert relay.total("audiosockets_protocol_errors_total", text) == SESSIONS
    assert {a[0] if a else None for a in answers} <= {ErrorCode.MALFORMED_FRAME, None}
    peak = rss.peak - rss0
    assert peak <= 64 * MiB, f"relay RSS grew {peak / MiB:.1f} MiB during the attack"
    assert after - rss0 <= 64 * MiB, f"relay RSS kept {(after - rss0) / MiB:.1f} MiB"
    report.assert_lossless()
    print(
        f"half-sent: {SESSIONS} sessions, {timed_out:g} timed out, {cut:g} cut; "
        f"RSS peak +{peak / MiB:.1f} MiB, after +{(after - rss0) / MiB:.1f} MiB; "
        f"healthy p99 {report.p99_ms:.1f} ms"
    )
