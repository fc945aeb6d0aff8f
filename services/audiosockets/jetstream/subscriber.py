"""``JetStreamSubscriber``: ``client.Subscriber``'s API and guarantees over JetStream.

Where the state lives:
- fan-out: one ``Reader`` over the pattern's subjects (``prefix.>`` for a glob);
  one JetStream stream orders every subject, so its stream sequence is the one
  resume point, kept across reconnects and consumer losses.
- group: ``GroupMember`` (groups.py) decides which streams are ours; one
  ``Reader`` per owned stream, started after the group's acknowledged point.
- ``received`` (last seq taken from JetStream per stream), ``positions`` (last
  seq handed to the application), ``acked`` (last seq the application finished).
  The bounded hand-off queue survives everything; a chunk at or below
  ``received`` is a duplicate (suppressed, counted), a jump is a gap (counted).
- what JetStream still holds for each reader: lag.py's task, every
  ``lag_interval`` seconds (``audiosockets_jetstream_consumer_pending_chunks``).

Invariants: the application's pace is the pull's pace (a full queue stops the
reader, JetStream keeps the rest: no loss, no unbounded buffer); a message that
is not ours (foreign subject token, missing headers) is counted in
``audiosockets_protocol_errors_total`` and skipped, never delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from fnmatch import fnmatchcase
from typing import Any, Literal

from nats.aio.msg import Msg

from ..audio import AudioFormat, Chunk
from ..client import RetryPolicy
from ..errors import Refused, RemoteProtocolError
from ..metrics import Metrics, ReceiveChildren
from ..tasks import cancel_and_wait
from ..urls import NatsAddress
from .connection import NatsLink, address_of, settings_of
from .lag import start_watching, stop_watching
from .mapping import ChunkMessage, NatsSettings, decode_message, pattern_subject
from .reader import Reader

log = logging.getLogger(__name__)

StartName = Literal["live", "earliest"]
#: Most (seq, stream seq) pairs remembered per stream for chunks not yet acked.
_MAX_UNACKED = 65536
#: Consumers re-created for one hole before it counts as a gap (a second or so each).
_MAX_REWINDS = 8


class JetStreamSubscriber:
    """Receives chunks of the streams matching ``pattern``; an async iterator.

    Same API as ``client.Subscriber``. With ``group``, each stream goes to exactly
    one live member of the group (PROTOCOL.md, "Groups over JetStream").
    """

    role_label = "subscriber"

    def __init__(
        self,
        url: str | NatsAddress,
        pattern: str = "*",
        *,
        group: str = "",
        name: str = "subscriber",
        start: StartName = "live",
        token: str = "",
        metrics: Metrics | None = None,
        retry: RetryPolicy | None = None,
        queue_chunks: int = 256,
        on_stream_closed: Callable[[str], None] | None = None,
        manual_ack: bool = False,
        settings: NatsSettings | None = None,
        member_ttl: float = 3.0,
    ) -> None:
        self.address = address_of(url)
        self.settings = settings_of(self.address, settings)
        self.pattern = pattern
        self.group = group or ""
        self.name = name
        self.start_name = start
        self.metrics = metrics or Metrics()
        self.retry = retry or RetryPolicy()
        self.member_ttl = member_ttl
        self.link = NatsLink(
            self.address,
            name=name,
            role_label=self.role_label,
            token=token,
            metrics=self.metrics,
            settings=self.settings,
            connect_timeout=self.retry.connect_timeout,
        )
        self.connected = self.link.connected
        self.received: dict[str, int] = {}
        self.positions: dict[str, int] = {}
        self.formats: dict[str, AudioFormat] = {}
        self.assigned: set[str] = set()
        self.duplicates = 0
        self.gaps = 0
        self.protocol_errors = 0
        self.manual_ack = manual_ack
        self.acked: dict[str, int] = {}
        #: Stream sequence of the last acked chunk per stream (the group's point).
        self.acked_stream_seq: dict[str, int] = {}
        self._unacked_seqs: dict[str, deque[tuple[int, int]]] = {}
        # None wakes an application waiting on an empty queue after a failure.
        self._queue: asyncio.Queue[Chunk | None] = asyncio.Queue(maxsize=queue_chunks)
        self._unacked: Chunk | None = None
        self._on_stream_closed = on_stream_closed
        self._children: dict[str, ReceiveChildren] = {}
        self._fresh: set[str] = set()  # streams whose next chunk follows a (re)start
        self._readers: dict[str, Reader] = {}
        self._task: asyncio.Task[None] | None = None
        self._failure: Exception | None = None
        self._member: Any = None  # groups.GroupMember, when in a group
        self._gap_logged: dict[str, float] = {}
        #: Stream sequence of the last message taken per stream (chunks and ends).
        self._last_stream_seq: dict[str, int] = {}
        self._rewinds: dict[str, int] = {}

    @property
    def last_error(self) -> str | None:
        return self.link.last_error

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting in the background; returns at once."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"subscriber {self.name}")

    async def wait_connected(self, timeout: float | None = None) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self.connected.wait()
        except TimeoutError:
            return False
        return True

    async def __aenter__(self) -> JetStreamSubscriber:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop reading; a group member flushes its acknowledged points, lets its
        streams go and leaves the group (its streams move on at once)."""
        self._ack_previous()
        # The membership loop first: it must not put our key back after we left.
        with contextlib.suppress(Exception):
            await cancel_and_wait(self._task)
        self._task = None
        if self._member is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    await self._member.leave()
        for reader in list(self._readers.values()):
            await reader.stop()
        self._readers.clear()
        await self.link.close()

    async def _run(self) -> None:
        lag: asyncio.Task[None] | None = None
        try:
            await self.link.connect()
            delay = self.retry.initial
            while True:
                try:
                    await self.link.ensure_stream()
                    break
                except Exception as exc:  # the cluster may still be electing
                    if isinstance(exc, Refused):
                        raise
                    log.warning("subscriber %r: JetStream not ready: %s", self.name, exc)
                    await asyncio.sleep(delay)
                    delay = min(self.retry.cap, delay * 2)
            lag = start_watching(self.link, self._readers, self.pattern, self.metrics)
            if self.group:
                from .groups import GroupMember

                self._member = GroupMember(self)
                await self._member.run()
            else:
                first = 1 if self.start_name == "earliest" else None
                self.start_reader("", pattern_subject(self.pattern, self.settings.prefix), first)
                await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(exc)
            raise
        finally:
            await stop_watching(lag)

    def _fail(self, exc: Exception) -> None:
        """End the subscription: the application's next chunk raises ``exc``."""
        if self._failure is not None:
            return
        self._failure = exc
        log.error("subscriber %r stopped: %s", self.name, exc)
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    # --- readers (groups.py starts and stops them per stream) ---------------------------

    def start_reader(self, key: str, subject: str, first: int | None) -> None:
        reader = Reader(self.link, subject, self._deliver, first=first, refused=self._fail)
        self._readers[key] = reader
        if key:
            self._fresh.add(key)
        reader.start()

    async def stop_reader(self, key: str) -> None:
        reader = self._readers.pop(key, None)
        if reader is not None:
            await reader.stop()

    # --- the application side --------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self

    async def __anext__(self) -> Chunk:
        self._ack_previous()
        if self._failure is not None and self._queue.empty():
            raise self._failure
        chunk = await self._queue.get()
        if chunk is None:
            assert self._failure is not None
            raise self._failure
        self.positions[chunk.stream] = chunk.seq
        if not self.manual_ack:
            self._unacked = chunk
        return chunk

    async def get(self, timeout: float | None = None) -> Chunk:
        async with asyncio.timeout(timeout):
            return await self.__anext__()

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def ack(self, stream: str, seq: int) -> None:
        """This member is done with ``stream`` up to ``seq`` (groups: a new owner
        resumes after it); lower or repeated values are ignored."""
        if seq <= self.acked.get(stream, -1):
            return
        self.acked[stream] = seq
        pending = self._unacked_seqs.get(stream)
        while pending and pending[0][0] <= seq:
            self.acked_stream_seq[stream] = pending.popleft()[1]

    def _ack_previous(self) -> None:
        chunk, self._unacked = self._unacked, None
        if chunk is not None:
            self.ack(chunk.stream, chunk.seq)

    def stream_closed(self, stream: str) -> None:
        self.assigned.discard(stream)
        if self._on_stream_closed is not None:
            self._on_stream_closed(stream)

    # --- delivery ------------------------------------------------------------------

    def _child(self, stream: str) -> ReceiveChildren:
        child = self._children.get(stream)
        if child is None:
            child = self._children[stream] = self.metrics.receive_children(stream)
        return child

    def _hole(self, name: str, prev: int | None, start: int) -> bool:
        """Read again (True) after a consumer skipped a message of ``name``; see ``skipped``."""
        if not skipped(prev, self._last_stream_seq.get(name), start):
            self._rewinds.pop(name, None)
            return False
        tries = self._rewinds[name] = self._rewinds.get(name, 0) + 1
        if tries <= _MAX_REWINDS:
            log.info("stream %r: a consumer skipped stream seq %s; reading again", name, prev)
            return True
        self._rewinds.pop(name, None)
        log.warning("stream %r: stream seq %s never delivered; counted as a gap", name, prev)
        return False

    async def _deliver(self, msg: Msg, stream_seq: int, start: int) -> bool:
        try:
            decoded = decode_message(msg.subject, msg.headers, msg.data, self.settings.prefix)
        except RemoteProtocolError as exc:
            self.protocol_errors += 1
            self.metrics.protocol_errors.labels("foreign_message").inc()
            log.warning("skipped message %d on %s: %s", stream_seq, msg.subject, exc)
            return True
        name = decoded.stream
        if not fnmatchcase(name, self.pattern):
            return True
        if self._hole(name, decoded.prev, start):
            return False
        self._last_stream_seq[name] = stream_seq
        if not isinstance(decoded, ChunkMessage):
            log.info("stream %r ended (last seq %d)", name, decoded.last_seq)
            if name in self.assigned:
                self.stream_closed(name)
            return True
        m = self.metrics
        last = self.received.get(name, -1)
        if decoded.seq <= last:
            self.duplicates += 1
            m.duplicates_suppressed.labels(name).inc()
            return True
        fresh = name in self._fresh
        self._fresh.discard(name)
        if last >= 0 and decoded.seq > last + 1:
            missing = decoded.seq - last - 1
            self.gaps += missing
            m.sequence_gaps.labels(name).inc(missing)
            if fresh:  # the retention no longer reached back to where we resumed
                m.chunks_dropped.labels(name, "replay_window_exceeded").inc(missing)
            _log_gap(self._gap_logged, name, missing, decoded.seq)
        self.received[name] = decoded.seq
        self.formats[name] = decoded.format
        self.assigned.add(name)
        pending = self._unacked_seqs.setdefault(name, deque())
        pending.append((decoded.seq, stream_seq))
        if len(pending) > _MAX_UNACKED:
            pending.popleft()
        now = time.time_ns()
        chunk = Chunk(name, decoded.seq, decoded.captured_ns, decoded.format, decoded.payload, now)
        received, nbytes, latency, depth = self._child(name)
        received.inc()
        nbytes.inc(len(decoded.payload))
        latency.observe(max(0.0, (now - decoded.captured_ns) / 1e9))
        if self._queue.full():
            depth.set(self._queue.qsize())
        await self._queue.put(chunk)
        return True


def _log_gap(logged: dict[str, float], stream: str, missing: int, seq: int) -> None:
    """One line per stream every 5 s at most (the counter has every gap)."""
    now = time.monotonic()
    if now - logged.get(stream, -1e9) < 5.0:
        return
    logged[stream] = now
    log.warning("stream %r: %d chunks missing before seq %d", stream, missing, seq)


def skipped(prev: int | None, expected: int | None, start: int) -> bool:
    """Did the consumer pass over a stored message before this one?

    ``prev``: the message's ``Audiosockets-Prev`` (the stream sequence of the
    subject's previous stored message; None on the first, or for a sourced
    message). ``expected``: the stream sequence of the last message taken from
    this subject (None before the first). ``start``: the first stream sequence
    the reader asked for. A consumer reading a replica that is still catching
    up after a restart can pass over messages it does not hold yet; the reader
    then reads again with a new consumer, ``_MAX_REWINDS`` times at most, after
    which (the message is really gone: aged out) the gap is counted as usual.
    """
    if prev is None:
        return False
    return prev != expected if expected is not None else prev >= start
