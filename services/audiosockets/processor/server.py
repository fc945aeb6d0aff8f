"""The processor service: receive loop, backlog, runners and the ``serve`` entry point."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterable, Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Final, Protocol, runtime_checkable

from ..audio import Chunk
from ..errors import ConfigError, HandlerError
from ..handlers import HandlerOptions
from ..lograte import LogRateLimit
from ..metrics import Metrics
from ..names import fit_name
from ..service import STOP_SIGNALS, run_service
from ..tasks import cancel_and_wait
from ..urls import check_url
from .backlog import ChunkBacklog, CompletionOrder, StreamClosed, make_room
from .failures import FailureTracker
from .loading import HandlerSpec, _one_line, check_handler, parse_spec
from .metrics import ProcessorMetrics
from .runners import HandlerPool, Outcome

if TYPE_CHECKING:
    from ..client import StartName

log = logging.getLogger("audiosockets.processor")

#: Seconds between two logged handler errors (the rest are counted, then summarised).
LOG_INTERVAL: Final = 10.0

# --- the processor --------------------------------------------------------------


class EventSink(Protocol):
    """Where event lines go: stdout, a file, or anything with ``write``/``flush``."""

    def write(self, text: str, /) -> int:
        """Write ``text`` (whole JSON lines, each ending in a newline); returns characters written."""

    def flush(self) -> None:
        """Push what was written to its destination (events are flushed after every batch)."""


@runtime_checkable
class GroupShare(Protocol):
    """A source that knows which streams a consumer group assigned to it (a group
    ``Subscriber``); ``audiosockets_assigned_streams`` reports their number."""

    @property
    def assigned(self) -> AbstractSet[str]:
        """Names of the streams currently assigned to this member."""


@dataclass(slots=True)
class ProcessorStats:
    """Counts kept on the event loop, for tests and the demo's table."""

    received: int = 0
    processed: int = 0
    errors: int = 0
    dropped: int = 0
    last_latency: float | None = None
    worker_cpu: dict[int, float] = field(default_factory=dict)
    streams: set[str] = field(default_factory=set)


class Processor:
    """Runs one handler over chunks from any async iterable (normally a ``Subscriber``)."""

    def __init__(
        self,
        handler: str | HandlerSpec,
        *,
        options: HandlerOptions | None = None,
        workers: int = 0,
        backlog_seconds: float | None = 10.0,
        backlog_chunks: int | None = None,
        metrics: Metrics | None = None,
        events: EventSink | None = None,
        failing_after: int = 10,
        exit_after: int = 100,
        drain_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        source: AsyncIterable[Chunk] | None = None,
        checked: bool = False,
    ) -> None:
        self.spec = handler if isinstance(handler, HandlerSpec) else parse_spec(handler)
        self.options = options or HandlerOptions()
        if workers < 0:
            raise ConfigError("--workers must be >= 0")
        if workers > 1 and self.spec.stateful:
            raise ConfigError(
                f"handler {self.spec.name} keeps state across chunks; use --workers 0 or 1"
            )
        if failing_after < 1 or exit_after < 0:
            raise ConfigError("failing_after must be >= 1 and exit_after >= 0")
        self.workers = workers
        try:
            self.backlog = ChunkBacklog(backlog_chunks, backlog_seconds)
        except ValueError as exc:
            raise ConfigError(f"backlog: {exc}") from exc
        self.metrics = metrics if metrics is not None else Metrics()
        self.pm = ProcessorMetrics.of(self.metrics)
        self.events: EventSink = events if events is not None else sys.stdout
        self.failing_after = failing_after
        self.exit_after = exit_after
        self.drain_timeout = drain_timeout
        self.stats = ProcessorStats()
        self._errlog = LogRateLimit(LOG_INTERVAL, clock)
        gauge = self.pm.handler_failing.labels(self.spec.name)
        self._failures = FailureTracker(self.spec.name, failing_after, exit_after, clock, gauge.set)
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()  # the handler took a chunk off the backlog
        self._closing = False
        self._fatal: HandlerError | None = None
        self.pool = HandlerPool(self.spec, self.options, workers, checked=checked)
        #: What ``start()`` receives from when it is given no chunks (normally a Subscriber).
        self.source: AsyncIterable[Chunk] | None = source
        self._receiver: asyncio.Task[None] | None = None
        self._consumers: list[asyncio.Task[None]] = []
        self._serving = False
        self._done = asyncio.Event()
        #: Called with (stream, seq) once every chunk up to seq is finished (the group ACK).
        self.on_done: Callable[[str, int], None] | None = None
        self._completion = CompletionOrder()
        name = self.spec.name
        self.pm.handler_errors.labels(name)
        self.pm.handler_failing.labels(name).set(0)
        self.pm.assigned_streams.labels(name).set(0)
        self.pm.processing_time.labels(name)

    # -- lifecycle (audiosockets.service.Service) --

    async def start(self, chunks: AsyncIterable[Chunk] | None = None) -> None:
        """Load the handler (thread or workers) and start receiving ``chunks``.

        ``chunks`` defaults to the ``source`` given at construction. Raises
        ``HandlerError`` (nothing left running) if the handler cannot be loaded.
        """
        source = chunks if chunks is not None else self.source
        if source is None:
            raise TypeError("Processor.start() needs chunks, or source= at construction")
        if self._receiver is not None:
            raise RuntimeError("Processor.start() called twice")
        self.source = source
        await self.pool.start()
        self._consumers = [
            asyncio.create_task(self._consume(i), name=f"processor-consume-{i}")
            for i in range(max(1, self.workers))
        ]
        self._receiver = asyncio.create_task(self._receive(source), name="processor-receive")

    async def serve_forever(self) -> None:
        """Process until the source ends (all of it) or ``stop()`` (``drain_timeout``).

        Then the backlog is drained, what is left counted as dropped
        (``reason="processor_overrun"``), the handler torn down and the runners
        shut down. Raises what the source raised, or ``HandlerError`` after
        ``exit_after`` failures in a row.
        """
        receiver = self._receiver
        if receiver is None:
            raise RuntimeError("Processor.start() first")
        if self._done.is_set():
            return
        self._serving = True
        stopper = asyncio.create_task(self._stop.wait())
        # The source ending by itself (a file, a test) means "process all of it";
        # stop(), a give-up or a cancellation gives the backlog drain_timeout.
        drain_timeout: float | None = self.drain_timeout
        try:
            await asyncio.wait({receiver, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if receiver.done() and not self._stop.is_set():
                drain_timeout = None
        finally:
            stopper.cancel()
            received_error = await self._shutdown(receiver, drain_timeout)
        if isinstance(received_error, Exception):
            raise received_error
        if self._fatal is not None:
            raise self._fatal

    def request_stop(self) -> None:
        """Ask ``serve_forever`` to stop receiving and drain (safe from a signal handler)."""
        self._stop.set()

    async def stop(self) -> None:
        """Stop receiving; returns once the backlog was processed for up to
        ``drain_timeout`` s and the handler was torn down. Safe to call twice."""
        self._stop.set()
        if self._receiver is None:
            return
        if not self._serving:
            await self.serve_forever()  # started but never served: drain here
        await self._done.wait()

    async def run(
        self,
        chunks: AsyncIterable[Chunk] | None = None,
        *,
        ready: Callable[[Processor], object] | None = None,
        signals: Iterable[signal.Signals] = STOP_SIGNALS,
    ) -> None:
        """``start``, ``serve_forever``, ``stop`` with SIGINT/SIGTERM/SIGHUP handling
        (``run_service``); raises ``HandlerError`` on give-up."""
        if chunks is not None:
            self.source = chunks
        await run_service(self, ready=ready, signals=signals)

    def stream_closed(self, stream: str) -> None:
        """The relay closed ``stream`` for us (publisher gone, moved to another group
        member): once its queued chunks are handled, its handler instance is torn
        down (``vad`` closes an open segment, ``archive`` completes its file). A new
        instance is set up if the stream comes back."""
        self.backlog.mark_closed(stream)
        self._wake.set()

    async def _shutdown(
        self, receiver: asyncio.Task[None], drain_timeout: float | None
    ) -> BaseException | None:
        """Stop receiving, drain the backlog, tear down; returns the receiver's error."""
        received_error: BaseException | None = None
        try:
            await cancel_and_wait(receiver)
        except Exception as exc:  # the source's error, raised by serve_forever
            received_error = exc
        self._closing = True
        self._wake.set()
        try:
            _done, pending = await asyncio.wait(self._consumers, timeout=drain_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._consumers, return_exceptions=True)
            left = 0
            while (item := self.backlog.pop()) is not None:
                if isinstance(item, Chunk):  # StreamClosed: teardown follows anyway
                    self._drop([item], finish=False)
                    left += 1
            if left:
                log.warning("%s: %d chunk(s) not processed before shutdown", self.spec.name, left)
            for result in await self.pool.close(self.drain_timeout):
                self._apply_teardown(result, "teardown")
            await self.pool.shutdown(self.drain_timeout)
        finally:
            self._done.set()
        return received_error

    def _apply_teardown(self, result: Outcome | BaseException, what: str) -> None:
        if isinstance(result, BaseException):
            log.warning("%s: %s failed: %s", self.spec.name, what, _one_line(result))
            return
        self.pm.apply(result.ops)
        self._write_events(result.events)
        if result.error:
            self.pm.handler_errors.labels(self.spec.name).inc()
            self.stats.errors += 1
            log.error("%s: %s", self.spec.name, result.error)

    # -- receiving --

    async def _receive(self, chunks: AsyncIterable[Chunk]) -> None:
        async for chunk in chunks:
            self._accept(chunk)
            if self.backlog.over_limit:  # backpressure: the relay keeps the audio
                await make_room(self.backlog, self._room, self._drop)

    def _accept(self, chunk: Chunk) -> None:
        stats = self.stats
        stats.received += 1
        if chunk.stream not in stats.streams:
            stats.streams.add(chunk.stream)
            self.metrics.declare_stream(chunk.stream)
            self.pm.chunks_processed.labels(chunk.stream, self.spec.name)
            self.pm.assigned_streams.labels(self.spec.name).set(len(stats.streams))
        if isinstance(self.source, GroupShare):  # a group Subscriber knows its share
            self.pm.assigned_streams.labels(self.spec.name).set(len(self.source.assigned))
        self._completion.received(chunk.stream, chunk.seq)
        self._drop(self.backlog.push(chunk))
        self.metrics.queue_depth.labels(chunk.stream).set(self.backlog.depth[chunk.stream])
        self._wake.set()

    def _drop(self, chunks: Iterable[Chunk], *, finish: bool = True) -> None:
        """Count ``chunks`` as dropped (``processor_overrun``); ``finish`` moves the ACK on."""
        for chunk in chunks:
            self.stats.dropped += 1
            self.metrics.chunks_dropped.labels(chunk.stream, "processor_overrun").inc()
            depth = self.backlog.depth.get(chunk.stream, 0)
            self.metrics.queue_depth.labels(chunk.stream).set(depth)
            if finish:
                self._finish(chunk)

    # -- handling --

    async def _consume(self, index: int) -> None:
        while True:
            if self._fatal is not None:
                return
            chunk = self.backlog.pop()
            self._room.set()
            if chunk is None:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if isinstance(chunk, StreamClosed):
                await self._release(chunk.stream)
                continue
            self.metrics.queue_depth.labels(chunk.stream).set(self.backlog.depth[chunk.stream])
            outcome = await self.pool.process(index, chunk)
            self._apply(chunk, outcome)
            self._finish(chunk)

    def _finish(self, chunk: Chunk) -> None:
        """``chunk`` is handled (or dropped and counted): advance ``on_done``."""
        last = self._completion.finish(chunk.stream, chunk.seq)
        if last is not None and self.on_done is not None:
            self.on_done(chunk.stream, last)

    async def _release(self, stream: str) -> None:
        self._failures.forget(stream)
        for result in await self.pool.release(stream):
            self._apply_teardown(result, f"releasing {stream}")

    def _apply(self, chunk: Chunk, out: Outcome) -> None:
        pm, name, stats = self.pm, self.spec.name, self.stats
        pm.apply(out.ops)
        self._write_events(out.events)
        if out.pid:
            stats.worker_cpu[out.pid] = out.cpu_seconds
        if out.started_ns:
            latency = (out.started_ns - chunk.captured_ns) / 1e9
            stats.last_latency = latency
            pm.handler_start_latency.labels(chunk.stream, name).observe(max(0.0, latency))
            pm.processing_time.labels(name).observe(out.duration)
        stream = chunk.stream
        if out.error is None:
            stats.processed += 1
            pm.chunks_processed.labels(stream, name).inc()
            self._failures.succeeded(stream)
            return
        stats.errors += 1
        in_a_row = self._failures.failed(stream)  # per stream: see failures.py
        pm.handler_errors.labels(name).inc()
        now, more = self._errlog.allow("handler_error")
        if now:
            note = f" ({more} more since the last report)" if more else ""
            log.error("%s failed on %s seq %d: %s%s", name, stream, chunk.seq, out.error, note)
            if out.trace:
                log.debug("%s", out.trace)
        if self._fatal is None:  # every active stream failing: the handler is broken
            self._fatal = self._failures.give_up(in_a_row, out.error)
            if self._fatal is not None:
                self._stop.set()

    def _write_events(self, lines: list[str]) -> None:
        if not lines:
            return
        try:
            self.events.write("".join(line + "\n" for line in lines))
            self.events.flush()
        except (OSError, ValueError) as exc:  # a closed pipe must not kill the analysis
            log.warning("cannot write events: %s", exc)


# --- the service entry point ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcessorConfig:
    """Everything ``audiosockets process`` needs; built by the CLI."""

    handler: str
    relay: str = "tcp://127.0.0.1:7400"
    stream: str = "*"
    group: str | None = None
    name: str | None = None
    workers: int = 0
    metrics_port: int = 9402
    metrics_host: str = "127.0.0.1"  # --metrics-host (0.0.0.0 in the images)
    metrics_tls: ssl.SSLContext | None = None  # HTTPS for /metrics
    backlog_seconds: float = 10.0
    events: str | None = None  # path; None means stdout
    segment_seconds: float = 60.0
    max_open_segments: int = 256
    exit_after: int = 100
    start: StartName = "live"
    token: str | None = None
    tls: ssl.SSLContext | None = None  # for a tls:// relay (tls.client_context); None: defaults

    def validate(self) -> None:
        """Check the fields a flag sets; ``ConfigError`` naming the flag.

        The handler spec is not checked here: ``serve`` loads it (once), and a bad
        one is a ``HandlerError``.
        """
        check_url(self.relay)
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port must be 0..65535, got {self.metrics_port}")
        if not self.backlog_seconds > 0:
            raise ConfigError(f"--backlog-seconds must be positive, got {self.backlog_seconds:g}")
        if not self.segment_seconds > 0:
            raise ConfigError(f"--segment-seconds must be positive, got {self.segment_seconds:g}")
        if self.max_open_segments < 1:
            raise ConfigError(f"--max-open-segments must be >= 1, got {self.max_open_segments}")
        if self.exit_after < 0:
            raise ConfigError(f"--max-failures must be >= 0, got {self.exit_after}")
        if not self.stream:
            raise ConfigError("--stream must not be empty (a stream name or pattern: 'mic-*')")
        from ..client import check_wire_names

        check_wire_names(  # every name this processor sends: the relay would refuse it
            {
                "--stream": self.stream,
                "--group": self.group or "",
                "--name": self.name or "",
                "--token": self.token or "",
            }
        )


def default_client_name(handler: str) -> str:
    """``process-HANDLER@HOSTNAME``, the client name of a processor without
    ``--name``; a long handler path is shortened from its start so the name
    fits the protocol's 200 bytes (``names.fit_name``)."""
    return fit_name("process-", handler, f"@{socket.gethostname()}")


async def serve(
    config: ProcessorConfig,
    *,
    metrics: Metrics | None = None,
    started: Callable[[Processor], None] | None = None,
) -> None:
    """Run a processor against a relay until SIGINT/SIGTERM/SIGHUP (or handler give-up).

    ``started`` is called with the ``Processor`` before it connects (its
    ``request_stop()`` ends the run like a signal; tests use that). Raises
    ``HandlerError`` for a bad spec (before connecting) or on give-up,
    ``ConfigError`` for an events file that cannot be opened, ``AddressInUse``
    for a taken metrics port.
    """
    from ..client import check_wire_names
    from ..connect import connect_subscriber
    from ..health import Health, session_ready
    from ..metrics import serve_metrics

    config.validate()
    spec = parse_spec(config.handler)
    options = HandlerOptions(
        segment_seconds=config.segment_seconds, max_open_segments=config.max_open_segments
    )
    check_handler(spec, options)  # a bad spec fails here, before any connection; only here
    # Replicas need names of their own to be told apart in status and metrics.
    name = config.name or default_client_name(spec.name)
    check_wire_names({"the client name (set --name)": name})
    metrics = metrics if metrics is not None else Metrics()
    with contextlib.ExitStack() as stack:
        events: IO[str] = sys.stdout
        if config.events:
            try:
                events = stack.enter_context(_open_events(config.events))
            except OSError as exc:
                raise ConfigError(f"--events {config.events}: {exc.strerror or exc}") from exc
        processor = Processor(
            spec,
            options=options,
            workers=config.workers,
            backlog_seconds=config.backlog_seconds,
            metrics=metrics,
            events=events,
            exit_after=config.exit_after,
            checked=True,
        )
        if config.metrics_port > 0:
            health = Health.watch_running_loop(session_ready(metrics.registry, "subscriber"))
            serve_metrics(
                config.metrics_port,
                metrics.registry,
                config.metrics_host,
                health=health,
                tls=config.metrics_tls,
            )  # AddressInUse
        sub = connect_subscriber(
            config.relay,
            config.stream,
            group=config.group or "",
            name=name,
            start=config.start,
            token=config.token or "",
            tls=config.tls,
            metrics=metrics,
            on_stream_closed=processor.stream_closed,
            manual_ack=True,
        )
        processor.on_done = sub.ack
        if started is not None:
            started(processor)
        async with sub:
            await processor.run(sub)


def _open_events(path: str) -> IO[str]:
    return open(path, "a", encoding="utf-8", buffering=1)
