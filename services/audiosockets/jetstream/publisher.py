"""``JetStreamPublisher``: ``client.Publisher``'s API and guarantees over JetStream.

Where the state lives:
- per stream, ``history``: the chunks JetStream has not acknowledged yet, oldest
  first (the spool). ``send`` appends and never blocks; beyond
  ``history_seconds`` (or ``history_bytes``) of unacknowledged audio the oldest
  not-in-flight chunks are dropped and counted (``reason="spool_full"``).
- one pump task per stream publishes the head of its spool and waits for the
  server's PubAck before the next one: JetStream stores a stream's chunks in
  seq order even when a publish fails half way (a cluster electing a leader),
  which pipelining could not promise. Streams publish concurrently.
- ``audiosockets_jetstream_publish_ack_latency_seconds{stream}``: each
  successful publish, from the call to its PubAck. The chunks not acknowledged
  yet are the spool, ``audiosockets_queue_depth_chunks{stream}`` (at most one of
  them in flight per stream).
- every chunk carries ``Nats-Msg-Id`` = (publisher identity, stream, seq); the
  identity is random per ``JetStreamPublisher`` and kept across reconnects, so a
  re-send whose first PubAck was lost is stored once (the server's duplicate
  window).
- before its first publish on a connection (and after a failure) a stream asks
  for the last stored message of its subject: chunks our identity already stored
  leave the spool; a stored seq from another identity (an earlier run under the
  same stream name) makes this run continue its numbering after it.

Invariants: ``send`` never blocks and never raises for network trouble; it raises
``Refused`` once the server refused publishing the stream (permissions), which
ends a recorder with exit status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from typing import Any

import nats.errors
import nats.js.errors
import numpy as np

from ..audio import AudioFormat
from ..client import RetryPolicy, SpooledChunk
from ..errors import ConfigError, Refused
from ..metrics import Metrics
from ..tasks import cancel_and_wait
from ..urls import NatsAddress
from .connection import NatsLink, address_of, settings_of
from .mapping import MSG_ID, SEQ, NatsSettings, chunk_headers, end_headers

log = logging.getLogger(__name__)

#: Largest chunk payload (the relay's frame limit minus its chunk header; NATS
#: itself takes 1 MiB including headers by default).
MAX_CHUNK_BYTES = (1 << 20) - 1024
_TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    TimeoutError,
    OSError,
)


class JetStreamStream:
    """One stream of a ``JetStreamPublisher``; ``send`` appends to the spool."""

    def __init__(
        self, publisher: JetStreamPublisher, index: int, name: str, fmt: AudioFormat
    ) -> None:
        self.publisher = publisher
        self.id = index
        self.name = name
        self.format = fmt
        self.subject = publisher.settings.subject(name)
        self.history: deque[SpooledChunk] = deque()
        self._seconds = 0.0
        self._bytes_held = 0  # PCM bytes in ``history``
        self.next_seq = 0
        self.dropped = 0
        self.accepted = False  # synced with the server on this connection
        #: Stream sequence of the subject's last stored message (its ``Audiosockets-Prev``).
        self.last_stored: int | None = None
        self._inflight: int | None = None
        self.wake = asyncio.Event()
        m = publisher.metrics
        m.declare_stream(name)
        self._sent = m.chunks_sent.labels(name)
        self._bytes = m.bytes_sent.labels(name)
        self._dropped = m.chunks_dropped.labels(name, "spool_full")
        self._depth = m.queue_depth.labels(name)
        self._ack_latency = m.jetstream_ack_latency.labels(name)

    @property
    def unsent(self) -> int:
        """Chunks JetStream has not acknowledged (all of ``history``)."""
        return len(self.history)

    def unsent_chunks(self) -> list[SpooledChunk]:
        """The unacknowledged chunks, oldest first (a copy; the spool is unchanged)."""
        return list(self.history)

    @property
    def spooled_seconds(self) -> float:
        """Audio not yet acknowledged, in seconds."""
        return max(0.0, self._seconds) if self.history else 0.0

    def send(
        self, samples: np.ndarray[Any, Any] | bytes | memoryview, captured_ns: int | None = None
    ) -> int:
        """Queue one chunk; returns its sequence number. Never blocks.

        Raises ``ValueError`` for samples that do not fit the stream's format and
        ``Refused`` once the server refused this stream."""
        refused = self.publisher.refused
        if refused is not None:
            raise refused
        payload = self.format.payload(samples, MAX_CHUNK_BYTES)
        seq = self.next_seq
        self.next_seq += 1
        seconds = len(payload) / (self.format.frame_bytes * self.format.rate)
        when = time.time_ns() if captured_ns is None else captured_ns
        self.history.append(SpooledChunk(seq, when, payload, seconds))
        self._seconds += seconds
        self._bytes_held += len(payload)
        self._trim()
        self._depth.set(len(self.history))
        self.wake.set()
        return seq

    def _trim(self) -> None:
        limit = self.publisher.history_seconds
        max_bytes = self.publisher.history_bytes or float("inf")
        history = self.history
        while True:
            # The chunk in flight stays: its PubAck may still come.
            i = 1 if history and history[0].seq == self._inflight else 0
            if len(history) <= i + 1 or (
                self._seconds - history[i].seconds < limit and self._bytes_held <= max_bytes
            ):
                return
            entry = history[i]
            del history[i]
            self._seconds -= entry.seconds
            self._bytes_held -= len(entry.payload)
            self.dropped += 1
            self._dropped.inc()

    def _stored(self, seq: int) -> int:
        """JetStream holds everything up to ``seq`` from us: drop it from the spool."""
        n = 0
        history = self.history
        while history and history[0].seq <= seq:
            entry = history.popleft()
            self._seconds -= entry.seconds
            self._bytes_held -= len(entry.payload)
            self._sent.inc()
            self._bytes.inc(len(entry.payload))
            n += 1
        if not history:
            self._seconds = 0.0
            self._bytes_held = 0
        self._depth.set(len(history))
        return n

    def continue_after(self, last_seq: int) -> None:
        """Another life of this stream stored ``last_seq``: number ours after it."""
        first = self.history[0].seq if self.history else self.next_seq
        if first > last_seq:
            return
        offset = last_seq + 1 - first
        for entry in self.history:
            entry.seq += offset
        self.next_seq += offset
        log.info("stream %r continues the stored numbering at seq %d", self.name, last_seq + 1)


class JetStreamPublisher:
    """Publishes named streams to a JetStream stream. Start, declare streams, send.

    Same API as ``client.Publisher``; ``url`` is ``nats://HOST:PORT[,...][?OPTIONS]``
    (options: see ``NatsSettings.from_options``) and ``token`` a NATS auth token.
    """

    role_label = "publisher"

    def __init__(
        self,
        url: str | NatsAddress,
        *,
        name: str = "publisher",
        history_seconds: float = 60.0,
        history_bytes: int | None = None,
        token: str = "",
        metrics: Metrics | None = None,
        retry: RetryPolicy | None = None,
        settings: NatsSettings | None = None,
        publish_timeout: float = 2.0,
    ) -> None:
        if history_seconds <= 0:
            raise ValueError("history_seconds must be > 0")
        self.address = address_of(url)
        self.settings = settings_of(self.address, settings)
        self.name = name
        self.metrics = metrics or Metrics()
        self.retry = retry or RetryPolicy()
        self.history_seconds = history_seconds
        #: PCM bytes the spool may hold per stream, with ``history_seconds`` (None: no bound).
        self.history_bytes = history_bytes
        self.publish_timeout = publish_timeout
        #: Random per instance, kept across reconnects: half of every Nats-Msg-Id.
        self.identity = secrets.token_hex(8)
        self.streams: dict[str, JetStreamStream] = {}
        #: Why the server will not take this publisher's audio (then ``send`` raises it).
        self.refused: Refused | ConfigError | None = None
        self.link = NatsLink(
            self.address,
            name=name,
            role_label=self.role_label,
            token=token,
            metrics=self.metrics,
            settings=self.settings,
            connect_timeout=self.retry.connect_timeout,
        )
        self.link.on_reconnect = self._reconnected
        self.connected = self.link.connected
        self._progress = asyncio.Event()
        self._ready = asyncio.Event()  # connected and the stream exists
        self._task: asyncio.Task[None] | None = None
        self._pumps: dict[str, asyncio.Task[None]] = {}

    @property
    def last_error(self) -> str | None:
        return self.link.last_error

    async def start(self) -> None:
        """Start connecting in the background; returns at once."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"publisher {self.name}")
            for stream in self.streams.values():
                self._start_pump(stream)

    async def wait_connected(self, timeout: float | None = None) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        except TimeoutError:
            return False
        return True

    def stream(self, name: str, fmt: AudioFormat) -> JetStreamStream:
        """Declare (or get) a stream. Its format is fixed for its lifetime."""
        if not name or len(name.encode("utf-8")) > 200:
            raise ValueError("stream name must be 1..200 bytes of UTF-8")
        existing = self.streams.get(name)
        if existing is not None:
            if existing.format != fmt:
                raise ValueError(f"stream {name!r} already declared as {existing.format}")
            return existing
        stream = JetStreamStream(self, len(self.streams) + 1, name, fmt)
        self.streams[name] = stream
        if self._task is not None:
            self._start_pump(stream)
        return stream

    def _pending(self) -> bool:
        return any(s.history for s in self.streams.values())

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until JetStream acknowledged every queued chunk (False on timeout
        or once the server refused a stream)."""
        try:
            async with asyncio.timeout(timeout):
                while self._pending() and self.refused is None:
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            return False
        return not self._pending()

    async def close(self, timeout: float = 2.0, *, drop_unsent: bool = True) -> None:
        """Flush what JetStream takes within ``timeout``, mark the streams ended,
        disconnect. Chunks still unacknowledged are counted as dropped
        (``reason="closed_unsent"``) unless ``drop_unsent=False``: then they stay
        in ``history`` for the caller (the recorder's disk spool)."""
        deadline = time.monotonic() + timeout
        if self._pending() and self._task is not None:
            await self.flush(timeout)
        for task in self._pumps.values():
            task.cancel()
        for task in list(self._pumps.values()):
            with contextlib.suppress(Exception):
                await cancel_and_wait(task)
        self._pumps.clear()
        js = self.link.js
        if js is not None and self._ready.is_set() and not self._pending():
            for stream in self.streams.values():
                if stream.next_seq == 0:
                    continue
                left = max(0.2, deadline - time.monotonic())
                with contextlib.suppress(*_TRANSIENT, nats.js.errors.Error, nats.errors.Error):
                    await js.publish(
                        stream.subject,
                        b"",
                        timeout=left,
                        headers=end_headers(
                            self.identity, stream.id, stream.next_seq - 1, stream.last_stored
                        ),
                    )
        for stream in self.streams.values():
            if stream.history and drop_unsent:
                n = len(stream.history)
                log.warning("stream %r: %d chunks never reached JetStream", stream.name, n)
                self.metrics.chunks_dropped.labels(stream.name, "closed_unsent").inc(n)
                stream.dropped += n
                stream.history.clear()
                stream._seconds = 0.0
                stream._bytes_held = 0
        with contextlib.suppress(Exception):
            await cancel_and_wait(self._task)
        self._task = None
        await self.link.close()

    async def __aenter__(self) -> JetStreamPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- I/O ---------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self.link.connect()
        except Refused as exc:
            self._refuse(exc)
            return
        await self._setup_stream()

    async def _setup_stream(self) -> None:
        delay = self.retry.initial
        while True:
            try:
                await self.link.ensure_stream()
                break
            except ConfigError as exc:  # missing and create=0: no retry helps
                self._refuse(exc)
                return
            except (*_TRANSIENT, nats.js.errors.APIError) as exc:
                refusal = self.link.api_refusal()
                if refusal is not None:
                    self._refuse(refusal)
                    return
                log.warning("publisher %r: cannot set up the JetStream stream: %s", self.name, exc)
                await asyncio.sleep(delay)
                delay = min(self.retry.cap, delay * 2)
        self._ready.set()

    def _start_pump(self, stream: JetStreamStream) -> None:
        self._pumps[stream.name] = asyncio.create_task(
            self._pump(stream), name=f"publish {stream.name}"
        )

    def _reconnected(self) -> None:
        for stream in self.streams.values():
            stream.accepted = False
            stream.wake.set()

    def _refuse(self, exc: Refused | ConfigError) -> None:
        if self.refused is None:
            self.refused = exc
            log.error("publisher %r: %s", self.name, exc)
        self._progress.set()

    async def _pump(self, stream: JetStreamStream) -> None:
        delay = self.retry.initial
        await self._ready.wait()
        while True:
            if not stream.history:
                self._progress.set()
                stream.wake.clear()
                await stream.wake.wait()
                continue
            js = self.link.js
            assert js is not None
            try:
                if not stream.accepted:
                    await self._sync(stream)
                entry = stream.history[0]
                stream._inflight = entry.seq
                sent_at = time.perf_counter()
                try:
                    ack = await js.publish(
                        stream.subject,
                        entry.payload,
                        timeout=self.publish_timeout,
                        headers=chunk_headers(
                            self.identity,
                            stream.id,
                            entry.seq,
                            entry.captured_ns,
                            stream.format,
                            stream.last_stored,
                        ),
                    )
                finally:
                    stream._inflight = None
            except _TRANSIENT as exc:
                refusal = self._refusal(stream)
                if refusal is not None:
                    self._refuse(refusal)
                    return
                if (
                    isinstance(exc, nats.js.errors.NoStreamResponseError)
                    and self.link.connected.is_set()
                ):
                    # No stream takes the subject (deleted under us?): create it again.
                    with contextlib.suppress(*_TRANSIENT, nats.js.errors.APIError):
                        await self.link.ensure_stream()
                stream.accepted = False  # learn what was stored before re-sending
                self.link.last_error = str(exc) or type(exc).__name__
                await asyncio.sleep(delay)
                delay = min(self.retry.cap, delay * 2)
                continue
            except nats.js.errors.NotFoundError:
                await self._setup_stream()  # the stream was deleted under us: create it again
                continue
            except nats.js.errors.APIError as exc:
                log.warning("publisher %r: JetStream refused a chunk: %s", self.name, exc)
                stream.accepted = False
                await asyncio.sleep(delay)
                delay = min(self.retry.cap, delay * 2)
                continue
            stream._ack_latency.observe(time.perf_counter() - sent_at)
            delay = self.retry.initial
            if ack.duplicate:
                log.debug("stream %r seq %d was already stored", stream.name, entry.seq)
            stream._stored(entry.seq)
            stream.last_stored = ack.seq
            self._progress.set()

    def _refusal(self, stream: JetStreamStream) -> Refused | None:
        """The server's permission violations that concern this stream, as one sentence."""
        user = self.address.user or "(anonymous)"
        if stream.subject.lower() in self.link.refused:
            return Refused(
                f"the NATS server refuses stream {stream.name!r}: user {user} may not "
                f"publish to {stream.subject}"
            )
        return self.link.api_refusal()

    async def _sync(self, stream: JetStreamStream) -> None:
        """Compare the spool with the last message stored under the stream's subject."""
        js = self.link.js
        assert js is not None
        try:
            last = await js.get_last_msg(self.settings.stream, stream.subject)
        except nats.js.errors.NotFoundError:
            stream.last_stored = None
            stream.accepted = True
            return
        stream.last_stored = last.seq
        headers = last.headers or {}
        try:
            seq = int(headers.get(SEQ, ""))
        except ValueError:
            log.warning("stream %r: the last stored message has no seq; ignored", stream.name)
            stream.accepted = True
            return
        if headers.get(MSG_ID, "").split(".", 1)[0] == self.identity:
            stream._stored(seq)
        else:
            stream.continue_after(seq)
        stream.accepted = True
