"""The processor core without a relay: backlog, isolation, errors, specs, workers."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import re
import signal
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import handlers_for_tests as hft
import numpy as np
import pytest
from click.testing import CliRunner
from processor_support import paced, sine, to_chunks

from _support import wait_until
from audiosockets.audio import Chunk
from audiosockets.cli import main
from audiosockets.errors import ConfigError, HandlerError
from audiosockets.metrics import Metrics
from audiosockets.processor import ChunkBacklog, Processor, parse_spec
from audiosockets.processor.backlog import CompletionOrder

RATE = 16000


@pytest.fixture(autouse=True)
def _reset_handlers() -> Iterator[None]:
    hft.reset()
    yield
    hft.GATE.set()  # never leave a handler thread blocked


def chunks(n: int, frames: int = 320, stream: str = "mic-1") -> list[Chunk]:
    return to_chunks(sine(440, n * frames / RATE, RATE, 0.2), RATE, frames, stream=stream)


def events_of(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


# --- backlog ------------------------------------------------------------------


def test_backlog_drops_oldest_beyond_chunk_limit() -> None:
    backlog = ChunkBacklog(max_chunks=3, max_seconds=None)
    dropped = [c.seq for chunk in chunks(5) for c in backlog.push(chunk)]
    assert dropped == [0, 1]
    assert [backlog.pop().seq for _ in range(3)] == [2, 3, 4]  # type: ignore[union-attr]
    assert backlog.pop() is None
    assert backlog.seconds == 0


def test_backlog_limits_seconds_of_audio_and_tracks_depth_per_stream() -> None:
    backlog = ChunkBacklog(max_chunks=None, max_seconds=0.1)  # five 20 ms chunks
    a, b = chunks(4, stream="a"), chunks(4, stream="b")
    dropped = [c for pair in zip(a, b, strict=True) for chunk in pair for c in backlog.push(chunk)]
    assert [(c.stream, c.seq) for c in dropped] == [("a", 0), ("b", 0), ("a", 1)]
    assert len(backlog) == 5
    assert backlog.depth == {"a": 2, "b": 3}
    assert backlog.seconds == pytest.approx(0.1)


def test_backlog_always_keeps_the_newest_chunk() -> None:
    backlog = ChunkBacklog(max_chunks=None, max_seconds=0.001)
    assert backlog.push(chunks(1)[0]) == []
    assert len(backlog) == 1


# --- running handlers -----------------------------------------------------------


async def test_every_chunk_processed_in_order_with_events_as_json_lines() -> None:
    out, m = io.StringIO(), Metrics()
    proc = Processor("handlers_for_tests:record", metrics=m, events=out)
    await proc.run(paced(chunks(50)))
    assert list(range(50)) == hft.SEEN
    lines = events_of(out)
    assert lines[0] == {
        "handler": "handlers_for_tests:record",
        "stream": "mic-1",
        "seq": 0,
        "frames": 320,
    }
    assert len(lines) == 50
    assert (
        value(
            m,
            "audiosockets_chunks_processed_total",
            stream="mic-1",
            handler="handlers_for_tests:record",
        )
        == 50
    )
    assert (
        value(m, "audiosockets_chunks_dropped_total", stream="mic-1", reason="processor_overrun")
        == 0
    )
    assert (
        value(m, "audiosockets_processing_time_seconds_count", handler="handlers_for_tests:record")
        == 50
    )


async def test_handler_raising_every_third_chunk_is_counted_and_processing_goes_on() -> None:
    out, m = io.StringIO(), Metrics()
    proc = Processor("handlers_for_tests:every_third", metrics=m, events=out)
    await proc.run(paced(chunks(30)))
    raises = sum(1 for seq in range(30) if seq % 3 == 2)
    assert (
        value(m, "audiosockets_handler_errors_total", handler="handlers_for_tests:every_third")
        == raises
    )
    assert [e["ok"] for e in events_of(out)] == [s for s in range(30) if s % 3 != 2]
    assert value(m, "audiosockets_handler_failing", handler="handlers_for_tests:every_third") == 0


async def test_a_handler_that_keeps_failing_is_marked_and_ends_the_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = Metrics()
    proc = Processor(
        "handlers_for_tests:always_fails",
        metrics=m,
        events=io.StringIO(),
        failing_after=3,
        exit_after=8,
    )

    template = chunks(1)[0]

    async def endless() -> AsyncIterator[Chunk]:
        seq = 0
        while True:
            yield dataclasses.replace(template, seq=seq)
            seq += 1
            await asyncio.sleep(0)

    with pytest.raises(
        HandlerError, match=r"failed 8 times in a row \(last: RuntimeError: model file missing\)"
    ):
        await asyncio.wait_for(proc.run(endless()), 20)
    assert (
        value(m, "audiosockets_handler_errors_total", handler="handlers_for_tests:always_fails")
        == 8
    )
    assert value(m, "audiosockets_handler_failing", handler="handlers_for_tests:always_fails") == 1
    # rate-limited: the first error is logged with its text, the next ones are only counted
    assert caplog.text.count("model file missing") == 1
    assert "3 failures in a row, marked failing" in caplog.text


async def test_slow_handler_drops_oldest_chunks_counted_exactly() -> None:
    m = Metrics()
    proc = Processor(
        "handlers_for_tests:blocking",
        metrics=m,
        events=io.StringIO(),
        backlog_chunks=4,
        backlog_seconds=None,
    )
    data = chunks(21)
    loop = asyncio.get_running_loop()

    async def source() -> AsyncIterator[Chunk]:
        yield data[0]
        assert await loop.run_in_executor(None, hft.STARTED.wait, 10)  # handler busy with seq 0
        for chunk in data[1:]:
            yield chunk  # the receive loop takes all 20 while the handler is stuck
        assert proc.stats.received == 21
        hft.GATE.set()

    await proc.run(source())
    assert hft.SEEN == [0, 17, 18, 19, 20]  # the newest 4 survive, the oldest were dropped
    assert (
        value(m, "audiosockets_chunks_dropped_total", stream="mic-1", reason="processor_overrun")
        == 16
    )
    assert proc.stats.dropped == 16


async def test_async_function_and_class_handlers_with_one_instance_per_stream() -> None:
    out = io.StringIO()
    await Processor("handlers_for_tests:async_peak", events=out).run(paced(chunks(3)))
    assert [type(e["peak"]) for e in events_of(out)] == [int, int, int]

    out = io.StringIO()
    mixed = [
        c
        for pair in zip(chunks(4, stream="a"), chunks(6, stream="b")[:4], strict=True)
        for c in pair
    ]
    mixed += chunks(6, stream="b")[4:]
    await Processor("handlers_for_tests:PerStream", events=out).run(paced(mixed))
    assert sorted((i.fmt.rate, i.count) for i in hft.PerStream.instances) == [(RATE, 4), (RATE, 6)]
    summaries = {e["stream"]: e["chunks"] for e in events_of(out) if e.get("event") == "summary"}
    assert summaries == {"a": 4, "b": 6}


async def test_a_non_serialisable_result_is_a_handler_error() -> None:
    m = Metrics()
    await Processor("handlers_for_tests:bad_return", metrics=m, events=io.StringIO()).run(
        paced(chunks(2))
    )
    assert (
        value(m, "audiosockets_handler_errors_total", handler="handlers_for_tests:bad_return") == 2
    )


async def test_user_handler_from_a_file_path(tmp_path: Path) -> None:
    path = tmp_path / "my_handler.py"
    path.write_text(
        textwrap.dedent(
            """
            def loudest(chunk):
                return {"peak": int(abs(chunk.samples).max()), "seconds": chunk.seconds}
            """
        )
    )
    out = io.StringIO()
    await Processor(f"{path}:loudest", events=out).run(paced(chunks(2)))
    assert [e["handler"] for e in events_of(out)] == ["my_handler.py:loudest"] * 2
    assert events_of(out)[0]["seconds"] == pytest.approx(0.02)


# --- specs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "kind", "target", "attr", "arg"),
    [
        ("level", "builtin", "level", None, None),
        ("vad:threshold_dbfs=-40", "builtin", "vad", None, "threshold_dbfs=-40"),
        ("archive:/data/audio", "builtin", "archive", None, "/data/audio"),
        ("mypkg.analysis:Detector", "module", "mypkg.analysis", "Detector", None),
        ("./plugins/detect.py:run", "file", "./plugins/detect.py", "run", None),
        ("detect.py:run", "file", "detect.py", "run", None),
    ],
)
def test_spec_forms(spec: str, kind: str, target: str, attr: str | None, arg: str | None) -> None:
    parsed = parse_spec(spec)
    assert (parsed.kind, parsed.target, parsed.attr, parsed.arg) == (kind, target, attr, arg)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--handler", "nope"], "unknown handler 'nope'"),
        (["--handler", ""], "--handler is empty"),
        (["--handler", "archive"], "handler archive needs an argument"),
        (["--handler", "no_such_module_xyz:run"], "handler module no_such_module_xyz not found"),
        (["--handler", "handlers_for_tests:missing"], "has no attribute 'missing'"),
        (
            ["--handler", "handlers_for_tests:GATE"],
            "neither callable nor has a handle(chunk) method",
        ),
        (["--handler", "/no/such/file.py:run"], "handler file /no/such/file.py does not exist"),
        (["--handler", "vad:hangover_ms=long"], "option hangover_ms needs a number"),
        (["--handler", "level", "--workers", "2"], "keeps state across chunks"),
    ],
)
def test_bad_spec_is_one_clear_line_and_exit_status(args: list[str], message: str) -> None:
    result = CliRunner().invoke(
        main, ["process", "--relay", "tcp://127.0.0.1:1", "--metrics-port", "0", *args]
    )
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("audiosockets: error: ")
    assert message in lines[0]
    expected = ConfigError.exit_code if "--workers" in args else HandlerError.exit_code
    assert result.exit_code == expected


def test_a_user_file_that_fails_to_import_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.py"
    path.write_text("import numpy\nraise RuntimeError('needs\\na GPU')\n")
    result = CliRunner().invoke(
        main, ["process", "--handler", f"{path}:run", "--metrics-port", "0"]
    )
    assert result.exit_code == HandlerError.exit_code
    assert (
        result.output.strip()
        == f"audiosockets: error: handler file {path} failed to import: RuntimeError: needs a GPU"
    )


# --- worker processes ------------------------------------------------------------

CPU_HANDLER = """
import os
import time

import numpy as np


def handle(chunk):
    t0, cpu0 = time.monotonic(), time.process_time()
    a = np.random.default_rng(chunk.seq).random(400_000)
    for _ in range(4):
        a = np.sort(a * 1.0001)
    t1, cpu1 = time.monotonic(), time.process_time()
    return {"pid": os.getpid(), "t0": t0, "t1": t1, "cpu0": cpu0, "cpu1": cpu1}
"""


async def test_two_workers_run_a_cpu_bound_handler_on_two_cores(tmp_path: Path) -> None:
    path = tmp_path / "cpu_handler.py"
    path.write_text(CPU_HANDLER)
    out = io.StringIO()
    proc = Processor(
        f"{path}:handle", workers=2, events=out, backlog_chunks=64, backlog_seconds=None
    )
    await proc.run(paced(chunks(24)))
    events = events_of(out)
    assert len(events) == 24
    assert proc.stats.errors == 0
    by_pid: dict[int, list[dict[str, float]]] = {}
    for e in events:
        by_pid.setdefault(int(e["pid"]), []).append(e)  # type: ignore[call-overload]
    assert len(by_pid) == 2, "the work must be spread over two worker processes"
    # CPU time each worker process spent in the handler (its own process clock, not wall time).
    cpu = {pid: sum(e["cpu1"] - e["cpu0"] for e in evs) for pid, evs in by_pid.items()}
    assert all(c > 0.25 * sum(cpu.values()) for c in cpu.values()), cpu
    # ... and at the same time: some call in one worker overlaps a call in the other.
    (a, b) = by_pid.values()
    assert any(x["t0"] < y["t1"] and y["t0"] < x["t1"] for x in a for y in b)
    # The workers' process CPU clocks, as reported back with each outcome.
    assert set(proc.stats.worker_cpu) == set(by_pid)
    assert all(proc.stats.worker_cpu[pid] >= cpu[pid] for pid in by_pid)


async def test_worker_processes_load_a_module_handler_and_count_its_errors() -> None:
    m = Metrics()
    out = io.StringIO()
    await Processor("handlers_for_tests:every_third", workers=1, metrics=m, events=out).run(
        paced(chunks(9))
    )
    assert (
        value(m, "audiosockets_handler_errors_total", handler="handlers_for_tests:every_third") == 3
    )
    assert [e["ok"] for e in events_of(out)] == [0, 1, 3, 4, 6, 7]


def test_stateful_builtins_refuse_several_workers() -> None:
    with pytest.raises(ConfigError, match="keeps state"):
        Processor("vad", workers=2)
    Processor("spectrum", workers=2)  # stateless: allowed


# --- a handler that never returns -------------------------------------------------


async def test_a_hung_thread_handler_does_not_stop_the_processor_from_stopping() -> None:
    m = Metrics()
    proc = Processor(
        "handlers_for_tests:blocking", metrics=m, events=io.StringIO(), drain_timeout=0.2
    )
    loop = asyncio.get_running_loop()

    async def source() -> AsyncIterator[Chunk]:
        for chunk in chunks(5):
            yield chunk
        assert await loop.run_in_executor(None, hft.STARTED.wait, 10)
        proc.request_stop()
        await asyncio.Event().wait()  # a live stream never ends by itself

    await asyncio.wait_for(proc.run(source()), 10)
    # seq 0 is stuck in the handler; the 4 behind it could not be processed: counted, not lost silently
    assert (
        value(m, "audiosockets_chunks_dropped_total", stream="mic-1", reason="processor_overrun")
        == 4
    )


HANGING_HANDLER = """
import os
import time


def handle(chunk):
    with open(os.environ["PID_FILE"], "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)
"""


async def test_a_hung_worker_process_is_terminated_at_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid_file = tmp_path / "pid"
    monkeypatch.setenv("PID_FILE", str(pid_file))
    handler = tmp_path / "hangs.py"
    handler.write_text(HANGING_HANDLER)
    proc = Processor(f"{handler}:handle", workers=1, events=io.StringIO(), drain_timeout=0.3)

    async def source() -> AsyncIterator[Chunk]:
        yield chunks(1)[0]
        await wait_until(pid_file.exists, what="worker started the handler")
        proc.request_stop()
        await asyncio.Event().wait()

    await asyncio.wait_for(proc.run(source()), 30)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_a_stream_closed_by_the_relay_is_torn_down_after_its_queued_chunks() -> None:
    out = io.StringIO()
    proc = Processor("handlers_for_tests:PerStream", events=out)
    a = chunks(6, stream="a")

    async def source() -> AsyncIterator[Chunk]:
        for chunk in a[:3]:
            yield chunk
        proc.stream_closed("a")  # e.g. moved to another group member
        for chunk in a[3:]:
            yield chunk  # ... and back again: a fresh instance
            await asyncio.sleep(0)

    await proc.run(source())
    summaries = [e["chunks"] for e in events_of(out) if e.get("event") == "summary"]
    assert summaries == [3, 3]
    assert len(hft.PerStream.instances) == 2


def test_stream_closed_markers_are_never_evicted() -> None:
    backlog = ChunkBacklog(max_chunks=2, max_seconds=None)
    a = chunks(4)
    backlog.push(a[0])
    backlog.mark_closed("mic-1")
    dropped = [c.seq for chunk in a[1:] for c in backlog.push(chunk)]
    assert dropped == [0, 1]
    items = [backlog.pop() for _ in range(len(backlog))]
    assert [getattr(i, "seq", "closed") for i in items] == ["closed", 2, 3]


async def test_builtin_metrics_come_back_from_a_worker_process() -> None:
    m = Metrics()
    data = to_chunks(sine(1000, 0.5, RATE, 0.5), RATE, 800)
    await Processor("level", workers=1, metrics=m, events=io.StringIO()).run(paced(data))
    rms = value(m, "audiosockets_level_dbfs", stream="mic-1", channel="0", measure="rms")
    assert rms == pytest.approx(20 * np.log10(0.5 / np.sqrt(2)), abs=0.1)
    assert (
        value(
            m, "audiosockets_handler_start_latency_seconds_count", stream="mic-1", handler="level"
        )
        == 10
    )


ARCHITECTURE = Path(__file__).parents[2] / "services" / "ARCHITECTURE.md"


async def test_every_processor_metric_in_the_architecture_note_is_exported() -> None:
    text = ARCHITECTURE.read_text()
    section = text[text.index("Processor: ") : text.index("Drop reasons")]
    names = set(re.findall(r"`(audiosockets_[a-z_]+)", section))
    assert len(names) == 17
    m = Metrics()
    x = sine(440, 0.5, RATE, 0.5)
    for spec in ("level", "vad", "spectrum"):
        await Processor(spec, metrics=m, events=io.StringIO()).run(paced(to_chunks(x, RATE, 800)))
    exported = {metric.name for metric in m.registry.collect()}
    # prometheus_client strips _total from counter family names
    missing = {n for n in names if n not in exported and n.removesuffix("_total") not in exported}
    assert not missing, missing


async def test_a_handler_file_can_import_its_sibling_modules(tmp_path: Path) -> None:
    (tmp_path / "thresholds_for_test.py").write_text("LOUD = 0.1\n")
    (tmp_path / "detector.py").write_text(
        "from thresholds_for_test import LOUD\n\ndef handle(chunk):\n    return {'loud_at': LOUD}\n"
    )
    out = io.StringIO()
    await Processor(f"{tmp_path / 'detector.py'}:handle", events=out).run(paced(chunks(1)))
    assert events_of(out)[0]["loud_at"] == 0.1


async def test_sigterm_stops_a_running_processor_and_drains_its_backlog() -> None:
    m = Metrics()
    out = io.StringIO()
    proc = Processor("handlers_for_tests:sleepy", metrics=m, events=out)
    sent = chunks(5)  # 100 ms of audio, 1 s of handling: most of it is still queued at SIGTERM

    async def live() -> AsyncIterator[Chunk]:
        for chunk in sent:
            yield chunk
        await asyncio.Event().wait()  # a live stream never ends by itself

    before = signal.getsignal(signal.SIGTERM)
    run = asyncio.create_task(proc.run(live()))
    await wait_until(lambda: proc.stats.received == len(sent), what="all chunks received")
    assert proc.stats.processed < len(sent)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(run, 10)
    # the drain handled every chunk queued at SIGTERM: none dropped, none left behind
    assert proc.stats.processed == len(sent)
    assert proc.stats.dropped == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_completion_order_moves_done_only_past_a_contiguous_prefix() -> None:
    order = CompletionOrder()
    for seq in (4, 5, 6, 7):
        order.received("a", seq)
    order.received("b", 1)
    assert order.finish("a", 6) is None  # 4 and 5 are still in flight
    assert order.finish("a", 4) == 4
    assert order.finish("b", 1) == 1  # streams are independent
    assert order.finish("a", 5) == 6  # 5 completes the prefix up to the finished 6
    assert order.finish("a", 7) == 7
    assert order.finish("unknown", 1) is None


async def test_stop_returns_once_the_backlog_is_drained_and_the_handler_torn_down() -> None:
    out = io.StringIO()
    proc = Processor("handlers_for_tests:PerStream", events=out)
    sent = chunks(6)

    async def live() -> AsyncIterator[Chunk]:
        for chunk in sent:
            yield chunk
        await asyncio.Event().wait()

    await proc.start(live())
    serving = asyncio.create_task(proc.serve_forever())
    await wait_until(lambda: proc.stats.received == len(sent), what="all chunks received")
    await proc.stop()
    assert proc.stats.processed == len(sent)  # drained before stop() returned
    assert events_of(out) == [
        {
            "handler": "handlers_for_tests:PerStream",
            "stream": "mic-1",
            "event": "summary",
            "chunks": len(sent),
            "rate": RATE,
        }
    ]  # torn down
    assert serving.done()
    await serving
    await proc.stop()  # a second stop is harmless
    assert proc.stats.processed == len(sent)


async def test_stop_on_a_started_processor_that_never_served_still_drains() -> None:
    proc = Processor("handlers_for_tests:record", events=io.StringIO())
    await proc.start(paced(chunks(3)))
    await wait_until(lambda: proc.stats.received == 3, what="all chunks received")
    await proc.stop()
    assert proc.stats.processed + proc.stats.dropped == 3


async def test_one_streams_failures_never_end_the_run_for_the_others() -> None:
    """A stream whose every chunk fails (a name the file system refused) used to
    count toward the failed-in-a-row exit and take the healthy streams down (exit 6)."""
    m = Metrics()
    proc = Processor(
        "handlers_for_tests:fails_on_bad_streams",
        metrics=m,
        events=io.StringIO(),
        failing_after=3,
        exit_after=8,
    )
    good = chunks(30, stream="good-1")
    bad = chunks(100, stream="bad-1")

    async def source() -> AsyncIterator[Chunk]:
        # The bad stream's chunks come in long bursts (a replay), far over exit_after.
        for i in range(0, 30, 10):
            for chunk in good[i : i + 10]:
                yield chunk
                await asyncio.sleep(0)
            for chunk in bad[i * 3 : i * 3 + 30]:
                yield chunk
                await asyncio.sleep(0)

    await asyncio.wait_for(proc.run(source()), 20)  # ends with its source, no HandlerError
    handler = "handlers_for_tests:fails_on_bad_streams"
    assert value(m, "audiosockets_chunks_processed_total", stream="good-1", handler=handler) == 30
    assert value(m, "audiosockets_handler_errors_total", handler=handler) == 90
    assert value(m, "audiosockets_handler_failing", handler=handler) == 1  # bad-1 is failing
    assert list(range(30)) == hft.SEEN


async def test_every_stream_failing_still_ends_the_run() -> None:
    proc = Processor(
        "handlers_for_tests:fails_on_bad_streams",
        metrics=Metrics(),
        events=io.StringIO(),
        failing_after=3,
        exit_after=8,
    )
    a, b = chunks(20, stream="bad-a"), chunks(20, stream="bad-b")

    async def source() -> AsyncIterator[Chunk]:
        for pair in zip(a, b, strict=True):
            for chunk in pair:
                yield chunk
                await asyncio.sleep(0)
        await asyncio.Event().wait()  # live: never ends by itself

    with pytest.raises(HandlerError, match="failed 8 times in a row on each of its 2 streams"):
        await asyncio.wait_for(proc.run(source()), 20)
