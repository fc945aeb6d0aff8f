"""One orchestrator for every system: loadtest's process layout with a relay to look at.

``run(system, cfg)`` does what ``audiosockets.loadtest.run_loadtest`` does (relay,
subscriber and publisher processes, the same pipe protocol, the same report), with the
children taken from ``system`` and two additions the benchmarks need: the relay's CPU
time is read from ``/proc`` between "go" and the last delivery, so start-up and
imports are not charged to it, and a ``Probe`` sees the relay's process id at each
stage (the stalled-subscriber and soak rows sample its RSS).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from typing import Any

from audiosockets import loadtest
from audiosockets.loadtest import LoadTestConfig, Report

from . import forwarder, wyoming_relay

ChildTarget = Callable[..., None]


#: Set (by ``--profile``) to a directory: the audiosockets relay runs under pyinstrument
#: and writes ``relay-<streams>x<subscribers>-<rate>.{txt,html}`` there.
PROFILE_ENV = "AUDIOSOCKETS_BENCH_PROFILE"


def audiosockets_relay(pipe: Pipe, cfg: LoadTestConfig) -> None:
    """loadtest's relay child, its window sized as ``run_loadtest`` sizes it."""
    replay = cfg.replay_seconds if cfg.rate == "realtime" else max(cfg.replay_seconds, 3600.0)
    where = os.environ.get(PROFILE_ENV)
    if not where:
        loadtest.relay_process(pipe, replay, cfg.queue_seconds)
        return
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005, async_mode="disabled")
    with profiler:
        loadtest.relay_process(pipe, replay, cfg.queue_seconds)
    stem = os.path.join(where, f"relay-{cfg.streams}x{cfg.subscribers}-{cfg.rate}")
    with open(f"{stem}.txt", "w") as f:
        f.write(profiler.output_text(show_all=False))
    profiler.write_html(f"{stem}.html")


@dataclass(frozen=True)
class System:
    """A relay and its clients: three child-process targets speaking loadtest's pipes."""

    key: str
    title: str
    relay: ChildTarget
    publisher: ChildTarget
    subscriber: ChildTarget


LIBRARY = System(
    "library",
    "audiosockets",
    audiosockets_relay,
    loadtest.publisher_process,
    loadtest.subscriber_process,
)
RAW = System(
    "raw",
    "audiosockets, raw readers",
    audiosockets_relay,
    loadtest.publisher_process,
    loadtest.raw_subscriber_process,
)
FORWARDER = System(
    "forwarder",
    "minimal forwarder",
    forwarder.relay_process,
    forwarder.publisher_process,
    forwarder.subscriber_process,
)
WYOMING = System(
    "wyoming",
    "wyoming (library)",
    wyoming_relay.relay_process,
    wyoming_relay.publisher_process,
    wyoming_relay.subscriber_process,
)
SYSTEMS = {s.key: s for s in (LIBRARY, RAW, FORWARDER, WYOMING)}


class Probe:
    """Called at each stage of a run with the relay's pid; the default does nothing."""

    def ready(self, pid: int, url: str) -> None:
        """Subscribers connected, publishers about to start."""

    def tick(self, pid: int, elapsed: float) -> None:
        """About once a second while the publishers publish."""

    def published(self, pid: int) -> None:
        """The publishers finished; subscribers are draining."""

    def done(self, pid: int) -> None:
        """Every subscriber reported; the relay is still up."""


_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux ``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def process_rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB (``VmRSS`` in ``/proc/<pid>/status``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _spawn(ctx: Any, target: ChildTarget, *args: Any) -> tuple[Any, Pipe]:
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    return proc, parent


@dataclass
class Run:
    report: Report
    relay_cpu_s: float  # between "go" and the subscribers' last report
    latency_ns: Any  # every sampled latency, in arrival order (numpy int64)
    publisher_cpu_s: float  # the publishers' process, over the same span
    subscriber_cpu_s: float  # the subscribers' process, over the same span


def run(system: System, cfg: LoadTestConfig, probe: Probe | None = None) -> Run:
    probe = probe or Probe()
    expect = loadtest._expect
    ctx = mp.get_context("spawn")
    procs = []
    try:
        relay, relay_pipe = _spawn(ctx, system.relay, cfg)
        procs.append(relay)
        url = f"tcp://127.0.0.1:{expect(relay_pipe, 'the relay')}"
        progress = ctx.Value("q", 0, lock=False)
        names = [f"load-sub-{i}" for i in range(cfg.subscribers)]
        sub, sub_pipe = _spawn(ctx, system.subscriber, url, cfg, names, progress)
        procs.append(sub)
        expect(sub_pipe, "the subscribers")
        pub, pub_pipe = _spawn(ctx, system.publisher, url, cfg)
        procs.append(pub)
        expect(pub_pipe, "the publishers", 60)
        probe.ready(relay.pid, url)
        cpu_at_go = [process_cpu_s(p.pid) for p in (relay, pub, sub)]
        started = time.monotonic()
        pub_pipe.send("go")
        while not pub_pipe.poll(1.0):
            probe.tick(relay.pid, time.monotonic() - started)
        pub_result = expect(pub_pipe, "the publishers")
        probe.published(relay.pid)
        sub_pipe.send(pub_result["last"])
        sub_result = expect(sub_pipe, "the subscribers", cfg.drain_seconds + 30)
        relay_cpu, pub_cpu, sub_cpu = (
            process_cpu_s(p.pid) - at_go
            for p, at_go in zip((relay, pub, sub), cpu_at_go, strict=True)
        )
        probe.done(relay.pid)
        pub_pipe.send("stop")
        relay_pipe.send("stop")
        relay_result = expect(relay_pipe, "the relay")
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
    report = loadtest._report(cfg, pub_result, [sub_result], relay_result)
    return Run(report, relay_cpu, sub_result["latency_ns"], pub_cpu, sub_cpu)
