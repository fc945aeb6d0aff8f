"""The rows of the table: each runs every system it concerns, one after another.

A row returns, per system, the figures (for the JSON) and one cell of text (for the
table). ``Durations`` holds the only numbers that differ between ``--quick`` and the
full run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from audiosockets.loadtest import LoadTestConfig

from . import harness
from .harness import FORWARDER, LIBRARY, RAW, WYOMING, Probe, System, process_rss_mb
from .stall import stalled_subscriber


@dataclass(frozen=True)
class Durations:
    fanout: float = 10.0
    latency: float = 30.0
    scale_step: float = 60.0
    scale_counts: tuple[int, ...] = (100, 250, 500, 750, 1000)
    large: float = 10.0
    one_subscriber: float = 10.0
    stall: float = 60.0
    soak: float = 300.0
    soak_streams: int = 100


# At max rate a subscriber that fell behind has chunks the relay dropped (and
# counted): the run never completes, so the drain after publishing is kept short.
MAX_DRAIN = 3.0

FULL = Durations()
QUICK = Durations(
    fanout=3.0,
    latency=5.0,
    scale_step=8.0,
    scale_counts=(100, 250, 500, 1000),
    large=3.0,
    one_subscriber=3.0,
    stall=10.0,
    soak=20.0,
)


@dataclass
class Row:
    name: str
    cells: dict[str, str] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)


def _say(text: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {text}", flush=True)


def _figures(run: harness.Run) -> dict[str, Any]:
    r = run.report
    return {
        "chunks_sent": r.chunks_sent,
        "chunks_expected": r.chunks_expected,
        "chunks_received": r.chunks_received,
        "loss_ratio": r.loss_ratio,
        "relay_drops": r.relay_drops,
        "deliveries_per_s": r.throughput_chunks_per_s,
        "bytes_per_s": r.throughput_bytes_per_s,
        "latency_ms": r.latency_ms,
        "relay_cpu_s": round(run.relay_cpu_s, 3),
        "relay_cpu_us_per_delivery": round(1e6 * run.relay_cpu_s / r.chunks_received, 2)
        if r.chunks_received
        else None,
        "relay_cpu_us_per_chunk_in": round(1e6 * run.relay_cpu_s / r.chunks_sent, 2)
        if r.chunks_sent
        else None,
        "relay_max_rss_mb": r.relay_max_rss_mb,
        "publisher_cpu_s": round(run.publisher_cpu_s, 3),
        "subscriber_cpu_s": round(run.subscriber_cpu_s, 3),
    }


def _run(system: System, cfg: LoadTestConfig, probe: Probe | None = None) -> harness.Run:
    _say(
        f"{system.title}: {cfg.streams} streams -> {cfg.subscribers} subscribers"
        f"{' (group)' if cfg.group else ''}, {cfg.rate}, {cfg.duration:g} s"
    )
    return harness.run(system, cfg, probe)


def _loss(f: dict[str, Any]) -> str:
    return f", {f['loss_ratio']:.1%} lost" if f["loss_ratio"] else ""


def fanout(d: Durations, subscribers: int) -> Row:
    row = Row(f"fan-out 1 → {subscribers}, max rate: deliveries/s, relay CPU per delivery")
    cfg = LoadTestConfig(
        streams=1, subscribers=subscribers, duration=d.fanout, rate="max", drain_seconds=MAX_DRAIN
    )
    for system in (LIBRARY, RAW, FORWARDER, WYOMING):
        f = _figures(_run(system, cfg))
        row.figures[system.key] = f
    ref = row.figures[FORWARDER.key]["deliveries_per_s"] or 1
    for key, f in row.figures.items():
        row.cells[key] = (
            f"{f['deliveries_per_s']:,.0f}/s ({f['deliveries_per_s'] / ref:.2f}x), "
            f"{f['relay_cpu_us_per_delivery']} µs{_loss(f)}"
        )
    return row


def latency(d: Durations) -> Row:
    row = Row("realtime 1 → 16: latency p50 / p99 / max (ms)")
    cfg = LoadTestConfig(streams=1, subscribers=16, duration=d.latency, rate="realtime")
    for system in (LIBRARY, RAW, FORWARDER, WYOMING):
        f = _figures(_run(system, cfg))
        row.figures[system.key] = f
        lat = f["latency_ms"]
        row.cells[system.key] = f"{lat['p50']:.2f} / {lat['p99']:.2f} / {lat['max']:.1f}{_loss(f)}"
    return row


def streams_scale(d: Durations) -> Row:
    row = Row(
        "streams scale (16 kHz mono 20 ms, group of 2): most streams with 0 loss and p99 ≤ 50 ms"
    )
    for system in (LIBRARY, FORWARDER, WYOMING):
        steps: list[dict[str, Any]] = []
        held = 0
        for count in d.scale_counts:
            cfg = LoadTestConfig(
                streams=count,
                subscribers=2,
                group="g",
                duration=d.scale_step,
                rate="realtime",
                drain_seconds=5.0,
            )
            f = _figures(_run(system, cfg))
            f["streams"] = count
            steps.append(f)
            if f["loss_ratio"] or not f["latency_ms"]["p99"] <= 50:
                break
            held = count
        row.figures[system.key] = {"held": held, "steps": steps}
        last = steps[-1]
        ingest = last["relay_cpu_us_per_chunk_in"]
        text = f"{held} held; at {last['streams']}: p99 {last['latency_ms']['p99']:.0f} ms"
        text += f"{_loss(last)}, relay {ingest} µs CPU per chunk in"
        row.cells[system.key] = text
    return row


def large_chunks(d: Durations) -> Row:
    row = Row("large chunks (48 kHz stereo float32, 100 ms = 38 400 B) 1 → 4, max rate: bytes/s")
    # loadtest's publishers send int16 mono: 192 000 Hz x 100 ms x 2 B is the same 38 400 B.
    cfg = LoadTestConfig(
        streams=1,
        subscribers=4,
        duration=d.large,
        rate="max",
        sample_rate=192000,
        chunk_ms=100,
        drain_seconds=MAX_DRAIN,
    )
    for system in (LIBRARY, RAW, FORWARDER, WYOMING):
        f = _figures(_run(system, cfg))
        row.figures[system.key] = f
        row.cells[system.key] = f"{f['bytes_per_s'] / 1e6:,.0f} MB/s{_loss(f)}"
    return row


def one_subscriber(d: Durations) -> Row:
    row = Row("one subscriber, 1 stream, max rate: chunks/s")
    cfg = LoadTestConfig(
        streams=1, subscribers=1, duration=d.one_subscriber, rate="max", drain_seconds=MAX_DRAIN
    )
    for system in (LIBRARY, RAW, FORWARDER, WYOMING):
        f = _figures(_run(system, cfg))
        row.figures[system.key] = f
        row.cells[system.key] = f"{f['deliveries_per_s']:,.0f}/s{_loss(f)}"
    return row


class _RssProbe(Probe):
    """The relay's RSS when audio starts, its peak while it flows, and at the end."""

    def __init__(self) -> None:
        self.rss: dict[str, float] = {}

    def ready(self, pid: int, url: str) -> None:
        self.rss["before"] = process_rss_mb(pid)

    def tick(self, pid: int, elapsed: float) -> None:
        self.rss["during"] = max(self.rss.get("during", 0.0), process_rss_mb(pid))

    def published(self, pid: int) -> None:
        self.tick(pid, 0.0)

    def done(self, pid: int) -> None:
        self.rss["after"] = process_rss_mb(pid)


class _StallProbe(_RssProbe):
    """Also opens the stalled subscriber when audio starts, and closes it at the end."""

    def __init__(self, system: str) -> None:
        super().__init__()
        self.system = system
        self.sock: Any = None

    def ready(self, pid: int, url: str) -> None:
        super().ready(pid, url)
        self.sock = stalled_subscriber(self.system, url)

    def published(self, pid: int) -> None:
        super().published(pid)
        self.sock.close()


def stalled(d: Durations) -> Row:
    row = Row(
        "stalled subscriber beside 10 realtime streams: relay RSS before / during / after"
        " (audiosockets: and during without the stalled one)"
    )
    cfg = LoadTestConfig(
        streams=10, subscribers=1, duration=d.stall, rate="realtime", drain_seconds=5.0
    )
    # The replay window fills whether or not anyone stalls: a control run without the
    # stalled subscriber says how much of the growth is the stalled subscriber's.
    control = _RssProbe()
    _run(LIBRARY, cfg, control)
    for system in (LIBRARY, FORWARDER, WYOMING):
        probe = _StallProbe(system.key)
        f = _figures(_run(system, cfg, probe))
        f["relay_rss_mb"] = {k: round(v, 1) for k, v in probe.rss.items()}
        row.figures[system.key] = f
        rss = probe.rss
        healthy = f", healthy subscriber lost {f['loss_ratio']:.1%}" if f["loss_ratio"] else ""
        row.cells[system.key] = (
            f"{rss['before']:.0f} / {rss['during']:.0f} / {rss['after']:.0f} MB{healthy}"
        )
    lib = row.figures[LIBRARY.key]
    lib["relay_rss_mb"]["during_without_stall"] = round(control.rss["during"], 1)
    row.cells[LIBRARY.key] += f" (without: {control.rss['during']:.0f} MB)"
    return row


class _SoakProbe(Probe):
    def __init__(self) -> None:
        self.rss: list[tuple[float, float]] = []

    def tick(self, pid: int, elapsed: float) -> None:
        if not self.rss or elapsed - self.rss[-1][0] >= 10:
            self.rss.append((round(elapsed, 1), round(process_rss_mb(pid), 1)))


def soak(d: Durations) -> Row:
    """``soak_streams`` realtime streams to a group of 2 for ``d.soak`` seconds; the RSS
    every 10 s and the p99 of each tenth of the run (arrivals are in time order)."""
    row = Row(
        f"soak: {d.soak_streams} realtime streams, group of 2, {d.soak:g} s:"
        " RSS first → last, p99 per tenth min → max"
    )
    cfg = LoadTestConfig(
        streams=d.soak_streams,
        subscribers=2,
        group="g",
        duration=d.soak,
        rate="realtime",
        drain_seconds=5.0,
    )
    probe = _SoakProbe()
    run = _run(LIBRARY, cfg, probe)
    f = _figures(run)
    slices = [s for s in np.array_split(run.latency_ns / 1e6, 10) if s.size]
    p99s = [round(float(np.percentile(s, 99)), 2) for s in slices]
    f["relay_rss_mb_every_10s"] = probe.rss
    f["p99_ms_per_tenth"] = p99s
    row.figures[LIBRARY.key] = f
    first, last = probe.rss[0][1], probe.rss[-1][1]
    row.cells[LIBRARY.key] = (
        f"RSS {first:.0f} → {last:.0f} MB; p99 {min(p99s):.1f} → {max(p99s):.1f} ms{_loss(f)}"
    )
    return row


ROWS = {
    "fanout": lambda d: [fanout(d, n) for n in (1, 4, 16, 64)],
    "latency": lambda d: [latency(d)],
    "scale": lambda d: [streams_scale(d)],
    "large": lambda d: [large_chunks(d)],
    "one": lambda d: [one_subscriber(d)],
    "stall": lambda d: [stalled(d)],
    "soak": lambda d: [soak(d)],
}
