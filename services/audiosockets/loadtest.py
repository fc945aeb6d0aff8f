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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection as Pipe
from typing import Any, Literal, TypeVar

import numpy as np

from . import loops
from .errors import ConfigError, GateFailed

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

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return loops.run(coro, "auto")


# --- child: relay -----------------------------------------------------------


def relay_process(pipe: Pipe, replay_seconds: float, queue_seconds: float) -> None:
    from .relay import Relay, RelayConfig

    async def main() -> None:
        relay = Relay(
            RelayConfig(
                host="127.0.0.1", port=0, replay_seconds=replay_seconds, queue_seconds=queue_seconds
            )
        )
        await relay.start()
        assert relay.address is not None
        pipe.send(relay.address.port)
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # "stop"
        drops: dict[str, float] = {}
        for metric in relay.metrics.chunks_dropped.collect():
            for s in metric.samples:
                if s.name.endswith("_total") and s.value:
                    drops[s.labels["reason"]] = drops.get(s.labels["reason"], 0) + s.value
        await relay.stop()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        sent = 0.0
        for metric in relay.metrics.chunks_sent.collect():
            sent += sum(s.value for s in metric.samples if s.name.endswith("_total"))
        pipe.send(
            {
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "drops": drops,
                "sent": sent,
                "max_rss_mb": usage.ru_maxrss / 1024,  # Linux reports KiB
            }
        )

    _run(main())


# --- child: publishers ------------------------------------------------------


def publisher_process(pipe: Pipe, url: str, cfg: LoadTestConfig) -> None:
    from .audio import AudioFormat, SampleType
    from .client import Publisher

    async def main() -> None:
        fmt = AudioFormat(cfg.sample_rate, 1, SampleType.INT16)
        history = max(cfg.replay_seconds, 2 * cfg.duration) + 10
        pubs = [
            Publisher(url, name=f"load-pub-{i}", history_seconds=history)
            for i in range(cfg.streams)
        ]
        streams = [p.stream(f"load-{i:04d}", fmt) for i, p in enumerate(pubs)]
        for p in pubs:
            await p.start()
        for p in pubs:
            if not await p.wait_connected(10):
                pipe.send({"error": f"publisher could not connect to {url}: {p.last_error}"})
                return
        pipe.send("ready")
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # "go"
        block = np.zeros(cfg.frames, dtype=np.int16)
        period = cfg.frames / cfg.sample_rate
        start = time.monotonic()
        started_ns = time.time_ns()
        sent = 0
        tick = 0
        while time.monotonic() - start < cfg.duration:
            captured = time.time_ns()
            for s in streams:
                s.send(block, captured)
            sent += len(streams)
            tick += 1
            if cfg.rate == "realtime":
                delay = start + tick * period - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif tick % 8 == 0:
                # As fast as the relay takes it: wait for the socket, not a clock.
                await asyncio.gather(*(p.flush(5) for p in pubs))
        elapsed = time.monotonic() - start
        await asyncio.gather(*(p.flush(10) for p in pubs))
        spool_drops = sum(s.dropped for s in streams)
        last = {s.name: s.next_seq - 1 for s in streams}
        pipe.send(
            {
                "sent": sent,
                "elapsed": elapsed,
                "started_ns": started_ns,
                "last": last,
                "spool_drops": spool_drops,
                "bytes_per_chunk": cfg.frames * 2,
            }
        )
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # "stop"
        await asyncio.gather(*(p.close(1) for p in pubs))

    _run(main())


# --- child: subscribers -----------------------------------------------------


def subscriber_process(
    pipe: Pipe, url: str, cfg: LoadTestConfig, names: list[str], progress: Any
) -> None:
    from .client import Subscriber

    async def main() -> None:
        subs = [
            Subscriber(url, "load-*", group=cfg.group, name=n, start="earliest", queue_chunks=1024)
            for n in names
        ]
        for s in subs:
            await s.start()
        for s in subs:
            if not await s.wait_connected(10):
                pipe.send({"error": f"subscriber could not connect to {url}: {s.last_error}"})
                return
        latencies: list[np.ndarray[Any, Any]] = []
        buf = np.empty(65536, dtype=np.int64)
        fill = 0
        seen: list[dict[str, int]] = [{} for _ in subs]
        counts = [0] * len(subs)
        out_of_order = 0
        done = asyncio.Event()
        final: dict[str, int] = {}
        last_rx = [0]

        async def consume(i: int, sub: Subscriber) -> None:
            nonlocal fill, buf, out_of_order
            last = seen[i]
            async for chunk in sub:
                now = time.time_ns()
                last_rx[0] = now
                if fill == len(buf):
                    latencies.append(buf)
                    buf = np.empty(65536, dtype=np.int64)
                    fill = 0
                buf[fill] = now - chunk.captured_ns
                fill += 1
                prev = last.get(chunk.stream, -1)
                if chunk.seq < prev:
                    out_of_order += 1
                last[chunk.stream] = max(prev, chunk.seq)
                counts[i] += 1
                if counts[i] % 256 == 0:
                    progress.value = sum(counts)
                if final and _complete(i):
                    done.set()

        def _complete(i: int) -> bool:
            if cfg.group:
                # Only the streams the relay gave to this process's members.
                merged: dict[str, int] = {}
                for d in seen:
                    for k, v in d.items():
                        merged[k] = max(merged.get(k, -1), v)
                mine = set().union(*(s.assigned for s in subs))
                return all(merged.get(k, -1) >= final[k] for k in mine if k in final)
            return all(all(d.get(k, -1) >= v for k, v in final.items()) for d in seen)

        tasks = [asyncio.create_task(consume(i, s)) for i, s in enumerate(subs)]
        pipe.send("ready")
        loop = asyncio.get_running_loop()
        final.update(await loop.run_in_executor(None, pipe.recv))  # last seq per stream
        if _complete(0):
            done.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(cfg.drain_seconds):
                await done.wait()
        for t in tasks:
            t.cancel()
        progress.value = sum(counts)
        latencies.append(buf[:fill])
        per_sub = [
            {"received": counts[i], "duplicates": s.duplicates, "gaps": s.gaps}
            for i, s in enumerate(subs)
        ]
        lat = np.concatenate(latencies) if latencies else np.empty(0, dtype=np.int64)
        pipe.send(
            {
                "subs": per_sub,
                "out_of_order": out_of_order,
                "latency_ns": lat,
                "last_rx_ns": last_rx[0],
            }
        )
        for s in subs:
            await s.close()

    _run(main())


def raw_subscriber_process(
    pipe: Pipe, url: str, cfg: LoadTestConfig, names: list[str], progress: Any
) -> None:
    """Subscribers that parse only frame headers: measures the relay, not us.

    The handshake goes through the sans-I/O ``Connection``; after that each
    CHUNK costs one header unpack. Latency is sampled on every 8th chunk.
    """
    from .protocol import (
        CHUNK_HEAD,
        HEADER,
        Connection,
        FrameType,
        Hello,
        Limits,
        OpenStream,
        Role,
        StartPosition,
        Subscribe,
        decode_payload,
    )
    from .urls import parse_url

    address = parse_url(url)
    chunk_type = int(FrameType.CHUNK)
    open_type = int(FrameType.OPEN_STREAM)

    async def one(
        name: str, stats: dict[str, Any], ready: asyncio.Event, stop: asyncio.Event
    ) -> None:
        reader, writer = await asyncio.open_connection(address.host, address.port)
        conn = Connection("client")
        writer.write(conn.send(Hello(Role.SUBSCRIBER, name)))
        while conn.welcome is None:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("relay closed during the handshake")
            conn.receive_data(data)
            conn.next_event()
        group = cfg.group
        writer.write(conn.send(Subscribe("load-*", group, StartPosition.EARLIEST)))
        ready.set()
        names_by_id: dict[int, str] = {}
        last: dict[str, int] = stats["last"]
        buf = bytearray()
        limits = Limits()
        while not stop.is_set():
            data = await reader.read(1 << 20)
            if not data:
                break
            stats["last_rx"] = time.time_ns()
            buf += data
            off = 0
            end = len(buf)
            while end - off >= HEADER.size:
                _magic, _v, ftype, length = HEADER.unpack_from(buf, off)
                if end - off < HEADER.size + length:
                    break
                body = off + HEADER.size
                if ftype == chunk_type:
                    sid, seq, captured = CHUNK_HEAD.unpack_from(buf, body)
                    stream = names_by_id[sid]
                    prev = last.get(stream, -1)
                    if seq <= prev:
                        stats["dup_or_ooo"] += 1
                    else:
                        stats["gaps"] += seq - prev - 1 if prev >= 0 else 0
                        last[stream] = seq
                    stats["received"] += 1
                    if stats["received"] % 8 == 0:
                        stats["latency"].append(time.time_ns() - captured)
                elif ftype == open_type:
                    event = decode_payload(
                        FrameType.OPEN_STREAM, bytes(buf[body : body + length]), limits
                    )
                    assert isinstance(event, OpenStream)
                    names_by_id[event.stream_id] = event.name
                off = body + length
            del buf[:off]
        writer.close()

    async def main() -> None:
        stats: list[dict[str, Any]] = [
            {"received": 0, "dup_or_ooo": 0, "gaps": 0, "last": {}, "latency": [], "last_rx": 0}
            for _ in names
        ]
        stop = asyncio.Event()
        readies = [asyncio.Event() for _ in names]
        tasks = [
            asyncio.create_task(one(n, st, r, stop))
            for n, st, r in zip(names, stats, readies, strict=True)
        ]
        await asyncio.gather(*(r.wait() for r in readies))
        pipe.send("ready")
        loop = asyncio.get_running_loop()
        final: dict[str, int] = await loop.run_in_executor(None, pipe.recv)
        deadline = time.monotonic() + cfg.drain_seconds

        def complete() -> bool:
            if cfg.group:
                merged: dict[str, int] = {}
                for st in stats:
                    for k, v in st["last"].items():
                        merged[k] = max(merged.get(k, -1), v)
                return all(merged.get(k, -1) >= v for k, v in final.items())
            return all(all(st["last"].get(k, -1) >= v for k, v in final.items()) for st in stats)

        while not complete() and time.monotonic() < deadline:
            progress.value = sum(st["received"] for st in stats)
            await asyncio.sleep(0.05)
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        progress.value = sum(st["received"] for st in stats)
        lat = np.array([x for st in stats for x in st["latency"]], dtype=np.int64)
        per_sub = [
            {"received": st["received"], "duplicates": st["dup_or_ooo"], "gaps": st["gaps"]}
            for st in stats
        ]
        last_rx = max(st["last_rx"] for st in stats)
        pipe.send({"subs": per_sub, "out_of_order": 0, "latency_ns": lat, "last_rx_ns": last_rx})

    _run(main())


# --- parent -----------------------------------------------------------------


def _spawn(ctx: Any, target: Callable[..., None], *args: Any) -> tuple[Any, Pipe]:
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    return proc, parent


def _expect(pipe: Pipe, what: str, timeout: float = 30.0) -> Any:
    if not pipe.poll(timeout):
        raise ConfigError(f"load test: {what} did not answer within {timeout:g} s")
    msg = pipe.recv()
    if isinstance(msg, dict) and "error" in msg:
        raise ConfigError(f"load test: {msg['error']}")
    return msg


def run_loadtest(cfg: LoadTestConfig, *, progress: Callable[[str], None] | None = None) -> Report:
    ctx = mp.get_context("spawn")
    procs = []
    relay_pipe: Pipe | None = None
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
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
    return _report(cfg, pub_result, sub_results, relay_result)


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
            f"  lost             {r.chunks_lost} ({r.loss_ratio:.4%})",
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
