"""The hostile-load harness: a live relay on loopback, a healthy stream beside
it, and the instruments the hostile tests assert with.

- ``relay_process(**config)``: a relay in its own process (``RelayConfig``
  fields as keyword arguments, ``limits`` as a dict of ``Limits`` fields), so
  its RSS is its own: ``RelayProcess.rss_bytes()`` reads ``VmRSS``;
  ``scrape()``/``sample()`` read its ``/metrics``; ``log_text()`` its log.
- ``healthy_stream(url)``: a 16 kHz mono int16 publisher (20 ms chunks, paced
  in real time, capture time = now) and a library subscriber on that stream,
  in their own process so the attack's load in the test process does not
  count against them. ``stop()`` returns a ``HealthyReport``: chunks sent,
  received, missing, duplicated, and per-chunk latency percentiles (capture to
  arrival at the subscriber, ms).
- ``raw_session(url, role)``: a raw client (``protocol.Connection``) past the
  handshake, for sending what no library client would; ``farewell()`` reads
  until the relay's ERROR/GOODBYE or the end of the connection.

Run as a script it is the child side of those two processes
(``python harness.py relay CONFIG_JSON`` / ``healthy URL STREAM``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import resource
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve()
MiB = 1 << 20
HEALTHY_STREAM = "healthy-0"
HEALTHY_RATE = 16000
HEALTHY_BLOCK = 320  # frames: 20 ms at 16 kHz


def _read_line(proc: subprocess.Popen[str], timeout: float, what: str) -> dict[str, Any]:
    """One JSON line from ``proc``'s stdout within ``timeout`` seconds."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
            if sel.select(left):
                line = proc.stdout.readline()
                if not line:
                    raise AssertionError(f"{what}: the process exited ({proc.wait()})")
                with contextlib.suppress(ValueError):
                    value = json.loads(line)
                    if isinstance(value, dict):
                        return value
    finally:
        sel.close()


# --------------------------------------------------------------------------
# The relay in its own process
# --------------------------------------------------------------------------


@dataclass
class RelayProcess:
    """A relay running in a child process; ``url`` is where clients reach it."""

    proc: subprocess.Popen[str]
    host: str
    port: int
    metrics_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def alive(self) -> bool:
        """The process runs and its metrics endpoint answers."""
        if self.proc.poll() is not None:
            return False
        try:
            self.scrape(timeout=10.0)
        except OSError:
            return False
        return True

    def rss_bytes(self) -> int:
        """The relay's resident set size (``VmRSS``), bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc status")

    def scrape(self, timeout: float = 10.0) -> str:
        """The relay's ``/metrics`` text."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return str(response.read().decode("utf-8"))

    def sample(self, name: str, text: str | None = None, **labels: str) -> float:
        """The value of sample ``name`` with exactly ``labels`` (0.0 when absent)."""
        return sample_value(self.scrape() if text is None else text, name, **labels)

    def total(self, name: str, text: str | None = None, **labels: str | None) -> float:
        """Sum of the samples ``name`` whose labels include ``labels``."""
        return sample_total(self.scrape() if text is None else text, name, **labels)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait (SIGKILL after ``timeout``); returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode


def sample_value(text: str, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels`` in Prometheus ``text`` (0.0 when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


def sample_total(text: str, name: str, **labels: str | None) -> float:
    """Sum of the samples ``name`` whose labels include ``labels`` (a None
    value: any value of that label)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(v is None or s.labels.get(k) == v for k, v in labels.items()):
                total += float(s.value)
    return total


async def wait_for(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Poll ``predicate`` (which may block briefly, e.g. a scrape) until true
    or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.1)


@contextlib.contextmanager
def relay_process(*, nofile: int | None = None, **config: Any) -> Iterator[RelayProcess]:
    """A relay in a child process on a free loopback port, stopped on exit.

    ``config``: ``RelayConfig`` fields (``limits`` as a dict of ``Limits``
    fields); ``host``/``port`` default to 127.0.0.1 and a free port.
    ``nofile``: the child's descriptor limit, soft and hard (``ulimit -n``), so
    the relay cannot raise it.
    """
    config = {"host": "127.0.0.1", "port": 0, **config}

    def limit_descriptors() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with tempfile.TemporaryDirectory(prefix="hostile-relay-") as tmp:
        log_path = Path(tmp) / "relay.log"
        with log_path.open("w") as log_file:
            proc = subprocess.Popen(
                [sys.executable, str(HERE), "relay", json.dumps(config)],
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
                preexec_fn=limit_descriptors if nofile is not None else None,
            )
        relay = None
        try:
            ready = _read_line(proc, 30.0, "the relay process to listen")
            relay = RelayProcess(
                proc, config["host"], int(ready["port"]), int(ready["metrics_port"]), log_path
            )
            yield relay
        finally:
            if relay is not None:
                relay.stop()
            elif proc.poll() is None:
                proc.kill()
                proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()


async def _run_relay(config: dict[str, Any]) -> None:
    import logging

    from audiosockets.metrics import Metrics, serve_metrics
    from audiosockets.protocol import Limits
    from audiosockets.relay import Relay, RelayConfig

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    limits = Limits(**config.pop("limits", {}))
    metrics = Metrics()
    relay = Relay(RelayConfig(**config, limits=limits), metrics=metrics)

    def ready(server: Relay) -> None:
        metrics_port = serve_metrics(0, metrics.registry, addr="127.0.0.1")
        assert server.address is not None
        print(json.dumps({"port": server.address.port, "metrics_port": metrics_port}), flush=True)

    await relay.run(ready=ready)


# --------------------------------------------------------------------------
# The healthy stream beside the attack
# --------------------------------------------------------------------------


@dataclass
class HealthyReport:
    """What the healthy stream saw: chunk counts and latency (ms, capture to arrival)."""

    sent: int
    received: int
    missing: list[int]
    duplicates: int
    out_of_order: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: list[str] = field(default_factory=list)

    def assert_lossless(self) -> None:
        """Every chunk sent arrived exactly once and in order."""
        assert self.sent > 0, "the healthy publisher sent nothing"
        assert not self.missing, f"healthy stream lost {len(self.missing)}: {self.missing[:10]}"
        assert self.received == self.sent, f"received {self.received} of {self.sent}"
        assert self.duplicates == 0, self
        assert self.out_of_order == 0, self


@dataclass
class HealthyStream:
    """The child process running the healthy publisher and subscriber."""

    proc: subprocess.Popen[str]

    def stop(self, timeout: float = 60.0) -> HealthyReport:
        """Stop publishing, wait for the subscriber to get the rest, report."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        report = _read_line(self.proc, timeout, "the healthy stream's report")
        self.proc.wait(timeout)
        return HealthyReport(**report)


@contextlib.contextmanager
def healthy_stream(url: str, stream: str = HEALTHY_STREAM) -> Iterator[HealthyStream]:
    """Start the healthy publisher + subscriber against ``url``; yields once
    both are connected and the first chunk went through."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE), "healthy", url, stream],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        _read_line(proc, 30.0, "the healthy stream to start")
        yield HealthyStream(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _run_healthy(url: str, stream_name: str) -> None:
    import numpy as np

    from audiosockets.audio import AudioFormat, SampleType
    from audiosockets.client import Publisher, RetryPolicy, Subscriber
    from audiosockets.metrics import Metrics

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    retry = RetryPolicy(initial=0.05, cap=0.5, jitter=0.05, connect_timeout=5.0)
    fmt = AudioFormat(HEALTHY_RATE, 1, SampleType.INT16)
    period = HEALTHY_BLOCK / HEALTHY_RATE
    seqs: list[int] = []
    latencies: list[float] = []
    errors: list[str] = []
    sub = Subscriber(url, stream_name, name="healthy-sub", retry=retry, metrics=Metrics())
    pub = Publisher(url, name="healthy-pub", retry=retry, metrics=Metrics())
    first = asyncio.Event()
    caught_up = asyncio.Event()
    sent = 0

    async def receive() -> None:
        async for chunk in sub:
            latencies.append((time.time_ns() - chunk.captured_ns) / 1e6)
            seqs.append(chunk.seq)
            first.set()
            if stop.is_set() and chunk.seq >= sent - 1:
                caught_up.set()

    await sub.start()
    await pub.start()
    receiver = asyncio.create_task(receive())
    stream = pub.stream(stream_name, fmt)
    start = time.monotonic()
    announced = False
    while not stop.is_set():
        stream.send(np.full(HEALTHY_BLOCK, sent % 30000, dtype=np.int16), time.time_ns())
        sent += 1
        if not announced and first.is_set():
            print(json.dumps({"ready": True}), flush=True)
            announced = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, start + sent * period - time.monotonic()))
    if seqs and seqs[-1] >= sent - 1:
        caught_up.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(caught_up.wait(), 30.0)
    receiver.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await receiver
    await pub.close(timeout=2.0)
    await sub.close()
    got = set(seqs)
    report = HealthyReport(
        sent=sent,
        received=len(got),
        missing=[s for s in range(sent) if s not in got][:1000],
        duplicates=len(seqs) - len(got),
        out_of_order=sum(1 for a, b in itertools.pairwise(seqs) if b <= a),
        p50_ms=_percentile(latencies, 0.50),
        p99_ms=_percentile(latencies, 0.99),
        max_ms=max(latencies, default=0.0),
        errors=errors,
    )
    print(json.dumps(report.__dict__), flush=True)


# --------------------------------------------------------------------------
# Raw clients: what no library client would send
# --------------------------------------------------------------------------


@dataclass
class RawSession:
    """A raw client past the handshake: send frames with ``conn.send`` or raw
    bytes with ``writer.write``; ``farewell()`` reads the relay's answer."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: Any  # audiosockets.protocol.Connection (imported lazily: script side)

    def send(self, event: Any) -> None:
        self.writer.write(self.conn.send(event))

    async def farewell(self, timeout: float = 30.0) -> tuple[int, str] | None:
        """Read until ERROR/GOODBYE (its ``(code, message)``) or the end of the
        connection (None); frames in between are skipped."""
        from audiosockets.protocol import EndOfStream, ErrorFrame, Goodbye, NeedData
        from audiosockets.protocol.connection import State

        async with asyncio.timeout(timeout):
            while True:
                if self.conn.state is State.ERROR:
                    return None
                event = self.conn.next_event()
                if isinstance(event, ErrorFrame | Goodbye):
                    return int(event.code), event.message
                if isinstance(event, NeedData):
                    try:
                        data = await self.reader.read(1 << 16)
                    except ConnectionError:
                        return None
                    if not data:
                        return None
                    self.conn.receive_data(data)
                elif isinstance(event, EndOfStream):
                    return None

    def close(self) -> None:
        self.writer.transport.abort()


async def raw_session(
    url: str, role: str = "publisher", name: str = "raw", *, timeout: float = 30.0
) -> RawSession:
    """Connect, HELLO as ``role``, wait for WELCOME."""
    from audiosockets.protocol import Connection, Hello, NeedData, Role, Welcome
    from audiosockets.urls import parse_url

    address = parse_url(url)
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(address.host, address.port)
        conn = Connection("client")
        writer.write(conn.send(Hello(Role[role.upper()], name, "")))
        while True:
            event = conn.next_event()
            if isinstance(event, Welcome):
                break
            if isinstance(event, NeedData):
                data = await reader.read(1 << 16)
                if not data:
                    raise ConnectionError("relay closed the connection during the handshake")
                conn.receive_data(data)
                continue
            raise ConnectionError(f"relay refused the session: {event!r}")
    return RawSession(reader, writer, conn)


def main(argv: list[str]) -> None:
    if argv[0] == "relay":
        asyncio.run(_run_relay(json.loads(argv[1])))
    elif argv[0] == "healthy":
        asyncio.run(_run_healthy(argv[1], argv[2]))
    else:
        raise SystemExit(f"usage: {Path(__file__).name} relay CONFIG_JSON | healthy URL STREAM")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main(sys.argv[1:])
