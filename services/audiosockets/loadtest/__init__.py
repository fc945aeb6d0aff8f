"""``audiosockets loadtest``: synthetic publishers and subscribers against a relay.

Layout: the relay (unless ``--relay`` names one), the publishers and the
subscribers each run in their own OS process, so both cores work and the
relay's CPU time can be measured on its own. The parent process orchestrates
through pipes and shows progress; children report their figures back as
plain dicts.

What is measured is what a user relies on: every chunk a publisher sent is
either received by every subscriber that should get it (each fan-out
subscriber, or exactly one member of a group) or counted as lost;
duplicates and out-of-order deliveries are counted separately; latency is
capture timestamp to arrival at the subscriber process, wall clock.

Children never outlive the parent: each asks the kernel to kill it when the
parent dies (``children.die_with_parent``), and a SIGTERM of the parent kills
them before it exits (143).

Modules: this one (config, orchestration, report, gates) and ``children``
(the relay, publisher and subscriber processes).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import numpy as np

from ..errors import AudiosocketsError, ConfigError, GateFailed, Refused
from .children import (
    child_main,
    publisher_process,
    raw_subscriber_process,
    relay_process,
    subscriber_process,
)

RateName = Literal["realtime", "max"]
ClientName = Literal["library", "raw"]


@dataclass(frozen=True, slots=True)
class LoadTestConfig:
    streams: int = 10
    subscribers: int = 2
    group: str = ""
    duration: float = 10.0
    rate: RateName = "realtime"
    relay_url: str = ""
    sample_rate: int = 16000
    chunk_ms: float = 20.0
    subscriber_processes: int = 1
    drain_seconds: float = 10.0
    replay_seconds: float = 30.0
    queue_seconds: float = 2.0
    client: ClientName = "library"
    #: With ``relay_url``: the HELLO token, and the TLS files of a ``tls://`` relay
    #: (paths, not a context: the config travels to the child processes).
    token: str = ""
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def client_tls(self, url: str) -> ssl.SSLContext | None:
        """The clients' TLS context for ``url`` (None for ``tcp://``)."""
        from ..cli_security import client_tls

        return client_tls(url, self.tls_ca, self.tls_cert, self.tls_key)

    def __post_init__(self) -> None:
        if self.streams < 1 or self.subscribers < 1:
            raise ConfigError("--streams and --subscribers must be at least 1")
        if self.duration <= 0:
            raise ConfigError("--duration must be positive")
        if self.chunk_ms <= 0:
            raise ConfigError("--chunk-ms must be positive")

    @property
    def frames(self) -> int:
        return max(1, round(self.sample_rate * self.chunk_ms / 1000))


@dataclass
class Report:
    streams: int
    subscribers: int
    group: str | None
    rate: str
    duration_s: float
    chunks_sent: int
    chunks_expected: int
    chunks_received: int
    chunks_lost: int
    chunks_duplicated: int
    chunks_out_of_order: int
    loss_ratio: float
    latency_ms: dict[str, float]
    throughput_chunks_per_s: float
    throughput_bytes_per_s: float
    relay_cpu_s: float | None
    relay_drops: dict[str, float] = field(default_factory=dict)
    relay_chunks_sent: int | None = None
    relay_chunks_per_cpu_s: float | None = None
    relay_max_rss_mb: float | None = None
    machine: dict[str, Any] = field(default_factory=dict)
    # Where the chunks expected and not received are (``account``):
    # chunks_expected == chunks_received + chunks_unsent + chunks_in_flight
    # + sum(chunks_dropped.values()) + chunks_unaccounted.
    chunks_unsent: int = 0  # given to a publisher, never written to the relay
    chunks_in_flight: int | None = None  # held by the relay or in transit at the end
    chunks_in_relay: int | None = None  # of those: still held by the relay
    chunks_dropped: dict[str, int] = field(default_factory=dict)  # by reason, anywhere
    chunks_unaccounted: int | None = None  # 0 when every chunk is accounted for

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# --- parent -----------------------------------------------------------------


def _spawn(ctx: Any, target: Callable[..., None], *args: Any) -> tuple[Any, Pipe]:
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=child_main, args=(os.getpid(), target, child, *args), daemon=True)
    proc.start()
    return proc, parent


def _expect(pipe: Pipe, what: str, timeout: float = 30.0) -> Any:
    if not pipe.poll(timeout):
        raise ConfigError(f"load test: {what} did not answer within {timeout:g} s")
    try:
        msg = pipe.recv()
    except EOFError:
        raise AudiosocketsError(f"load test: {what} exited without an answer") from None
    if isinstance(msg, dict) and "error" in msg:
        raise (Refused if msg.get("refused") else ConfigError)(f"load test: {msg['error']}")
    return msg


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """Within: SIGTERM raises ``SystemExit(143)``, so ``run_loadtest`` kills its
    children on the way out instead of the process vanishing without a word to
    them. Only in the main thread (the only one Python delivers signals to)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_loadtest(cfg: LoadTestConfig, *, progress: Callable[[str], None] | None = None) -> Report:
    """Run the load test (see the module docstring); every child is gone when it returns
    or raises. SIGTERM of this process (main thread) kills the children, exit 143."""
    with _sigterm_exits():
        return _run_loadtest(cfg, progress)


def _run_loadtest(cfg: LoadTestConfig, progress: Callable[[str], None] | None) -> Report:
    ctx = mp.get_context("spawn")
    procs = []
    relay_pipe: Pipe | None = None
    finished = False
    try:
        if cfg.relay_url:
            url = cfg.relay_url
        else:
            # At --rate max, audio arrives far faster than real time, so a
            # window of N seconds of audio spans a fraction of a second of
            # wall time; size it to the run instead, so what is measured is
            # the relay's throughput and not the window.
            replay = (
                cfg.replay_seconds if cfg.rate == "realtime" else max(cfg.replay_seconds, 3600.0)
            )
            proc, relay_pipe = _spawn(ctx, relay_process, replay, cfg.queue_seconds)
            procs.append(proc)
            url = f"tcp://127.0.0.1:{_expect(relay_pipe, 'the relay')}"
        counter = ctx.Value("q", 0, lock=False)
        names = [f"load-sub-{i}" for i in range(cfg.subscribers)]
        n_sub_procs = max(1, min(cfg.subscriber_processes, cfg.subscribers))
        sub_pipes = []
        counters = []
        for k in range(n_sub_procs):
            c = ctx.Value("q", 0, lock=False) if k else counter
            counters.append(c)
            target = raw_subscriber_process if cfg.client == "raw" else subscriber_process
            proc, pipe = _spawn(ctx, target, url, cfg, names[k::n_sub_procs], c)
            procs.append(proc)
            sub_pipes.append(pipe)
        for pipe in sub_pipes:
            _expect(pipe, "the subscribers")
        pub_proc, pub_pipe = _spawn(ctx, publisher_process, url, cfg)
        procs.append(pub_proc)
        _expect(pub_pipe, "the publishers")
        pub_pipe.send("go")
        started = time.monotonic()
        while not pub_pipe.poll(1.0):
            if progress is not None:
                received = sum(c.value for c in counters)
                progress(f"{time.monotonic() - started:5.1f} s  received {received} chunks")
        pub_result = _expect(pub_pipe, "the publishers")
        for pipe in sub_pipes:
            pipe.send(pub_result["last"])
        sub_results = [_expect(p, "the subscribers", cfg.drain_seconds + 30) for p in sub_pipes]
        pub_pipe.send("stop")
        pub_proc.join(timeout=5)
        relay_result = None
        if relay_pipe is not None:
            relay_pipe.send("stop")
            relay_result = _expect(relay_pipe, "the relay")
        finished = True
    finally:
        # Done: each child is ending by itself. Failed or interrupted: kill at once.
        for proc in procs:
            if finished:
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join(timeout=5)
    return _report(cfg, pub_result, sub_results, relay_result)


def account(
    sent: int,
    fanout: int,
    received: int,
    pub: dict[str, Any],
    relay: dict[str, Any] | None,
) -> dict[str, Any]:
    """Where each expected chunk is: ``sent`` chunks were given to the
    publishers, each expected by ``fanout`` subscribers (1 for a group),
    ``received`` arrived. Returns ``chunks_unsent`` (still in the publishers'
    spools, times the fan-out), ``chunks_dropped`` by reason (the publishers'
    ``spool_full`` times the fan-out, the relay's own reasons as counted),
    ``chunks_in_relay`` (accepted by the relay, neither sent nor dropped),
    ``chunks_in_flight`` (that plus what the relay sent and no subscriber had
    received at the end) and ``chunks_unaccounted``: expected minus all of
    those, 0 when the books balance (None for each relay figure with an
    external relay, whose counters we do not read).
    """
    unsent = int(pub.get("unsent", 0)) * fanout
    dropped: dict[str, int] = {}
    if pub.get("spool_drops"):
        dropped["spool_full"] = int(pub["spool_drops"]) * fanout
    if relay is None:
        return {
            "chunks_unsent": unsent,
            "chunks_dropped": dropped,
            "chunks_in_relay": None,
            "chunks_in_flight": None,
            "chunks_unaccounted": None,
        }
    for reason, n in relay["drops"].items():
        dropped[reason] = dropped.get(reason, 0) + int(n)
    relay_drops = sum(int(n) for n in relay["drops"].values())
    in_relay = int(relay["received"]) * fanout - int(relay["sent"]) - relay_drops
    in_transit = int(relay["sent"]) - received
    in_flight = in_relay + in_transit
    expected = sent * fanout
    return {
        "chunks_unsent": unsent,
        "chunks_dropped": dropped,
        "chunks_in_relay": in_relay,
        "chunks_in_flight": in_flight,
        "chunks_unaccounted": expected - received - unsent - in_flight - sum(dropped.values()),
    }


def _report(
    cfg: LoadTestConfig,
    pub: dict[str, Any],
    subs: list[dict[str, Any]],
    relay: dict[str, Any] | None,
) -> Report:
    sent = int(pub["sent"])
    per_sub = [s for r in subs for s in r["subs"]]
    received = sum(s["received"] for s in per_sub)
    expected = sent if cfg.group else sent * cfg.subscribers
    duplicates = sum(s["duplicates"] for s in per_sub)
    out_of_order = sum(int(r["out_of_order"]) for r in subs)
    lost = max(0, expected - received)
    lat = np.concatenate([r["latency_ns"] for r in subs]) / 1e6 if subs else np.empty(0)
    if lat.size:
        p50, p95, p99 = (float(x) for x in np.percentile(lat, [50, 95, 99]))
        latency = {
            "p50": round(p50, 3),
            "p95": round(p95, 3),
            "p99": round(p99, 3),
            "max": round(float(lat.max()), 3),
            "mean": round(float(lat.mean()), 3),
        }
    else:
        latency = {
            "p50": float("nan"),
            "p95": float("nan"),
            "p99": float("nan"),
            "max": float("nan"),
        }
    elapsed = float(pub["elapsed"])
    # Throughput over the time chunks were actually flowing: from the first
    # send to the last receipt (delivery can outlast publishing).
    last_rx = max((int(r.get("last_rx_ns", 0)) for r in subs), default=0)
    flowing = max(elapsed, (last_rx - int(pub["started_ns"])) / 1e9) if last_rx else elapsed
    return Report(
        streams=cfg.streams,
        subscribers=cfg.subscribers,
        group=cfg.group or None,
        rate=cfg.rate,
        duration_s=round(elapsed, 3),
        chunks_sent=sent,
        chunks_expected=expected,
        chunks_received=received,
        chunks_lost=lost,
        chunks_duplicated=duplicates,
        chunks_out_of_order=out_of_order,
        loss_ratio=lost / expected if expected else 0.0,
        latency_ms=latency,
        throughput_chunks_per_s=round(received / flowing, 1) if flowing else 0.0,
        throughput_bytes_per_s=round(received * pub["bytes_per_chunk"] / flowing, 1)
        if flowing
        else 0.0,
        relay_cpu_s=round(relay["cpu_s"], 3) if relay else None,
        relay_drops=relay["drops"] if relay else {},
        relay_chunks_sent=int(relay["sent"]) if relay else None,
        relay_max_rss_mb=round(relay["max_rss_mb"], 1) if relay else None,
        relay_chunks_per_cpu_s=round(relay["sent"] / relay["cpu_s"])
        if relay and relay["cpu_s"]
        else None,
        machine={
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": sys.platform,
        },
        **account(sent, 1 if cfg.group else cfg.subscribers, received, pub, relay),
    )


def check_gates(report: Report, max_loss: float | None, max_p99_ms: float | None) -> None:
    problems = []
    if max_loss is not None and report.loss_ratio > max_loss:
        problems.append(f"loss {report.loss_ratio:.4%} above --max-loss {max_loss:.4%}")
    if max_p99_ms is not None and not report.latency_ms["p99"] <= max_p99_ms:
        problems.append(
            f"p99 latency {report.latency_ms['p99']} ms above --max-p99-ms {max_p99_ms}"
        )
    if problems:
        raise GateFailed("load test gate failed: " + "; ".join(problems))


def _known(n: int | None) -> str:
    return "? (external relay)" if n is None else str(n)


def format_report(r: Report) -> str:
    lat = r.latency_ms
    mode = f"group {r.group}" if r.group else "fan-out"
    return "\n".join(
        [
            f"load test: {r.streams} streams -> {r.subscribers} subscribers ({mode}), rate {r.rate}, "
            f"{r.duration_s} s",
            f"  chunks sent      {r.chunks_sent}",
            f"  chunks expected  {r.chunks_expected}",
            f"  chunks received  {r.chunks_received}",
            f"  lost             {r.chunks_lost} ({r.loss_ratio:.4%}): unsent in publishers "
            f"{r.chunks_unsent}, in flight at the end {_known(r.chunks_in_flight)} "
            f"(held by the relay {_known(r.chunks_in_relay)}), dropped "
            f"{sum(r.chunks_dropped.values())}{' ' + str(r.chunks_dropped) if r.chunks_dropped else ''}"
            f", unaccounted "
            f"{_known(r.chunks_unaccounted)}",
            f"  duplicated       {r.chunks_duplicated}",
            f"  out of order     {r.chunks_out_of_order}",
            f"  latency ms       p50 {lat['p50']}  p95 {lat['p95']}  p99 {lat['p99']}  max {lat['max']}",
            f"  throughput       {r.throughput_chunks_per_s} chunks/s, {r.throughput_bytes_per_s / 1e6:.2f} MB/s",
            f"  relay CPU        {r.relay_cpu_s} s"
            if r.relay_cpu_s is not None
            else "  relay CPU        (external relay)",
            f"  relay drops      {r.relay_drops or 'none'}",
            f"  relay memory     {r.relay_max_rss_mb} MB peak RSS",
            f"  relay efficiency {r.relay_chunks_per_cpu_s} chunks delivered per CPU second"
            if r.relay_chunks_per_cpu_s
            else "  relay efficiency (external relay)",
        ]
    )
