"""The processor: Subscriber -> bounded backlog -> handler (thread or processes).

Invariants:
- The receive loop appends to a ``ChunkBacklog`` whose size is fixed at
  construction (seconds of audio and/or chunks). Beyond it, live audio the
  handler let fall more than ``backlog_seconds`` behind is dropped, oldest
  first, and counted
  ``audiosockets_chunks_dropped_total{reason="processor_overrun"}``; audio
  that arrived as a replay (catching up after ``--start earliest`` or a
  resume) is never dropped: the receive loop stops taking chunks until the
  handler makes room (backpressure: the relay keeps that audio).
- Handlers run off the event loop: in one dedicated thread by default, or in
  ``workers`` single-process pools (``--workers N``) where each worker loads
  the handler by its spec and rebuilds ``Chunk`` from bytes + metadata.
  Sequence gaps are counted by the ``Subscriber`` (not again here).
- Everything a handler produces comes back to the event loop as an
  ``Outcome`` (JSON event lines, metric updates, error text, timings); only
  the event loop writes events and touches Prometheus objects.
- Failure policy: each handler exception is counted
  (``audiosockets_handler_errors_total``), logged at most once per
  ``LOG_INTERVAL`` seconds, and the next chunk is processed. Failures in a
  row are counted per stream (a success on that stream resets its count):
  ``audiosockets_handler_failing`` is 1 while some stream has
  ``failing_after`` in a row; once *every* active stream (one handled within
  ``ACTIVE_STREAM_SECONDS``) has ``exit_after`` in a row, the handler itself is
  broken: the processor stops and ``run`` raises ``HandlerError`` (exit status
  6), so a supervisor sees and restarts it instead of it spinning silently.
  One stream's failures (its name, its data) never end the run for the
  others. ``exit_after=0`` never exits.
- Stopping: a source that ends by itself is processed completely; after
  ``stop()`` the backlog gets ``drain_timeout`` seconds, what is left is counted
  as dropped, and a handler thread or worker stuck in user code cannot keep
  the process alive (daemon thread; workers are terminated).
- When the relay closes a stream for us (group handover), a ``StreamClosed``
  marker follows that stream's queued chunks; handling it tears the stream's
  handler instance down (``teardown()``), so ``archive`` completes its file.

State lives in ``Processor`` (backlog, counters, worker pools) on the event
loop, and in ``HandlerRunner`` (handler instances, one per stream for class
handlers) inside the thread or worker process that runs the handler.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import functools
import importlib
import importlib.util
import inspect
import json
import logging
import multiprocessing
import os
import queue
import re
import signal
import socket
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, Final, Literal, ParamSpec, Protocol, TypeVar

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from .audio import AudioFormat, Chunk, SampleType
from .errors import ConfigError, HandlerError
from .handlers import (
    BUILTINS,
    COUNTERS,
    GAUGES,
    HandlerContext,
    HandlerOptions,
    MetricOp,
    MetricSink,
    builtin_class,
)
from .metrics import LATENCY_BUCKETS, Metrics

log = logging.getLogger("audiosockets.processor")
P = ParamSpec("P")
T = TypeVar("T")

#: Seconds between two logged handler errors (the rest are counted, then summarised).
LOG_INTERVAL: Final = 10.0
#: A stream counts toward the give-up rule while it had a chunk handled this recently.
ACTIVE_STREAM_SECONDS: Final = 30.0
SPEC_HELP: Final = (
    "a built-in (level, vad, archive:DIR, spectrum), package.module:callable "
    "or path/to/file.py:callable"
)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

# --- handler specs -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """A parsed ``--handler`` value; picklable, so workers can load it themselves."""

    text: str
    kind: Literal["builtin", "module", "file"]
    target: str  # built-in name, module name or file path
    attr: str | None = None  # the callable or class inside the module/file
    arg: str | None = None  # built-in argument (archive:DIR, vad:key=value)

    @property
    def name(self) -> str:
        """Low-cardinality label for metrics: never a directory path."""
        if self.kind == "builtin":
            return self.target
        if self.kind == "file":
            return f"{Path(self.target).name}:{self.attr}"
        return f"{self.target}:{self.attr}"

    @property
    def stateful(self) -> bool:
        """Built-ins that keep state across chunks must see every chunk of a stream in order."""
        return self.kind == "builtin" and BUILTINS[self.target][2]


def parse_spec(text: str) -> HandlerSpec:
    """Parse a handler spec; a malformed one is a ``HandlerError`` in one line."""
    text = text.strip()
    if not text:
        raise HandlerError(f"--handler is empty: expected {SPEC_HELP}")
    head, sep, tail = text.partition(":")
    if head in BUILTINS:
        takes = BUILTINS[head][1]
        if takes == "required" and not tail:
            raise HandlerError(f"handler {head} needs an argument: {head}:DIR")
        if takes == "none" and sep:
            raise HandlerError(f"handler {head} takes no argument, got {text!r}")
        return HandlerSpec(text, "builtin", head, None, tail or None)
    left, sep, attr = text.rpartition(":")
    if not sep:
        raise HandlerError(f"unknown handler {text!r}: expected {SPEC_HELP}")
    if not _IDENT.match(attr):
        raise HandlerError(f"handler {text!r}: {attr!r} is not a Python name")
    if left.endswith(".py") or "/" in left or os.sep in left:
        return HandlerSpec(text, "file", left, attr)
    if not _IDENT.match(left):
        raise HandlerError(f"handler {text!r}: {left!r} is not a module name; expected {SPEC_HELP}")
    return HandlerSpec(text, "module", left, attr)


def _import_file(path_text: str) -> Any:
    path = Path(path_text)
    if not path.is_file():
        raise HandlerError(f"handler file {path_text} does not exist")
    module_name = "_audiosockets_user_" + re.sub(r"\W", "_", str(path.resolve()))
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise HandlerError(f"handler file {path_text} cannot be loaded as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickle look modules up here
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.append(folder)  # like running a script: its sibling modules import
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise HandlerError(f"handler file {path_text} failed to import: {_one_line(exc)}") from exc
    return module


def load_target(spec: HandlerSpec) -> Any:
    """Import what the spec names: a class, a function or an object with ``handle``."""
    if spec.kind == "builtin":
        return builtin_class(spec.target)
    if spec.kind == "file":
        module = _import_file(spec.target)
        where = spec.target
    else:
        try:
            module = importlib.import_module(spec.target)
        except ModuleNotFoundError as exc:
            raise HandlerError(
                f"handler module {spec.target} not found ({exc.name} is missing)"
            ) from exc
        except Exception as exc:
            raise HandlerError(
                f"handler module {spec.target} failed to import: {_one_line(exc)}"
            ) from exc
        where = spec.target
    obj: Any = module
    for part in (spec.attr or "").split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HandlerError(
                f"handler {spec.text!r}: {where} has no attribute {spec.attr!r}"
            ) from None
    if inspect.isclass(obj):
        if not callable(getattr(obj, "handle", None)):
            raise HandlerError(
                f"handler {spec.text!r}: class {obj.__name__} has no handle(chunk) method"
            )
    elif not callable(obj) and not callable(getattr(obj, "handle", None)):
        raise HandlerError(
            f"handler {spec.text!r} is neither callable nor has a handle(chunk) method"
        )
    return obj


def check_handler(spec: HandlerSpec, options: HandlerOptions) -> Any:
    """Load the spec and, for a built-in, build one instance to validate its argument.

    Returns the loaded target. Called before connecting, so a bad spec, option
    or archive directory is one error line at startup, not a counted failure.
    """
    target = load_target(spec)
    if spec.kind == "builtin":
        target(HandlerContext("", spec.arg, options, MetricSink()))
    return target


# --- running a handler (inside the handler thread or a worker process) ----------


@dataclass(slots=True)
class Outcome:
    """What one handler call produced; crosses the process boundary by pickle."""

    events: list[str] = field(default_factory=list)
    ops: list[MetricOp] = field(default_factory=list)
    error: str | None = None
    trace: str | None = None
    started_ns: int = 0
    duration: float = 0.0
    pid: int = 0
    cpu_seconds: float = 0.0


class _FunctionHandler:
    def __init__(self, fn: Callable[[Chunk], Any]) -> None:
        self.handle = fn


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj).hex()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


class HandlerRunner:
    """Loads a handler by spec and calls it; lives in exactly one thread.

    Class handlers get one instance per stream (``setup(fmt)`` on its first
    chunk, again after a format change); a function or an object with
    ``handle`` is shared by all streams. Coroutines returned by any of them
    are run to completion on a private event loop of this thread.
    """

    def __init__(self, spec: HandlerSpec, options: HandlerOptions) -> None:
        self.spec = spec
        self.options = options
        self.sink = MetricSink()
        self._target = check_handler(spec, options)
        self._instances: dict[str, tuple[AudioFormat, Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def _await(self, value: Any) -> Any:
        if inspect.isawaitable(value):
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            return self._loop.run_until_complete(_as_coroutine(value))
        return value

    def _new_instance(self, stream: str) -> Any:
        target = self._target
        if self.spec.kind == "builtin":
            return target(HandlerContext(stream, self.spec.arg, self.options, self.sink))
        if inspect.isclass(target):
            return target()
        if callable(getattr(target, "handle", None)):
            return target
        return _FunctionHandler(target)

    def _instance(self, chunk: Chunk) -> Any:
        known = self._instances.get(chunk.stream)
        if known is not None and known[0] == chunk.format:
            return known[1]
        if known is not None:
            self._teardown(chunk.stream, known[1])
        inst = self._new_instance(chunk.stream)
        setup = getattr(inst, "setup", None)
        if callable(setup):
            self._await(setup(chunk.format))
        self._instances[chunk.stream] = (chunk.format, inst)
        return inst

    def encode(self, stream: str, seq: int | None, result: Any) -> list[str]:
        if result is None:
            return []
        items = list(result) if isinstance(result, list | tuple) else [result]
        lines = []
        for item in items:
            if item is None:
                continue
            if dataclasses.is_dataclass(item) and not isinstance(item, type):
                item = dataclasses.asdict(item)
            if not isinstance(item, dict):
                raise TypeError(
                    f"handler returned {type(item).__name__}; expected None, a dict, "
                    "a dataclass or a list of them"
                )
            base: dict[str, Any] = {"handler": self.spec.name, "stream": stream}
            if seq is not None:
                base["seq"] = seq
            lines.append(json.dumps({**base, **item}, default=_json_default, separators=(",", ":")))
        return lines

    def process(self, chunk: Chunk) -> Outcome:
        out = Outcome(started_ns=time.time_ns(), pid=os.getpid())
        t0 = time.perf_counter()
        try:
            inst = self._instance(chunk)
            out.events = self.encode(chunk.stream, chunk.seq, self._await(inst.handle(chunk)))
        except Exception as exc:
            out.error, out.trace = _one_line(exc), traceback.format_exc()
        out.duration = time.perf_counter() - t0
        out.ops = self.sink.drain()
        out.cpu_seconds = time.process_time()
        return out

    def _teardown(self, stream: str, inst: Any) -> list[str]:
        teardown = getattr(inst, "teardown", None)
        if not callable(teardown):
            return []
        return self.encode(stream, None, self._await(teardown()))

    def release(self, stream: str) -> Outcome:
        """Tear down the instance of one stream (the relay closed it for us)."""
        out = Outcome(started_ns=time.time_ns(), pid=os.getpid())
        known = self._instances.pop(stream, None)
        if known is not None:
            try:
                out.events = self._teardown(stream, known[1])
            except Exception as exc:
                out.error = f"teardown for {stream}: {_one_line(exc)}"
                out.trace = traceback.format_exc()
        out.ops = self.sink.drain()
        out.cpu_seconds = time.process_time()
        return out

    def close(self) -> Outcome:
        """Tear down every instance (errors are reported, never raised)."""
        out = Outcome(started_ns=time.time_ns(), pid=os.getpid())
        errors = []
        for stream, (_fmt, inst) in list(self._instances.items()):
            try:
                out.events.extend(self._teardown(stream, inst))
            except Exception as exc:
                errors.append(f"teardown for {stream}: {_one_line(exc)}")
                out.trace = traceback.format_exc()
        self._instances.clear()
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        out.error = "; ".join(errors) or None
        out.ops = self.sink.drain()
        out.cpu_seconds = time.process_time()
        return out


async def _as_coroutine(value: Awaitable[Any]) -> Any:
    return await value


class HandlerThread(Executor):
    """One daemon thread running submitted calls in order.

    Unlike ``ThreadPoolExecutor`` (whose threads the interpreter joins at exit),
    a handler stuck forever in here cannot keep the process from exiting.
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        self._calls.put((future, functools.partial(fn, *args, **kwargs)))
        return future

    def _main(self) -> None:
        while (item := self._calls.get()) is not None:
            future, call = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as exc:
                future.set_exception(exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._calls.put(None)
        if wait:
            self._thread.join()


# Worker-process side: one HandlerRunner per process, built by the initializer.
_WORKER_RUNNER: HandlerRunner | None = None


def _worker_init(spec: HandlerSpec, options: HandlerOptions) -> None:
    global _WORKER_RUNNER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    _WORKER_RUNNER = HandlerRunner(spec, options)


def _worker_process(
    stream: str,
    seq: int,
    captured_ns: int,
    fmt: tuple[int, int, int],
    payload: bytes,
    received_ns: int,
) -> Outcome:
    assert _WORKER_RUNNER is not None
    rate, channels, sample_type = fmt
    chunk = Chunk(
        stream,
        seq,
        captured_ns,
        AudioFormat(rate, channels, SampleType(sample_type)),
        payload,
        received_ns,
    )
    return _WORKER_RUNNER.process(chunk)


def _worker_release(stream: str) -> Outcome:
    assert _WORKER_RUNNER is not None
    return _WORKER_RUNNER.release(stream)


def _worker_close() -> Outcome:
    assert _WORKER_RUNNER is not None
    return _WORKER_RUNNER.close()


# --- the bounded backlog --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """Backlog marker: the relay closed this stream for us; tear its handler down."""

    stream: str


class ChunkBacklog:
    """FIFO of chunks bounded by count and/or seconds of audio.

    Beyond the bound, the oldest chunk is dropped only if it is *live audio
    that the handler has let fall behind*: it arrived live (at most
    ``live_lag`` seconds after its capture) and is now more than
    ``max_seconds`` behind the wall clock (with only ``max_chunks``: any
    chunk that arrived live). ``push`` returns the chunks it evicted, so the
    caller counts them. Chunks that arrived late (a replay while catching
    up: ``--start earliest``, a resume, a publisher re-sending its spool) are
    never dropped here: the backlog stays over its bound (``over_limit``) and
    the caller stops taking chunks (backpressure) until the handler makes
    room; the relay still holds that audio. At least the newest chunk is
    always kept. ``StreamClosed`` markers keep their place in the order,
    take no room and are never evicted.
    """

    def __init__(
        self,
        max_chunks: int | None = None,
        max_seconds: float | None = 10.0,
        *,
        live_lag: float | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        if max_chunks is None and max_seconds is None:
            raise ValueError("a backlog needs a limit: max_chunks and/or max_seconds")
        if max_chunks is not None and max_chunks < 1:
            raise ValueError("max_chunks must be >= 1")
        if max_seconds is not None and max_seconds <= 0:
            raise ValueError("max_seconds must be > 0")
        self.max_chunks = max_chunks
        self.max_seconds = max_seconds
        if live_lag is None:
            live_lag = 1.0 if max_seconds is None else min(1.0, max_seconds / 2)
        #: A chunk that arrived later than this after its capture is a replay.
        self.live_lag = live_lag
        self._clock = clock
        self._items: deque[Chunk | StreamClosed] = deque()
        self.chunks = 0
        self.seconds = 0.0
        self.depth: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def _full(self) -> bool:
        if self.max_chunks is not None and self.chunks > self.max_chunks:
            return True
        return self.max_seconds is not None and self.seconds > self.max_seconds + 1e-9

    @property
    def over_limit(self) -> bool:
        """More than the bound is held (only while the caller applies backpressure)."""
        return self.chunks > 1 and self._full()

    def push(self, chunk: Chunk) -> list[Chunk]:
        self._items.append(chunk)
        self.chunks += 1
        self.seconds += chunk.seconds
        self.depth[chunk.stream] = self.depth.get(chunk.stream, 0) + 1
        return self.evict_stale()

    def evict_stale(self) -> list[Chunk]:
        """While over the bound, drop the oldest chunks that are live audio too late."""
        dropped = []
        now = self._clock()
        while self.over_limit:
            oldest = self._oldest()
            if oldest is None or self._stale_in(oldest, now) > 0:
                break
            dropped.append(self._evict_oldest())
        return dropped

    def seconds_until_stale(self) -> float | None:
        """When the oldest chunk may be dropped (0: now), or None: it never is (a replay)."""
        oldest = self._oldest()
        if oldest is None:
            return None
        wait = self._stale_in(oldest, self._clock())
        return None if wait == float("inf") else max(0.0, wait)

    def _stale_in(self, chunk: Chunk, now_ns: int) -> float:
        """Seconds until ``chunk`` counts as live audio fallen behind (inf: never)."""
        if chunk.received_ns - chunk.captured_ns > round(self.live_lag * 1e9):
            return float("inf")  # arrived as a replay: catching up, never dropped here
        if self.max_seconds is None:
            return 0.0
        return (chunk.captured_ns + round(self.max_seconds * 1e9) - now_ns) / 1e9

    def _oldest(self) -> Chunk | None:
        for item in self._items:
            if isinstance(item, Chunk):
                return item
        return None

    def mark_closed(self, stream: str) -> None:
        self._items.append(StreamClosed(stream))

    def _evict_oldest(self) -> Chunk:
        for i, item in enumerate(self._items):
            if isinstance(item, Chunk):
                del self._items[i]
                return self._account(item)
        raise AssertionError("no chunk to evict")

    def _account(self, chunk: Chunk) -> Chunk:
        self.chunks -= 1
        self.seconds = max(0.0, self.seconds - chunk.seconds) if self.chunks else 0.0
        self.depth[chunk.stream] -= 1
        return chunk

    def pop(self) -> Chunk | StreamClosed | None:
        if not self._items:
            return None
        item = self._items.popleft()
        return self._account(item) if isinstance(item, Chunk) else item


# --- metrics --------------------------------------------------------------------


class ProcessorMetrics:
    """The processor's own metric objects, on the registry of a core ``Metrics``.

    One instance per registry (``ProcessorMetrics.of(metrics)``) so that several
    processors in one process (the demo) share the series.
    """

    _by_metrics: ClassVar[weakref.WeakKeyDictionary[Metrics, ProcessorMetrics]] = (
        weakref.WeakKeyDictionary()
    )
    _lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def of(cls, metrics: Metrics) -> ProcessorMetrics:
        with cls._lock:
            pm = cls._by_metrics.get(metrics)
            if pm is None:
                pm = cls._by_metrics[metrics] = cls(metrics)
            return pm

    def __init__(self, metrics: Metrics) -> None:
        self.core = metrics
        r = metrics.registry
        self.chunks_processed = Counter(
            "audiosockets_chunks_processed",
            "Chunks a handler finished without raising.",
            ["stream", "handler"],
            registry=r,
        )
        self.processing_time = Histogram(
            "audiosockets_processing_time_seconds",
            "Time one handler call took (successful or not).",
            ["handler"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.handler_start_latency = Histogram(
            "audiosockets_handler_start_latency_seconds",
            "Time from capture of a chunk to the start of its handler call.",
            ["stream", "handler"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.handler_errors = Counter(
            "audiosockets_handler_errors",
            "Handler calls that raised (the next chunk is processed anyway).",
            ["handler"],
            registry=r,
        )
        self.handler_failing = Gauge(
            "audiosockets_handler_failing",
            "1 while the handler has failed many times in a row.",
            ["handler"],
            registry=r,
        )
        self.assigned_streams = Gauge(
            "audiosockets_assigned_streams",
            "Streams this processor has received chunks from.",
            ["handler"],
            registry=r,
        )
        self.level_dbfs = Gauge(
            "audiosockets_level_dbfs",
            "Level of the latest chunk in dBFS (full-scale sine: rms -3.01, peak 0).",
            ["stream", "channel", "measure"],
            registry=r,
        )
        self.clipped_samples = Counter(
            "audiosockets_clipped_samples",
            "Samples at or beyond full scale.",
            ["stream", "channel"],
            registry=r,
        )
        self.seconds_since_sound = Gauge(
            "audiosockets_seconds_since_sound",
            "Capture-time seconds since the last chunk above the silence threshold.",
            ["stream"],
            registry=r,
        )
        self.vad_active = Gauge(
            "audiosockets_vad_active",
            "1 while voice/sound activity is detected.",
            ["stream"],
            registry=r,
        )
        self.vad_segments = Counter(
            "audiosockets_vad_segments",
            "Activity segments started.",
            ["stream"],
            registry=r,
        )
        self.band_energy_dbfs = Gauge(
            "audiosockets_band_energy_dbfs",
            "Energy per octave band of the latest chunk in dBFS.",
            ["stream", "band"],
            registry=r,
        )
        self.archive_segments = Counter(
            "audiosockets_archive_segments",
            "WAV segments completed (renamed to their final name).",
            ["stream"],
            registry=r,
        )
        self.archive_bytes = Counter(
            "audiosockets_archive_bytes",
            "Audio payload bytes written to WAV segments.",
            ["stream"],
            registry=r,
        )
        self._gauges: dict[str, Gauge] = {name: getattr(self, name) for name in GAUGES}
        self._counters: dict[str, Counter] = {name: getattr(self, name) for name in COUNTERS}

    def apply(self, ops: list[MetricOp]) -> None:
        for op in ops:
            if op.op == "set":
                self._gauges[op.metric].labels(*op.labels).set(op.value)
            else:
                self._counters[op.metric].labels(*op.labels).inc(op.value)


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
        self._clock = clock
        # Failures in a row per stream, and when each stream last had an outcome: one
        # stream's failures (its name, its data) never end the run while others work.
        self._in_a_row: dict[str, int] = {}
        self._last_outcome: dict[str, float] = {}
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()  # the handler took a chunk off the backlog
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
            if self.backlog.over_limit:
                await self._wait_for_room()

    async def _wait_for_room(self) -> None:
        """Backpressure: stop taking chunks while the backlog is over its bound with
        audio still worth handling (a replay being caught up, or live audio not yet
        ``backlog_seconds`` late). The Subscriber then stops reading and the relay
        keeps the audio. Live audio that falls further behind is dropped, oldest
        first, and counted (``processor_overrun``)."""
        backlog = self.backlog
        while True:
            for old in backlog.evict_stale():
                self._count_drop(old)
                self._finish(old)
            if not backlog.over_limit:
                return
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), backlog.seconds_until_stale())

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
        self._in_a_row.pop(stream, None)
        self._last_outcome.pop(stream, None)
        self._update_failing()
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
        stream = chunk.stream
        self._last_outcome[stream] = self._clock()
        if out.error is None:
            stats.processed += 1
            pm.chunks_processed.labels(stream, name).inc()
            if self._in_a_row.get(stream, 0) >= self.failing_after:
                log.info("%s: handler recovered on %s", name, stream)
            self._in_a_row[stream] = 0
            self._update_failing()
            return
        stats.errors += 1
        in_a_row = self._in_a_row[stream] = self._in_a_row.get(stream, 0) + 1
        pm.handler_errors.labels(name).inc()
        if self._errlog.ready():
            more = self._errlog.suppressed
            self._errlog.suppressed = 0
            note = f" ({more} more since the last report)" if more else ""
            log.error("%s failed on %s seq %d: %s%s", name, stream, chunk.seq, out.error, note)
            if out.trace:
                log.debug("%s", out.trace)
        self._update_failing()
        if in_a_row == self.failing_after:
            log.error(
                "%s: %d failures in a row, marked failing (stream %s)", name, in_a_row, stream
            )
        if self.exit_after and self._fatal is None:
            active = self._active_streams()
            if all(self._in_a_row.get(s, 0) >= self.exit_after for s in active):
                each = f" on each of its {len(active)} streams" if len(active) > 1 else ""
                self._fatal = HandlerError(
                    f"handler {name} failed {in_a_row} times in a row{each} "
                    f"(last: {out.error}); giving up"
                )
                self._stop.set()

    def _active_streams(self) -> list[str]:
        """Streams with an outcome within ``ACTIVE_STREAM_SECONDS`` (at least the newest)."""
        now = self._clock()
        return [s for s, t in self._last_outcome.items() if now - t <= ACTIVE_STREAM_SECONDS]

    def _update_failing(self) -> None:
        """``handler_failing`` is 1 while any stream has ``failing_after`` failures in a row."""
        worst = max(self._in_a_row.values(), default=0)
        self.stats.consecutive_errors = worst
        self.pm.handler_failing.labels(self.spec.name).set(1 if worst >= self.failing_after else 0)

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
    from .client import Subscriber, check_wire_names
    from .metrics import serve_metrics

    spec = parse_spec(config.handler)
    options = HandlerOptions(segment_seconds=config.segment_seconds)
    check_handler(spec, options)  # a bad spec fails here, before any connection
    # Replicas need names of their own to be told apart in status and metrics.
    name = config.name or f"process-{spec.name}@{socket.gethostname()}"
    check_wire_names(  # every name this processor will send: the relay would refuse it
        {
            "--stream": config.stream,
            "--group": config.group or "",
            "--name" if config.name else "the client name (set --name)": name,
            "--token": config.token or "",
        }
    )
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
            name=name,
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


__all__ = [
    "ChunkBacklog",
    "EventSink",
    "HandlerRunner",
    "HandlerSpec",
    "Outcome",
    "Processor",
    "ProcessorConfig",
    "ProcessorMetrics",
    "ProcessorStats",
    "StreamClosed",
    "check_handler",
    "load_target",
    "parse_spec",
    "serve",
]
