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
  row are counted per stream (``failures.FailureTracker``; a success on that
  stream resets its count): ``audiosockets_handler_failing`` is 1 while some
  stream has ``failing_after`` in a row; once *every* active stream has
  ``exit_after`` in a row, the handler itself is broken: the processor stops
  and ``run`` raises ``HandlerError`` (exit status 6), so a supervisor sees
  and restarts it instead of it spinning silently. One stream's failures
  never end the run for the others. ``exit_after=0`` never exits.
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

Modules: ``api`` (the typed handler API: ``Handler``, ``SetsUp``, ``TearsDown``),
``loading`` (specs, importing handlers), ``runners`` (handler thread,
worker processes, ``Outcome``), ``backlog`` (``ChunkBacklog``), ``failures``
(``FailureTracker``), ``metrics``
(``ProcessorMetrics``), ``server`` (``Processor``, ``ProcessorConfig``, ``serve``).
"""

from __future__ import annotations

from .api import Handler, SetsUp, TearsDown
from .backlog import ChunkBacklog, StreamClosed
from .loading import SPEC_HELP, HandlerSpec, check_handler, load_target, parse_spec
from .metrics import ProcessorMetrics
from .runners import HandlerPool, HandlerRunner, HandlerThread, Outcome
from .server import (
    LOG_INTERVAL,
    EventSink,
    Processor,
    ProcessorConfig,
    ProcessorStats,
    serve,
)

__all__ = [
    "LOG_INTERVAL",
    "SPEC_HELP",
    "ChunkBacklog",
    "EventSink",
    "Handler",
    "HandlerPool",
    "HandlerRunner",
    "HandlerSpec",
    "HandlerThread",
    "Outcome",
    "Processor",
    "ProcessorConfig",
    "ProcessorMetrics",
    "ProcessorStats",
    "SetsUp",
    "StreamClosed",
    "TearsDown",
    "check_handler",
    "load_target",
    "parse_spec",
    "serve",
]
