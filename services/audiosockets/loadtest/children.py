"""The load test's child processes: relay, publishers, subscribers (library and raw).

Each runs in its own spawned OS process (looked up by module path), talks to the
parent through a pipe and reports its figures back as a plain dict. Each starts
through ``child_main``, which ties its life to the parent's (``die_with_parent``).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection as Pipe
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .. import loops
from ..errors import AudiosocketsError, Refused
from ..orphans import die_with_parent

if TYPE_CHECKING:
    from . import LoadTestConfig

T = TypeVar("T")


def child_main(parent_pid: int, target: Callable[..., None], *args: Any) -> None:
    """A child's entry point: ``die_with_parent(parent_pid)``, then ``target(*args)``."""
    die_with_parent(parent_pid)
    target(*args)


def _run(coro: Coroutine[Any, Any, T], pipe: Pipe) -> T | None:
    """Run a child's ``main``; a refusal or other error of ours goes to the parent as
    one sentence (``{"error", "refused"}``) instead of a traceback."""
    try:
        return loops.run(coro, "auto")
    except AudiosocketsError as err:
        pipe.send({"error": str(err), "refused": isinstance(err, Refused)})
        return None


# --- child: relay -----------------------------------------------------------


def relay_process(pipe: Pipe, replay_seconds: float, queue_seconds: float) -> None:
    from ..relay import Relay, RelayConfig

    async def main() -> None:
        relay = Relay(
            RelayConfig(
                host="127.0.0.1",
                port=0,
                replay_seconds=replay_seconds,
                queue_seconds=queue_seconds,
                # Every client of a load test comes from loopback, in any
                # number: only the descriptor limit caps sessions here.
                max_streams=1 << 20,
                max_sessions=1 << 20,
                max_sessions_per_address=1 << 20,
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
        sent = received = 0.0
        for metric in relay.metrics.chunks_sent.collect():
            sent += sum(s.value for s in metric.samples if s.name.endswith("_total"))
        for metric in relay.metrics.chunks_received.collect():
            received += sum(s.value for s in metric.samples if s.name.endswith("_total"))
        pipe.send(
            {
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "drops": drops,
                "sent": sent,
                "received": received,
                "max_rss_mb": usage.ru_maxrss / 1024,  # Linux reports KiB
            }
        )

    _run(main(), pipe)


# --- child: publishers ------------------------------------------------------


#: At ``--rate max``, the chunks a publisher may have queued before it waits for its socket.
MAX_RATE_UNSENT = 256


def publisher_process(pipe: Pipe, url: str, cfg: LoadTestConfig) -> None:
    from ..audio import AudioFormat, SampleType
    from ..connect import connect_publisher

    async def main() -> None:
        fmt = AudioFormat(cfg.sample_rate, 1, SampleType.INT16)
        history = max(cfg.replay_seconds, 2 * cfg.duration) + 10
        pubs = [
            connect_publisher(
                url,
                name=f"load-pub-{i}",
                history_seconds=history,
                token=cfg.token,
                tls=cfg.client_tls(url),
            )
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
                # As fast as the relay takes it: wait for the socket, not a clock,
                # and only when it is backed up. Flushing every 8 chunks capped
                # the rate at 8 chunks per turn of the writer, below the relay's.
                if any(s.unsent >= MAX_RATE_UNSENT for s in streams):
                    await asyncio.gather(*(p.flush(5) for p in pubs))
                else:
                    await asyncio.sleep(0)  # a turn for the writers
        elapsed = time.monotonic() - start
        await asyncio.gather(*(p.flush(10) for p in pubs))
        spool_drops = sum(s.dropped for s in streams)
        unsent = sum(s.unsent for s in streams)  # accepted by send(), never written
        last = {s.name: s.next_seq - 1 for s in streams}
        pipe.send(
            {
                "sent": sent,
                "elapsed": elapsed,
                "started_ns": started_ns,
                "last": last,
                "spool_drops": spool_drops,
                "unsent": unsent,
                "bytes_per_chunk": cfg.frames * 2,
            }
        )
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # "stop"
        await asyncio.gather(*(p.close(1) for p in pubs))

    _run(main(), pipe)


# --- child: subscribers -----------------------------------------------------


def subscriber_process(
    pipe: Pipe, url: str, cfg: LoadTestConfig, names: list[str], progress: Any
) -> None:
    from ..connect import connect_subscriber

    async def main() -> None:
        subs = [
            connect_subscriber(
                url,
                "load-*",
                group=cfg.group,
                name=n,
                start="earliest",
                queue_chunks=1024,
                token=cfg.token,
                tls=cfg.client_tls(url),
            )
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
        # Once the final positions are known: the streams each subscriber (fan-out)
        # or the group (one set) still lacks, emptied chunk by chunk, so checking
        # completion costs O(1) per chunk, not a scan of every stream.
        unfinished: list[set[str]] = []
        last_rx = [0]

        async def consume(i: int, sub: Any) -> None:
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
                if unfinished:
                    lacking = unfinished[0 if cfg.group else i]
                    if chunk.stream in lacking and chunk.seq >= final[chunk.stream]:
                        lacking.discard(chunk.stream)
                        if not any(unfinished):
                            done.set()

        def _track_completion() -> None:
            if cfg.group:
                # Only the streams the relay gave to this process's members.
                merged: dict[str, int] = {}
                for d in seen:
                    for k, v in d.items():
                        merged[k] = max(merged.get(k, -1), v)
                mine = set().union(*(s.assigned for s in subs))
                unfinished.append({k for k in mine if k in final and merged.get(k, -1) < final[k]})
            else:
                for d in seen:
                    unfinished.append({k for k, v in final.items() if d.get(k, -1) < v})
            if not any(unfinished):
                done.set()

        tasks = [asyncio.create_task(consume(i, s)) for i, s in enumerate(subs)]
        pipe.send("ready")
        loop = asyncio.get_running_loop()
        final.update(await loop.run_in_executor(None, pipe.recv))  # last seq per stream
        _track_completion()
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

    _run(main(), pipe)


def raw_subscriber_process(
    pipe: Pipe, url: str, cfg: LoadTestConfig, names: list[str], progress: Any
) -> None:
    """Subscribers that parse only frame headers: measures the relay, not us.

    The handshake goes through the sans-I/O ``Connection``; after that each
    CHUNK costs one header unpack. Latency is sampled on every 8th chunk.
    """
    from ..errors import RelayRefused
    from ..protocol import (
        CHUNK_HEAD,
        HEADER,
        Connection,
        ErrorFrame,
        FrameType,
        Hello,
        Limits,
        OpenStream,
        Role,
        StartPosition,
        Subscribe,
        decode_payload,
    )
    from ..urls import parse_url

    address = parse_url(url)
    chunk_type = int(FrameType.CHUNK)
    open_type = int(FrameType.OPEN_STREAM)

    async def one(
        name: str, stats: dict[str, Any], ready: asyncio.Event, stop: asyncio.Event
    ) -> None:
        tls = cfg.client_tls(url)
        reader, writer = await asyncio.open_connection(
            address.host, address.port, ssl=tls, server_hostname=address.host if tls else None
        )
        conn = Connection("client")
        writer.write(conn.send(Hello(Role.SUBSCRIBER, name, cfg.token)))
        try:
            while conn.welcome is None:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("relay closed during the handshake")
                conn.receive_data(data)
                event = conn.next_event()
                if isinstance(event, ErrorFrame):
                    raise RelayRefused(f"relay {url} refused the session: {event.message}")
        finally:
            ready.set()  # main() then finds this task failed instead of waiting
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
        # Every failure is retrieved (no "exception never retrieved" traceback); the
        # first is the answer.
        failures = [t.exception() for t in tasks if t.done() and not t.cancelled()]
        for failure in failures:
            if failure is not None:
                raise failure
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

    _run(main(), pipe)
