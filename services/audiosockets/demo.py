"""``audiosockets demo``: relay, synthetic recorders, ``level`` and ``vad``, one table.

Everything runs in this one process and one event loop (the handlers in their
own threads, as in ``audiosockets process``): a relay, one ``Recorder`` per
stream with a ``synth:`` source, and two ``Processor``s subscribed to all
streams. Each component has its own ``Metrics`` registry, exactly as if it
were its own service; the table is computed from those registries every
``refresh`` seconds (rates and latencies are deltas over the last refresh).
VAD events go to the table instead of stdout. Ctrl-C (or ``seconds``) stops
the recorders first, then the processors drain, then the relay stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any

from prometheus_client import CollectorRegistry

from .metrics import Metrics
from .processor import Processor
from .service import signal_handlers

#: Sources handed out to the demo streams in turn.
SOURCES = ("synth:speechlike", "synth:sine:440", "synth:noise", "synth:silence")


@dataclass(frozen=True, slots=True)
class DemoConfig:
    host: str = "127.0.0.1"
    port: int = 7400  # 0: any free port
    streams: int = 2
    rate: int = 16000
    block_ms: float = 20.0
    seconds: float = 0.0  # 0: until Ctrl-C
    refresh: float = 0.5


@dataclass(slots=True)
class StreamRow:
    stream: str
    source: str
    chunks_per_s: float = 0.0
    latency_ms: float | None = None
    drops: int = 0
    rms_dbfs: float | None = None
    peak_dbfs: float | None = None
    since_sound_s: float | None = None
    vad_active: bool = False
    vad_segments: int = 0
    last_event: str = ""


class _EventTap:
    """Takes the processors' JSON event lines and keeps the latest per stream."""

    def __init__(self) -> None:
        self.last: dict[str, str] = {}
        self.count = 0

    def write(self, text: str) -> int:
        for line in text.splitlines():
            event = json.loads(line)
            self.count += 1
            self.last[event["stream"]] = (
                f"{event['event']} @{time.strftime('%H:%M:%S', time.localtime(event['time']))}"
            )
        return len(text)

    def flush(self) -> None:
        pass


def _value(
    registries: Iterable[CollectorRegistry], name: str, labels: dict[str, str]
) -> float | None:
    total: float | None = None
    for registry in registries:
        v = registry.get_sample_value(name, labels)
        if v is not None:
            total = (total or 0.0) + v
    return total


def _drops(registries: Iterable[CollectorRegistry], stream: str) -> int:
    total = 0.0
    for registry in registries:
        for metric in registry.collect():
            for s in metric.samples:
                if (
                    s.name == "audiosockets_chunks_dropped_total"
                    and s.labels.get("stream") == stream
                ):
                    total += s.value
    return int(total)


@dataclass(slots=True)
class _Previous:
    at: float
    received: dict[str, float] = field(default_factory=dict)
    latency: dict[str, tuple[float, float]] = field(default_factory=dict)


class Demo:
    """Owns the demo's components; ``rows()`` reads the table from their metrics."""

    def __init__(self, config: DemoConfig) -> None:
        self.config = config
        self.streams = [f"mic-{i + 1}" for i in range(config.streams)]
        self.sources = {s: SOURCES[i % len(SOURCES)] for i, s in enumerate(self.streams)}
        self.relay_metrics = Metrics()
        self.level_metrics = Metrics()
        self.vad_metrics = Metrics()
        self.recorder_metrics = {s: Metrics() for s in self.streams}
        self.events = _EventTap()
        self.url = ""
        self._prev = _Previous(time.monotonic())

    @property
    def registries(self) -> list[CollectorRegistry]:
        ms = [
            self.relay_metrics,
            self.level_metrics,
            self.vad_metrics,
            *self.recorder_metrics.values(),
        ]
        return [m.registry for m in ms]

    def rows(self) -> list[StreamRow]:
        now = time.monotonic()
        dt = max(1e-6, now - self._prev.at)
        level = [self.level_metrics.registry]
        vad = [self.vad_metrics.registry]
        rows = []
        for stream in self.streams:
            row = StreamRow(stream, self.sources[stream])
            received = (
                _value(level, "audiosockets_chunks_received_total", {"stream": stream}) or 0.0
            )
            row.chunks_per_s = (received - self._prev.received.get(stream, 0.0)) / dt
            self._prev.received[stream] = received
            lat_sum = (
                _value(level, "audiosockets_end_to_end_latency_seconds_sum", {"stream": stream})
                or 0.0
            )
            lat_n = (
                _value(level, "audiosockets_end_to_end_latency_seconds_count", {"stream": stream})
                or 0.0
            )
            prev_sum, prev_n = self._prev.latency.get(stream, (0.0, 0.0))
            if lat_n > prev_n:
                row.latency_ms = 1000 * (lat_sum - prev_sum) / (lat_n - prev_n)
            self._prev.latency[stream] = (lat_sum, lat_n)
            row.drops = _drops(self.registries, stream)
            labels = {"stream": stream, "channel": "0"}
            row.rms_dbfs = _value(level, "audiosockets_level_dbfs", {**labels, "measure": "rms"})
            row.peak_dbfs = _value(level, "audiosockets_level_dbfs", {**labels, "measure": "peak"})
            row.since_sound_s = _value(
                level, "audiosockets_seconds_since_sound", {"stream": stream}
            )
            row.vad_active = bool(_value(vad, "audiosockets_vad_active", {"stream": stream}))
            row.vad_segments = int(
                _value(vad, "audiosockets_vad_segments_total", {"stream": stream}) or 0
            )
            row.last_event = self.events.last.get(stream, "")
            rows.append(row)
        self._prev.at = now
        return rows


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(url: str, elapsed: float, rows: list[StreamRow]) -> str:
    head = (
        f"{'STREAM':<8} {'SOURCE':<17} {'CHUNKS/s':>8} {'LAT ms':>7} {'DROPS':>6} "
        f"{'RMS dBFS':>9} {'PEAK dBFS':>9} {'SILENT s':>8}  {'VAD':<6} {'SEGS':>4}  LAST VAD EVENT"
    )
    lines = [f"audiosockets demo: relay {url}, {elapsed:.1f} s, Ctrl-C to stop", "", head]
    for r in rows:
        lines.append(
            f"{r.stream:<8} {r.source:<17} {r.chunks_per_s:>8.1f} {_num(r.latency_ms, '.1f'):>7} "
            f"{r.drops:>6} {_num(r.rms_dbfs, '.1f'):>9} {_num(r.peak_dbfs, '.1f'):>9} "
            f"{_num(r.since_sound_s, '.1f'):>8}  {'voice' if r.vad_active else '-':<6} "
            f"{r.vad_segments:>4}  {r.last_event or '-'}"
        )
    return "\n".join(lines)


async def run_demo(
    config: DemoConfig,
    out: IO[str] | None = None,
    *,
    started: Callable[[Demo], None] | None = None,
) -> list[StreamRow]:
    """Run until Ctrl-C/SIGTERM or ``config.seconds``; returns the last table rows."""
    from .client import Subscriber
    from .recorder import Recorder, RecorderConfig
    from .relay import Relay, RelayConfig

    out = out if out is not None else sys.stdout
    tty = out.isatty()
    demo = Demo(config)
    relay = Relay(RelayConfig(host=config.host, port=config.port), metrics=demo.relay_metrics)
    await relay.start()
    demo.url = relay.url
    stop = asyncio.Event()
    runs: list[asyncio.Task[None]] = []
    procs: list[Processor] = []
    recorders: list[Any] = []
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(relay.stop)
        for spec, metrics in (("level", demo.level_metrics), ("vad", demo.vad_metrics)):
            proc = Processor(spec, metrics=metrics, events=demo.events, backlog_seconds=5.0)
            sub = Subscriber(relay.url, "*", name=f"demo-{spec}", start="earliest", metrics=metrics)
            await stack.enter_async_context(sub)
            procs.append(proc)
            runs.append(asyncio.create_task(proc.run(sub, signals=())))
        for stream in demo.streams:
            rec = Recorder(
                RecorderConfig(
                    relay=relay.url,
                    stream=stream,
                    source=demo.sources[stream],
                    rate=config.rate,
                    block_ms=config.block_ms,
                    name=f"demo-recorder-{stream}",
                ),
                metrics=demo.recorder_metrics[stream],
            )
            await rec.start()
            recorders.append(rec)
        if started is not None:
            started(demo)
        t0 = time.monotonic()
        rows: list[StreamRow] = []
        with signal_handlers(stop.set):
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(config.refresh):
                        await stop.wait()
                if any(t.done() for t in runs):
                    break  # a processor gave up: stop and let run() raise below
                elapsed = time.monotonic() - t0
                rows = demo.rows()
                table = format_table(demo.url, elapsed, rows)
                out.write(("\x1b[H\x1b[J" + table + "\n") if tty else table + "\n\n")
                out.flush()
                if config.seconds and elapsed >= config.seconds:
                    break
        for rec in recorders:
            await rec.stop()
        for proc in procs:
            proc.request_stop()
        await asyncio.gather(*runs)
    return rows
