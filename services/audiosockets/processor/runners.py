"""Running a handler: inside the handler thread or a spawned worker process.

``HandlerRunner`` owns the handler instances and turns every call into an
``Outcome`` (events, metric updates, error text, timings) that crosses back to
the event loop; ``HandlerThread`` is the daemon thread for ``--workers 0``; the
``_worker_*`` functions are what a worker process runs (they are looked up by
module path when the process is spawned, so they stay module-level).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import inspect
import json
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np

from ..audio import AudioFormat, Chunk, SampleType
from ..errors import HandlerError
from ..handlers import HandlerContext, HandlerOptions, MetricOp, MetricSink
from ..orphans import die_with_parent
from .api import Handler, SetsUp, TearsDown
from .loading import HandlerSpec, _one_line, check_handler, load_target

log = logging.getLogger("audiosockets.processor")
P = ParamSpec("P")
T = TypeVar("T")

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
    """A plain function, seen through the ``Handler`` protocol."""

    def __init__(self, fn: Callable[[Chunk], object]) -> None:
        self.handle = fn


@dataclass(slots=True)
class _Instance:
    """The handler instance of one stream, and the format it was set up for."""

    format: AudioFormat
    handler: Handler


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

    def __init__(
        self, spec: HandlerSpec, options: HandlerOptions, *, checked: bool = False
    ) -> None:
        """Load the handler ``spec`` names; ``HandlerError`` if it cannot be loaded.

        Unless ``checked`` (the caller already ran ``check_handler``, e.g. ``serve``
        before connecting), a built-in is validated by building one instance.
        """
        self.spec = spec
        self.options = options
        self.sink = MetricSink()
        self._target = load_target(spec) if checked else check_handler(spec, options)
        self._instances: dict[str, _Instance] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def _await(self, value: Any) -> Any:
        if inspect.isawaitable(value):
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            return self._loop.run_until_complete(_as_coroutine(value))
        return value

    def _new_instance(self, stream: str) -> Handler:
        target = self._target
        inst: object
        if self.spec.kind == "builtin":
            inst = target(HandlerContext(stream, self.spec.arg, self.options, self.sink))
        elif inspect.isclass(target):
            inst = target()
        elif isinstance(target, Handler) and callable(target.handle):
            inst = target
        else:
            inst = _FunctionHandler(target)
        if not isinstance(inst, Handler):  # load_target checked the class; be sure of the instance
            raise TypeError(f"handler {self.spec.text!r} instance has no handle(chunk) method")
        return inst

    def _instance(self, chunk: Chunk) -> Handler:
        known = self._instances.get(chunk.stream)
        if known is not None and known.format == chunk.format:
            return known.handler
        if known is not None:
            self._teardown(chunk.stream, known.handler)
        inst = self._new_instance(chunk.stream)
        if isinstance(inst, SetsUp) and callable(inst.setup):
            self._await(inst.setup(chunk.format))
        self._instances[chunk.stream] = _Instance(chunk.format, inst)
        return inst

    def encode(self, stream: str, seq: int | None, result: Any) -> list[str]:
        """JSON lines for what a handler returned (see ``api``); ``seq`` None for teardown.

        Raises ``TypeError`` for a result that is not None, a dict, a dataclass
        instance or a list/tuple of them, and for values JSON cannot hold.
        """
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
        """Handle one chunk (setting up its stream's instance first if needed).

        Never raises for a handler fault: the exception's one-line text and
        traceback go into ``Outcome.error``/``trace``. ``duration`` is the wall
        time of the call in seconds, ``started_ns`` its start (ns since the epoch),
        ``cpu_seconds`` this process's CPU time so far.
        """
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

    def _teardown(self, stream: str, inst: Handler) -> list[str]:
        if not (isinstance(inst, TearsDown) and callable(inst.teardown)):
            return []
        return self.encode(stream, None, self._await(inst.teardown()))

    def release(self, stream: str) -> Outcome:
        """Tear down the instance of one stream (the relay closed it for us)."""
        out = Outcome(started_ns=time.time_ns(), pid=os.getpid())
        known = self._instances.pop(stream, None)
        if known is not None:
            try:
                out.events = self._teardown(stream, known.handler)
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
        for stream, known in list(self._instances.items()):
            try:
                out.events.extend(self._teardown(stream, known.handler))
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
        """Queue ``fn(*args, **kwargs)`` for the handler thread; calls run one at a time, in order."""
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
        """Let the thread exit after the calls already queued; ``wait`` joins it.

        ``cancel_futures`` is accepted for the ``Executor`` API; queued calls still run."""
        self._calls.put(None)
        if wait:
            self._thread.join()


# Worker-process side: one HandlerRunner per process, built by the initializer.
_WORKER_RUNNER: HandlerRunner | None = None


def _worker_init(
    spec: HandlerSpec, options: HandlerOptions, checked: bool, parent_pid: int
) -> None:
    global _WORKER_RUNNER
    die_with_parent(parent_pid)  # a killed processor leaves no worker behind
    # The parent decides when we stop: Ctrl-C and a closing terminal signal the
    # whole process group, and the processor drains its workers on those itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # discards one pending since the spawn
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # see _new_pool
    from ..untrusted import configure_logging

    # A spawned worker starts with no logging: a handler's log lines (which may
    # quote stream names) get the parent's escaped format.
    configure_logging(logging.getLogger().getEffectiveLevel())
    _WORKER_RUNNER = HandlerRunner(spec, options, checked=checked)


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


class HandlerPool:
    """The event-loop side of the runners: one handler thread, or ``workers`` processes.

    ``workers=0`` runs the handler in one ``HandlerThread`` (one ``HandlerRunner``
    built there); ``workers=N`` starts N single-process pools (``spawn``), each
    loading the handler by its spec, so chunk ``index % N`` work runs in parallel.
    Every call returns an ``Outcome`` (or, for teardown, the exceptions it met);
    applying outcomes to metrics and events is the caller's job.
    """

    def __init__(
        self, spec: HandlerSpec, options: HandlerOptions, workers: int, *, checked: bool = False
    ) -> None:
        self.spec = spec
        self.options = options
        self.workers = workers
        self.checked = checked
        self._runner: HandlerRunner | None = None
        self._executors: list[Executor] = []

    async def start(self) -> None:
        """Load the handler in the thread or every worker; ``HandlerError`` if it cannot be.

        A worker that fails to start at all is a ``HandlerError`` too (one line).
        Whatever was started is shut down again before raising.
        """
        loop = asyncio.get_running_loop()
        try:
            if self.workers == 0:
                pool = HandlerThread(f"handler-{self.spec.name}")
                self._executors = [pool]
                self._runner = await loop.run_in_executor(
                    pool,
                    functools.partial(HandlerRunner, self.spec, self.options, checked=self.checked),
                )
            else:
                self._executors = [self._new_pool() for _ in range(self.workers)]
                # Fail fast: a worker that cannot load the handler breaks its pool here.
                await asyncio.gather(*(loop.run_in_executor(p, os.getpid) for p in self._executors))
        except HandlerError:
            await self.shutdown(0.0)
            raise
        except BrokenProcessPool as exc:
            await self.shutdown(0.0)
            raise HandlerError(f"handler {self.spec.name}: worker process failed to start") from exc

    def _new_pool(self) -> ProcessPoolExecutor:
        """A one-worker pool whose process starts now, with SIGHUP blocked.

        A closing terminal sends SIGHUP to the whole process group; the processor
        drains on it, and its workers must leave that to it. A spawned worker
        ignores SIGHUP only once ``_worker_init`` runs, after the interpreter and
        numpy loaded; multiprocessing's resource tracker (a helper process the
        first pool starts) never does. Both are therefore started here with
        SIGHUP blocked (the mask is inherited across exec): ``submit`` spawns the
        worker in this thread, at once. Without this either died, and the pool
        broke at start or mid-drain.
        """
        from multiprocessing import resource_tracker

        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            resource_tracker.ensure_running()
            pool = ProcessPoolExecutor(
                1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
                initargs=(self.spec, self.options, self.checked, os.getpid()),
            )
            pool.submit(os.getpid)  # spawns the worker under the mask
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        return pool

    async def process(self, index: int, chunk: Chunk) -> Outcome:
        """Handle ``chunk`` in the thread, or in worker ``index`` (0 <= index < workers).

        Never raises for a handler fault: a worker that died (crash, ``os._exit``)
        is replaced and reported as an ``Outcome`` with ``error`` set.
        """
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

    async def release(self, stream: str) -> list[Outcome | BaseException]:
        """Tear down ``stream``'s handler instance in the thread or every worker."""
        loop = asyncio.get_running_loop()
        if self._runner is not None:
            calls = [loop.run_in_executor(self._executors[0], self._runner.release, stream)]
        else:
            calls = [loop.run_in_executor(p, _worker_release, stream) for p in self._executors]
        return list(await asyncio.gather(*calls, return_exceptions=True))

    async def close(self, timeout: float) -> list[Outcome | BaseException]:
        """Tear every handler instance down, waiting at most ``timeout`` seconds.

        Returns what each thread/worker reported; one that did not finish in
        time is logged and left out (``shutdown`` then deals with it).
        """
        loop = asyncio.get_running_loop()
        closers: list[Awaitable[Outcome]] = []
        if self._runner is not None:
            closers.append(loop.run_in_executor(self._executors[0], self._runner.close))
        elif self.workers:
            closers.extend(loop.run_in_executor(p, _worker_close) for p in self._executors)
        if not closers:
            return []
        tasks = [asyncio.ensure_future(c) for c in closers]
        _done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
            log.warning("%s: teardown did not finish within %g s", self.spec.name, timeout)
        return [task.exception() or task.result() for task in tasks if not task.cancelled()]

    async def shutdown(self, timeout: float) -> None:
        """Stop the handler thread/workers without waiting on a hung handler forever.

        Workers get ``timeout`` seconds in total to exit, then are terminated;
        the handler thread is a daemon, so a stuck one cannot keep the process alive.
        """
        pools, self._executors = self._executors, []
        processes: list[Any] = []
        for pool in pools:
            # Private, but the only handle on a worker stuck in user code: we must be
            # able to terminate it, or the interpreter would wait for it at exit.
            processes.extend((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        for proc in processes:
            await asyncio.to_thread(proc.join, max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("%s: worker %d did not stop; terminating it", self.spec.name, proc.pid)
                proc.terminate()
                await asyncio.to_thread(proc.join, 5.0)
