"""Recorder logic against a fake publisher: order, metrics, device loss, stopping."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from recorder_fakes import FakeClock, FakePublisher, write_pcm_wav

from _support import wait_until
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.errors import ConfigError, DeviceError
from audiosockets.metrics import Metrics
from audiosockets.recorder import Recorder, RecorderConfig
from audiosockets.sources import CapturedBlock, DeviceLost, Source

MONO16 = AudioFormat(16000, 1, SampleType.INT16)
BLOCK = 320  # 20 ms


def value(metrics: Metrics, name: str, **labels: str) -> float:
    got = metrics.registry.get_sample_value(name, labels)
    assert got is not None, f"{name}{labels} is not exported"
    return got


class ScriptedSource(Source):
    """Plays a script: blocks, ``"lost"`` (DeviceLost), then ends. ``open`` fails
    ``fail_opens`` times after the first successful open."""

    retryable = True

    def __init__(self, script: list[CapturedBlock | str], fail_opens: int = 0) -> None:
        super().__init__(MONO16, BLOCK)
        self.script = list(script)
        self.fail_opens = fail_opens
        self.opens = 0
        self.closes = 0

    @property
    def description(self) -> str:
        return "scripted"

    async def open(self) -> None:
        self.opens += 1
        if self.opens > 1 and self.fail_opens:
            self.fail_opens -= 1
            raise DeviceError("device busy")

    async def read(self) -> CapturedBlock | None:
        await asyncio.sleep(0)
        if not self.script:
            return None
        step = self.script.pop(0)
        if isinstance(step, str):
            self.overflows += 2  # counters of the old stream
            raise DeviceLost("gone")
        return step

    async def close(self) -> None:
        self.closes += 1


def block(i: int, start_ns: int = 0) -> CapturedBlock:
    return CapturedBlock(np.full((BLOCK, 1), i, np.int16), start_ns + i * 20_000_000)


def config(**kw: object) -> RecorderConfig:
    base: dict[str, object] = {"stream": "mic-t", "retry_max_wait": 0.01, "flush_timeout": 0.5}
    base.update(kw)
    return RecorderConfig(**base)  # type: ignore[arg-type]


async def test_a_file_is_published_in_order_and_counted(tmp_path: Path) -> None:
    data = (np.arange(16000) % 2000).astype(np.int16).reshape(-1, 1)
    wav = write_pcm_wav(tmp_path / "a.wav", data, 16000)
    metrics, publisher = Metrics(), FakePublisher()
    recorder = Recorder(
        config(source=f"file:{wav}"), metrics=metrics, publisher=publisher, clock=FakeClock()
    )
    assert await recorder.run() is True
    sent = publisher.streams["mic-t"].sent
    assert len(sent) == 50
    assert np.array_equal(np.concatenate([s.samples for s in sent]), data)
    assert [s.captured_ns - sent[0].captured_ns for s in sent] == [
        i * 20_000_000 for i in range(50)
    ]
    assert value(metrics, "audiosockets_frames_captured_total", stream="mic-t") == 16000
    assert (
        value(metrics, "audiosockets_capture_to_send_latency_seconds_count", stream="mic-t") == 50
    )
    assert publisher.flush_timeouts == [pytest.approx(0.5, abs=0.05)]
    assert publisher.closed
    for reason in ("spool_full", "input_overflow", "capture_queue_full"):
        assert (
            value(metrics, "audiosockets_chunks_dropped_total", stream="mic-t", reason=reason) == 0
        )


async def test_a_lost_device_is_reopened_and_the_gap_counted() -> None:
    gap_ns = 500_000_000
    script: list[CapturedBlock | str] = [block(0), block(1), block(2), "lost"]
    script += [block(i, start_ns=gap_ns) for i in range(3, 5)]
    source = ScriptedSource(script, fail_opens=2)
    metrics, publisher = Metrics(), FakePublisher()
    recorder = Recorder(config(), metrics=metrics, publisher=publisher, source=source)
    await recorder.run()
    assert source.opens == 4  # start, two failed reopens, one good
    sent = publisher.streams["mic-t"].sent
    assert [int(s.samples[0, 0]) for s in sent] == [0, 1, 2, 3, 4]
    assert value(metrics, "audiosockets_capture_gaps_total", stream="mic-t") == 1
    assert value(metrics, "audiosockets_capture_gap_seconds_total", stream="mic-t") == 0.5
    assert value(metrics, "audiosockets_input_overflows_total", stream="mic-t") == 2
    assert (
        value(metrics, "audiosockets_chunks_dropped_total", stream="mic-t", reason="input_overflow")
        == 2
    )


async def test_source_counters_become_metrics_as_deltas() -> None:
    class Overflowing(ScriptedSource):
        async def read(self) -> CapturedBlock | None:
            self.overflows += 1
            self.dropped += 3
            return await super().read()

    source = Overflowing([block(i) for i in range(4)])
    metrics = Metrics()
    await Recorder(config(), metrics=metrics, publisher=FakePublisher(), source=source).run()
    assert value(metrics, "audiosockets_input_overflows_total", stream="mic-t") == 5
    assert (
        value(
            metrics,
            "audiosockets_chunks_dropped_total",
            stream="mic-t",
            reason="capture_queue_full",
        )
        == 15
    )


async def test_stop_ends_a_live_source_and_flushes() -> None:
    publisher = FakePublisher(flush_result=False)
    recorder = Recorder(config(source="synth:sine"), publisher=publisher)
    task = asyncio.create_task(recorder.run())
    await wait_until(lambda: recorder.blocks_captured >= 3, timeout=5, what="three blocks")
    recorder.request_stop()
    assert await asyncio.wait_for(task, 5) is False  # the fake relay never took it all
    assert publisher.closed
    assert publisher.flush_timeouts == [pytest.approx(0.5, abs=0.05)]
    assert await recorder.stop() is False  # a second stop changes nothing
    assert len(publisher.flush_timeouts) == 1


async def test_a_source_that_cannot_open_fails_start_and_leaves_no_publisher() -> None:
    class Broken(ScriptedSource):
        async def open(self) -> None:
            raise DeviceError("input device 'x' is busy")

    publisher = FakePublisher()
    recorder = Recorder(config(), publisher=publisher, source=Broken([]))
    with pytest.raises(DeviceError, match="busy"):
        await recorder.run()
    assert not publisher.started


async def test_spool_depth_is_read_from_the_publisher_stream() -> None:
    metrics, publisher = Metrics(), FakePublisher()
    recorder = Recorder(config(), metrics=metrics, publisher=publisher, source=ScriptedSource([]))
    assert value(metrics, "audiosockets_spool_depth_chunks", stream="mic-t") == 0
    await recorder.start()
    publisher.streams["mic-t"].unsent = 7
    assert value(metrics, "audiosockets_spool_depth_chunks", stream="mic-t") == 7
    assert value(metrics, "audiosockets_spool_depth_seconds", stream="mic-t") == pytest.approx(0.14)
    await recorder.stop()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"stream": ""}, "--stream"),
        ({"spool_seconds": 0.0}, "--spool-seconds must be positive"),
        ({"rate": 0}, "sample rate 0 out of range"),
        ({"dtype": "int8"}, "unknown sample type 'int8'"),
        ({"block_ms": 0.0}, "--block-ms must be positive"),
    ],
)
def test_bad_config_is_one_clear_error(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Recorder(config(**kw), publisher=FakePublisher(), source=ScriptedSource([]))


async def test_sigterm_stops_a_running_recorder_and_flushes() -> None:
    publisher = FakePublisher(flush_result=True)
    recorder = Recorder(config(source="synth:sine"), publisher=publisher)
    before = signal.getsignal(signal.SIGTERM)
    task = asyncio.create_task(recorder.run())
    await wait_until(lambda: recorder.blocks_captured >= 3, timeout=5, what="three blocks")
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(task, 5) is True  # flushed: everything was taken
    assert publisher.closed
    assert len(publisher.flush_timeouts) == 1
    assert signal.getsignal(signal.SIGTERM) is before
