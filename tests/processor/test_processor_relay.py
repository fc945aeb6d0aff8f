"""Processors on a real relay over loopback: isolation of a slow handler,
archive sample-exactness across a relay restart, the ``serve`` entry point."""

from __future__ import annotations

import asyncio
import io
import json
import wave
from pathlib import Path

import handlers_for_tests as hft
import numpy as np
import pytest

from _support import free_port, wait_until
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.client import Publisher, RetryPolicy, Subscriber
from audiosockets.handlers import HandlerOptions
from audiosockets.metrics import Metrics
from audiosockets.processor import HandlerSpec, Processor, ProcessorConfig, serve
from audiosockets.relay import Relay, RelayConfig

FMT = AudioFormat(16000, 1, SampleType.INT16)
BLOCK = 160  # 10 ms
FAST_RETRY = RetryPolicy(initial=0.02, cap=0.2, jitter=0.02, connect_timeout=1.0)


@pytest.fixture(autouse=True)
def _reset_handlers() -> None:
    hft.reset()


def value(m: Metrics, name: str, **labels: str) -> float:
    v = m.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def payloads(n: int) -> list[bytes]:
    rng = np.random.default_rng(11)
    return [rng.integers(-20000, 20000, BLOCK, dtype=np.int16).tobytes() for _ in range(n)]


async def test_slow_processor_drops_counted_exactly_fast_one_gets_everything(relay: Relay) -> None:
    n = 150
    pub_m, fast_m, slow_m = Metrics(), Metrics(), Metrics()
    pub = Publisher(relay.url, name="rec", metrics=pub_m, retry=FAST_RETRY)
    fast_sub = Subscriber(
        relay.url, "mic", name="fast", start="earliest", metrics=fast_m, retry=FAST_RETRY
    )
    slow_sub = Subscriber(
        relay.url, "mic", name="slow", start="earliest", metrics=slow_m, retry=FAST_RETRY
    )
    fast = Processor("handlers_for_tests:record", metrics=fast_m, events=io.StringIO())
    slow = Processor(
        "handlers_for_tests:sleepy", metrics=slow_m, events=io.StringIO(), backlog_seconds=0.1
    )
    await pub.start()
    stream = pub.stream("mic", FMT)
    async with fast_sub, slow_sub:
        runs = [asyncio.create_task(fast.run(fast_sub)), asyncio.create_task(slow.run(slow_sub))]
        for data in payloads(n):
            stream.send(data)
            await asyncio.sleep(0.002)  # pacing the sender (5x real time), not waiting on anything
        assert await pub.flush(5)
        await wait_until(lambda: fast.stats.processed == n, what="fast processor done")
        await wait_until(lambda: slow.stats.received == n, what="slow processor received all")
        await fast.stop()
        await slow.stop()
        await asyncio.gather(*runs)
    await pub.close(0.5)

    assert list(range(n)) == hft.SEEN
    assert (
        value(fast_m, "audiosockets_chunks_dropped_total", stream="mic", reason="processor_overrun")
        == 0
    )
    dropped = value(
        slow_m, "audiosockets_chunks_dropped_total", stream="mic", reason="processor_overrun"
    )
    processed = value(
        slow_m,
        "audiosockets_chunks_processed_total",
        stream="mic",
        handler="handlers_for_tests:sleepy",
    )
    assert dropped > n / 2  # it is ten times too slow
    assert processed + dropped == n  # every chunk is either processed or counted as dropped
    assert (processed, dropped) == (slow.stats.processed, slow.stats.dropped)
    for m in (fast_m, slow_m):
        assert value(m, "audiosockets_sequence_gaps_total", stream="mic") == 0
    # Neither the relay nor the recorder side lost anything on the slow handler's account.
    assert (
        value(
            relay.metrics,
            "audiosockets_chunks_dropped_total",
            stream="mic",
            reason="subscriber_slow",
        )
        == 0
    )
    assert value(pub_m, "audiosockets_chunks_dropped_total", stream="mic", reason="spool_full") == 0


def check_archive(directory: Path, sent: bytes, segments: int = 4) -> None:
    wavs = sorted(directory.glob("*.wav"))
    assert len(wavs) >= segments
    written = b""
    for path in wavs:
        with wave.open(str(path)) as w:
            written += w.readframes(w.getnframes())
    assert written == sent
    assert all('"ended_by": "gap"' not in p.with_suffix(".json").read_text() for p in wavs)


async def test_archive_is_sample_exact_across_a_relay_restart(tmp_path: Path) -> None:
    n = 120
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    config = RelayConfig(host="127.0.0.1", port=port, heartbeat_interval=0.5)
    holder = {"relay": Relay(config, metrics=Metrics())}
    await holder["relay"].start()
    data = payloads(n)
    pub = Publisher(url, name="rec", retry=FAST_RETRY, history_seconds=30)
    sub = Subscriber(url, "mic", name="archiver", start="earliest", retry=FAST_RETRY)
    proc = Processor(
        f"archive:{tmp_path}", options=HandlerOptions(segment_seconds=0.25), events=io.StringIO()
    )
    await pub.start()
    stream = pub.stream("mic", FMT)
    try:
        async with sub:
            run = asyncio.create_task(proc.run(sub))
            for seq, payload in enumerate(data):
                stream.send(payload)
                if seq == n // 3:
                    await holder["relay"].stop()
                    holder["relay"] = Relay(config, metrics=Metrics())
                    await holder["relay"].start()
                await asyncio.sleep(0.003)  # pacing the sender, not waiting on anything
            assert await pub.flush(10)
            await wait_until(
                lambda: proc.stats.processed >= n, timeout=20, what="archive got every chunk"
            )
            await proc.stop()
            await run
        assert sub.metrics.registry.get_sample_value(
            "audiosockets_reconnects_total", {"role": "subscriber"}
        )
    finally:
        await pub.close(0.5)
        await holder["relay"].stop()

    check_archive(tmp_path, b"".join(data))  # 1.2 s of audio in 0.25 s segments


async def test_serve_runs_a_builtin_from_config_and_writes_events_to_a_file(
    relay: Relay, tmp_path: Path
) -> None:
    events = tmp_path / "events.jsonl"
    m = Metrics()
    started: list[Processor] = []
    config = ProcessorConfig(
        handler="vad",
        relay=relay.url,
        stream="mic",
        metrics_port=0,
        events=str(events),
        start="earliest",
    )
    task = asyncio.create_task(serve(config, metrics=m, started=started.append))
    pub = Publisher(relay.url, name="rec", retry=FAST_RETRY)
    await pub.start()
    stream = pub.stream("mic", FMT)
    tone = (np.sin(np.arange(BLOCK * 60) * 2 * np.pi * 440 / 16000) * 8000).astype(np.int16)
    silence = np.zeros(BLOCK * 40, np.int16)
    audio = np.concatenate([silence, tone, silence])
    for i in range(0, len(audio), BLOCK):
        stream.send(audio[i : i + BLOCK])
    assert await pub.flush(5)
    await wait_until(
        lambda: bool(started) and started[0].stats.processed == len(audio) // BLOCK, what="vad done"
    )
    await started[0].stop()
    await asyncio.wait_for(task, 10)
    await pub.close(0.5)
    lines = events.read_text().splitlines()
    assert [line.split('"event":"')[1].split('"')[0] for line in lines] == ["vad_start", "vad_end"]
    assert m.registry.get_sample_value("audiosockets_vad_segments_total", {"stream": "mic"}) == 1


async def test_archive_completes_a_stream_handed_to_another_group_member(
    relay: Relay, tmp_path: Path
) -> None:
    closed: list[str] = []
    proc_a = Processor(f"archive:{tmp_path / 'a'}", events=io.StringIO())
    proc_b = Processor(f"archive:{tmp_path / 'b'}", events=io.StringIO())

    def on_closed(stream: str) -> None:
        closed.append(stream)
        proc_a.stream_closed(stream)

    sub_a = Subscriber(
        relay.url,
        "mic-*",
        group="arch",
        name="a",
        start="earliest",
        retry=FAST_RETRY,
        on_stream_closed=on_closed,
    )
    sub_b = Subscriber(relay.url, "mic-*", group="arch", name="b", retry=FAST_RETRY)
    pub = Publisher(relay.url, name="rec", retry=FAST_RETRY)
    data = {name: payloads(20) for name in ("mic-1", "mic-2")}
    await pub.start()
    streams = {name: pub.stream(name, FMT) for name in data}
    async with sub_a:
        run_a = asyncio.create_task(proc_a.run(sub_a))
        for i in range(20):
            for name, stream in streams.items():
                stream.send(data[name][i])
        assert await pub.flush(5)
        await wait_until(
            lambda: proc_a.stats.processed == 40, what="member a archived both streams"
        )
        async with sub_b:  # the relay moves one of a's two streams to b
            run_b = asyncio.create_task(proc_b.run(sub_b))
            await wait_until(lambda: bool(closed), what="a stream handed over")
            moved = closed[0]
            await wait_until(
                lambda: any((tmp_path / "a").glob(f"{moved}_*.wav")), what="segment completed"
            )
            assert not run_a.done()
            await proc_b.stop()
            await run_b
        await proc_a.stop()
        await run_a
    await pub.close(0.5)
    (wav,) = (tmp_path / "a").glob(f"{moved}_*.wav")
    with wave.open(str(wav)) as w:
        assert w.readframes(w.getnframes()) == b"".join(data[moved])
    assert json.loads(wav.with_suffix(".json").read_text())["ended_by"] == "closed"


@pytest.mark.parametrize("workers", [0, 1])
async def test_serve_checks_the_handler_once_before_connecting(
    relay: Relay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    import audiosockets.processor.loading as loading
    import audiosockets.processor.runners as runners
    import audiosockets.processor.server as server

    calls: list[str] = []
    real = loading.check_handler

    def counting(spec: HandlerSpec, options: HandlerOptions) -> object:
        calls.append(spec.text)
        return real(spec, options)

    monkeypatch.setattr(server, "check_handler", counting)
    monkeypatch.setattr(runners, "check_handler", counting)
    started: list[Processor] = []
    config = ProcessorConfig(
        handler=f"archive:{tmp_path}", relay=relay.url, workers=workers, metrics_port=0
    )
    task = asyncio.create_task(serve(config, metrics=Metrics(), started=started.append))
    await wait_until(lambda: bool(started), what="processor built")
    started[0].request_stop()  # serve still starts the runners (loading the handler), then drains
    await asyncio.wait_for(task, 10)
    assert calls == [f"archive:{tmp_path}"]  # serve's check; the runner only loads
