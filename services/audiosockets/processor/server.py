"""The processor service: receive loop, backlog, runners and the ``serve`` entry point."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import AsyncIterable, Awaitable, Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import IO, Any, Final, Literal, Protocol

from ..audio import Chunk
from ..errors import ConfigError, HandlerError
from ..handlers import HandlerOptions
from ..metrics import Metrics
from .backlog import ChunkBacklog, StreamClosed
from .loading import HandlerSpec, _one_line, check_handler, parse_spec
from .metrics import ProcessorMetrics
from .runners import (
    HandlerRunner,
    HandlerThread,
    Outcome,
    _worker_close,
    _worker_init,
    _worker_process,
    _worker_release,
)

log = logging.getLogger("audiosockets.processor")

#: Seconds between two logged handler errors (the rest are counted, then summarised).
LOG_INTERVAL: Final = 10.0

# --- the processor --------------------------------------------------------------


class EventSink(Protocol):
    """Where event lines go: stdout, a file, or anything with ``write``/``flush``."""

    def write(self, text: str, /) -> int: ...

    def flush(self) -> None: ...


class _RateLimitedLog:
    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self.interval = interval
        self.clock = clock
        self._last: float | None = None
        self.suppressed = 0

    def ready(self) -> bool:
        now = self.clock()
        if self._last is None or now - self._last >= self.interval:
            self._last = now
            return True
        self.suppressed += 1
        return False


@dataclass(slots=True)
class ProcessorStats:
    """Counts kept on the event loop, for tests and the demo's table."""

    received: int = 0
    processed: int = 0
    errors: int = 0
    dropped: int = 0
    consecutive_errors: int = 0
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
        self._errlog = _RateLimitedLog(LOG_INTERVAL, clock)
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._closing = False
        self._fatal: HandlerError | None = None
        self._runner: HandlerRunner | None = None
        self._executors: list[Executor] = []
        self._source: object = None
        # Completion order per stream: chunks finish out of order with several
        # workers, but "done up to seq N" (on_done, the group ACK) may only
        # move past a chunk once it and everything before it is finished.
        self.on_done: Callable[[str, int], None] | None = None
        self._pending: dict[str, collections.deque[int]] = {}
        self._finished: dict[str, set[int]] = {}
        name = self.spec.name
        self.pm.handler_errors.labels(name)
        self.pm.handler_failing.labels(name).set(0)
        self.pm.assigned_streams.labels(name).set(0)
        self.pm.processing_time.labels(name)

    # -- lifecycle --

    def stop(self) -> None:
        """Stop receiving; the backlog is still processed for up to ``drain_timeout`` s."""
        self._stop.set()

    def stream_closed(self, stream: str) -> None:
        """The relay closed ``stream`` for us (publisher gone, moved to another group
        member): once its queued chunks are handled, its handler instance is torn
        down (``vad`` closes an open segment, ``archive`` completes its file). A new
        instance is set up if the stream comes back."""
        self.backlog.mark_closed(stream)
        self._wake.set()

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.workers == 0:
            pool = HandlerThread(f"handler-{self.spec.name}")
            self._executors = [pool]
            self._runner = await loop.run_in_executor(pool, HandlerRunner, self.spec, self.options)
        else:
            self._executors = [self._new_pool() for _ in range(self.workers)]
            # Fail fast: a worker that cannot load the handler breaks its pool here.
            await asyncio.gather(*(loop.run_in_executor(p, os.getpid) for p in self._executors))

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(self.spec, self.options),
        )

    async def run(self, chunks: AsyncIterable[Chunk]) -> None:
        """Process ``chunks`` until they end or ``stop()``; raises ``HandlerError`` on give-up."""
        try:
            await self._start()
        except HandlerError:
            await self._shutdown_executors()
            raise
        except BrokenProcessPool as exc:
            await self._shutdown_executors()
            raise HandlerError(f"handler {self.spec.name}: worker process failed to start") from exc
        consumers = [asyncio.create_task(self._consume(i)) for i in range(max(1, self.workers))]
        receiver = asyncio.create_task(self._receive(chunks))
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
            receiver.cancel()
            received_error: BaseException | None = None
            with contextlib.suppress(asyncio.CancelledError):
                received_error = (await asyncio.gather(receiver, return_exceptions=True))[0]
            self._closing = True
            self._wake.set()
            _done, pending = await asyncio.wait(consumers, timeout=drain_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*consumers, return_exceptions=True)
            left = 0
            while (item := self.backlog.pop()) is not None:
                if isinstance(item, Chunk):  # StreamClosed: teardown follows anyway
                    self._count_drop(item)
                    left += 1
            if left:
                log.warning("%s: %d chunk(s) not processed before shutdown", self.spec.name, left)
            await self._close_runners()
            await self._shutdown_executors()
        if isinstance(received_error, Exception) and not isinstance(
            received_error, asyncio.CancelledError
        ):
            raise received_error
        if self._fatal is not None:
            raise self._fatal

    async def _close_runners(self) -> None:
        loop = asyncio.get_running_loop()
        closers: list[Awaitable[Outcome]] = []
        if self._runner is not None:
            closers.append(loop.run_in_executor(self._executors[0], self._runner.close))
        elif self.workers:
            closers.extend(loop.run_in_executor(p, _worker_close) for p in self._executors)
        if not closers:
            return
        tasks = [asyncio.ensure_future(c) for c in closers]
        _done, pending = await asyncio.wait(tasks, timeout=self.drain_timeout)
        for task in pending:
            task.cancel()
            log.warning(
                "%s: teardown did not finish within %g s", self.spec.name, self.drain_timeout
            )
        for task in tasks:
            if task.cancelled():
                continue
            result = task.exception() or task.result()
            if isinstance(result, BaseException):
                log.warning("%s: teardown failed: %s", self.spec.name, _one_line(result))
                continue
            self.pm.apply(result.ops)
            self._write_events(result.events)
            if result.error:
                self.pm.handler_errors.labels(self.spec.name).inc()
                self.stats.errors += 1
                log.error("%s: %s", self.spec.name, result.error)

    async def _shutdown_executors(self) -> None:
        """Stop the handler thread/workers without waiting on a hung handler forever."""
        pools, self._executors = self._executors, []
        processes: list[Any] = []
        for pool in pools:
            # Private, but the only handle on a worker stuck in user code: we must be
            # able to terminate it, or the interpreter would wait for it at exit.
            processes.extend((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + self.drain_timeout
        for proc in processes:
            await asyncio.to_thread(proc.join, max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("%s: worker %d did not stop; terminating it", self.spec.name, proc.pid)
                proc.terminate()
                await asyncio.to_thread(proc.join, 5.0)

    # -- receiving --

    async def _receive(self, chunks: AsyncIterable[Chunk]) -> None:
        self._source = chunks
        async for chunk in chunks:
            self._accept(chunk)

    def _accept(self, chunk: Chunk) -> None:
        stats = self.stats
        stats.received += 1
        if chunk.stream not in stats.streams:
            stats.streams.add(chunk.stream)
            self.metrics.declare_stream(chunk.stream)
            self.pm.chunks_processed.labels(chunk.stream, self.spec.name)
            self.pm.assigned_streams.labels(self.spec.name).set(len(stats.streams))
        assigned = getattr(self._source, "assigned", None)
        if isinstance(assigned, set | frozenset):  # a group Subscriber knows its share
            self.pm.assigned_streams.labels(self.spec.name).set(len(assigned))
        self._pending.setdefault(chunk.stream, collections.deque()).append(chunk.seq)
        for old in self.backlog.push(chunk):
            self._count_drop(old)
            self._finish(old)
        self.metrics.queue_depth.labels(chunk.stream).set(self.backlog.depth[chunk.stream])
        self._wake.set()

    def _count_drop(self, chunk: Chunk) -> None:
        self.stats.dropped += 1
        self.metrics.chunks_dropped.labels(chunk.stream, "processor_overrun").inc()
        self.metrics.queue_depth.labels(chunk.stream).set(self.backlog.depth.get(chunk.stream, 0))

    # -- handling --

    async def _consume(self, index: int) -> None:
        while True:
            if self._fatal is not None:
                return
            chunk = self.backlog.pop()
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
            outcome = await self._execute(index, chunk)
            self._apply(chunk, outcome)
            self._finish(chunk)

    def _finish(self, chunk: Chunk) -> None:
        """``chunk`` is handled (or dropped and counted): advance ``on_done``."""
        pending = self._pending.get(chunk.stream)
        if pending is None:
            return
        finished = self._finished.setdefault(chunk.stream, set())
        finished.add(chunk.seq)
        last = None
        while pending and pending[0] in finished:
            last = pending.popleft()
            finished.discard(last)
        if last is not None and self.on_done is not None:
            self.on_done(chunk.stream, last)

    async def _release(self, stream: str) -> None:
        loop = asyncio.get_running_loop()
        if self._runner is not None:
            calls = [loop.run_in_executor(self._executors[0], self._runner.release, stream)]
        else:
            calls = [loop.run_in_executor(p, _worker_release, stream) for p in self._executors]
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, BaseException):
                log.warning(
                    "%s: releasing %s failed: %s", self.spec.name, stream, _one_line(result)
                )
                continue
            self.pm.apply(result.ops)
            self._write_events(result.events)
            if result.error:
                self.pm.handler_errors.labels(self.spec.name).inc()
                self.stats.errors += 1
                log.error("%s: %s", self.spec.name, result.error)

    async def _execute(self, index: int, chunk: Chunk) -> Outcome:
        loop = asyncio.get_running_loop()
        if self._runner is not None:
            return await loop.run_in_executor(self._executors[0], self._runner.process, chunk)
        fmt = chunk.format
        args = (
            chunk.stream,
            chunk.seq,
            chunk.captured_ns,
            (fmt.rate, fmt.channels, int(fmt.sample_type)),
            bytes(chunk.payload),
            chunk.received_ns,
        )
        try:
            return await loop.run_in_executor(self._executors[index], _worker_process, *args)
        except BrokenProcessPool:
            # The handler killed its worker (crash, os._exit): count it, start a new one.
            self._executors[index] = self._new_pool()
            return Outcome(error="worker process died while handling the chunk", pid=0)
        except Exception as exc:  # e.g. a result that cannot be pickled back
            return Outcome(error=_one_line(exc), trace=traceback.format_exc())

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
        if out.error is None:
            stats.processed += 1
            pm.chunks_processed.labels(chunk.stream, name).inc()
            if stats.consecutive_errors >= self.failing_after:
                log.info("%s: handler recovered", name)
            stats.consecutive_errors = 0
            pm.handler_failing.labels(name).set(0)
            return
        stats.errors += 1
        stats.consecutive_errors += 1
        pm.handler_errors.labels(name).inc()
        if self._errlog.ready():
            more = self._errlog.suppressed
            self._errlog.suppressed = 0
            note = f" ({more} more since the last report)" if more else ""
            log.error(
                "%s failed on %s seq %d: %s%s", name, chunk.stream, chunk.seq, out.error, note
            )
            if out.trace:
                log.debug("%s", out.trace)
        if stats.consecutive_errors == self.failing_after:
            pm.handler_failing.labels(name).set(1)
            log.error("%s: %d failures in a row, marked failing", name, stats.consecutive_errors)
        if self.exit_after and stats.consecutive_errors >= self.exit_after and self._fatal is None:
            self._fatal = HandlerError(
                f"handler {name} failed {stats.consecutive_errors} times in a row "
                f"(last: {out.error}); giving up"
            )
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
    backlog_seconds: float = 10.0
    events: str | None = None  # path; None means stdout
    segment_seconds: float = 60.0
    exit_after: int = 100
    start: Literal["live", "earliest"] = "live"
    token: str | None = None


async def serve(
    config: ProcessorConfig,
    *,
    metrics: Metrics | None = None,
    started: Callable[[Processor], None] | None = None,
) -> None:
    """Run a processor against a relay until SIGINT/SIGTERM (or handler give-up).

    ``started`` is called with the ``Processor`` before it runs (its ``stop()``
    ends the run like a signal; the demo and tests use that).
    """
    from ..client import Subscriber
    from ..metrics import serve_metrics

    spec = parse_spec(config.handler)
    options = HandlerOptions(segment_seconds=config.segment_seconds)
    check_handler(spec, options)  # a bad spec fails here, before any connection
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
        )
        if config.metrics_port > 0:
            serve_metrics(config.metrics_port, metrics.registry)  # raises AddressInUse
        sub = Subscriber(
            config.relay,
            config.stream,
            group=config.group or "",
            # Replicas need names of their own to be told apart in status and metrics.
            name=config.name or f"process-{spec.name}@{socket.gethostname()}",
            start=config.start,
            token=config.token or "",
            metrics=metrics,
            on_stream_closed=processor.stream_closed,
            manual_ack=True,
        )
        processor.on_done = sub.ack
        if started is not None:
            started(processor)
        with _stop_on_signals(processor.stop):
            async with sub:
                await processor.run(sub)


def _open_events(path: str) -> IO[str]:
    return open(path, "a", encoding="utf-8", buffering=1)


@contextlib.contextmanager
def _stop_on_signals(stop: Callable[[], None]) -> Any:
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread / not Unix
            pass
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
