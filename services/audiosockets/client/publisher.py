"""``Publisher`` and its ``PublishedStream``s: send never blocks, the history is the spool.

Per stream, a ``History`` of the last ``history_seconds`` of chunks (sent or
not) is kept, and at most ``history_bytes`` of their PCM. While the relay is away, ``send`` keeps appending and the oldest
unsent chunks beyond the history are dropped and counted
(``reason="spool_full"``). On every (re)connect the relay answers each
OPEN_STREAM with the next sequence number it expects, and the publisher
re-sends from there, so a relay that crashed and came back empty gets
everything still in the history. Chunks written to a connection that broke
before the relay read them, and trimmed from the history before the next
session, are counted ``spool_full`` too once a relay that kept its state says
it never got them: every chunk lost before the relay is counted here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import time
from typing import Any

import numpy as np

from ..audio import AudioFormat
from ..errors import (
    AudiosocketsError,
    ConnectionClosed,
    ErrorCode,
    LocalProtocolError,
    RelayRefused,
)
from ..metrics import Metrics
from ..protocol import (
    CHUNK_HEAD,
    CloseStream,
    ErrorFrame,
    Goodbye,
    Hello,
    Limits,
    OpenStream,
    Role,
    State,
    StreamAccepted,
)
from ..transport import Channel
from ..urls import RelayAddress
from .history import History, SpooledChunk
from .session import ReconnectingClient, RetryPolicy, check_wire_name

log = logging.getLogger(__name__)


#: Runs of trimmed, sent sequence numbers a stream remembers between two
#: resumes (a new run starts only where the spool also dropped unsent audio).
MAX_TRIMMED_RUNS = 64


class PublishedStream:
    """One stream of a Publisher: ``send`` appends to the history (spool).

    Made by ``Publisher.stream``, not directly. ``history`` holds the last
    ``Publisher.history_seconds`` of audio (sent or not); the newest ``unsent``
    chunks of it are still to be written to the relay. Satisfies
    ``client.SpoolingStream``.
    """

    def __init__(self, publisher: Publisher, stream_id: int, name: str, fmt: AudioFormat) -> None:
        self.publisher = publisher
        self.id = stream_id
        self.name = name
        self.format = fmt
        self.history = History()
        self.history_seconds = 0.0
        self.history_bytes = 0  # PCM bytes in ``history``
        self._unsent = 0  # entries at the right end of history not yet written
        self._unsent_seconds = 0.0
        self.next_seq = 0
        self.accepted = False  # the relay answered OPEN_STREAM on this session
        self.ever_accepted = False  # ... on any session of this publisher run
        self.dropped = 0
        # Runs [first, last] of seqs written to the relay and trimmed from the
        # history since the relay last said what it holds: if the connection
        # broke before the relay read them, they can no longer be resent.
        self._trimmed_sent: list[list[int]] = []
        m = publisher.metrics
        m.declare_stream(name)
        self._sent = m.chunks_sent.labels(name)
        self._bytes = m.bytes_sent.labels(name)
        self._dropped = m.chunks_dropped.labels(name, "spool_full")
        self._depth = m.queue_depth.labels(name)

    def send(
        self, samples: np.ndarray[Any, Any] | bytes | memoryview, captured_ns: int | None = None
    ) -> int:
        """Queue one chunk; returns its sequence number. Never blocks.

        ``samples``: a numpy array of the stream's dtype, shape (frames,) or
        (frames, channels), or raw PCM bytes (interleaved, little-endian), a
        whole number of frames. ``captured_ns``: capture time of the first
        sample, wall clock in ns (default: now). When the spool holds more than
        ``history_seconds`` or ``history_bytes`` the oldest chunks go; unsent ones are counted as
        dropped (``reason="spool_full"``).

        Raises:
            ValueError: wrong dtype or channel count, no frame or a partial one, or a
                chunk larger than ``Limits.max_frame_size`` minus the 20-byte
                chunk head (the relay would refuse the frame).
        """
        payload = self.format.payload(
            samples, self.publisher.limits.max_frame_size - CHUNK_HEAD.size
        )
        seq = self.next_seq
        self.next_seq += 1
        seconds = len(payload) / (self.format.frame_bytes * self.format.rate)
        when = time.time_ns() if captured_ns is None else captured_ns
        self.history.append(SpooledChunk(seq, when, payload, seconds))
        self.history_seconds += seconds
        self.history_bytes += len(payload)
        self._unsent += 1
        self._unsent_seconds += seconds
        self._trim()
        self._depth.set(self.unsent)
        self.publisher._wake.set()
        return seq

    def _trim(self) -> None:
        limit = self.publisher.history_seconds
        max_bytes = self.publisher.history_bytes or float("inf")
        history = self.history
        while len(history) > 1 and (
            self.history_seconds - history[0].seconds >= limit or self.history_bytes > max_bytes
        ):
            entry = history.popleft()
            self.history_seconds -= entry.seconds
            self.history_bytes -= len(entry.payload)
            if self._unsent > len(history):  # it was never sent: audio lost
                self._unsent -= 1
                self._unsent_seconds -= entry.seconds
                self.dropped += 1
                self._dropped.inc()
            else:
                runs = self._trimmed_sent
                if runs and runs[-1][1] + 1 == entry.seq:
                    runs[-1][1] = entry.seq
                else:
                    runs.append([entry.seq, entry.seq])
                    if len(runs) > MAX_TRIMMED_RUNS:
                        del runs[0]

    def resume_from(self, next_seq: int) -> None:
        """The relay holds everything before ``next_seq``: send the rest.

        A publisher run numbers its chunks from 0 until the relay first answers
        for the stream; that first answer (this run has sent nothing yet) shifts
        every number by ``next_seq``, so whatever this run captured before it
        connected continues the stream's numbering and none of it is taken for a
        duplicate of an earlier run's chunks. Later answers are resumes: when the
        relay expects more than we ever numbered (another run published the
        stream while we were away), continue at ``next_seq`` the same way.
        """
        if not self.ever_accepted:
            self.ever_accepted = True
            if next_seq:
                for entry in self.history:
                    entry.seq += next_seq
                self.next_seq += next_seq
                log.info("stream %r continues the relay's numbering at seq %d", self.name, next_seq)
        elif next_seq > self.next_seq:
            first_unsent = self.history[-self.unsent].seq if self.unsent else self.next_seq
            offset = next_seq - first_unsent
            for entry in self.history:
                entry.seq += offset
            self.next_seq += offset
            log.info("stream %r continues the relay's numbering at seq %d", self.name, next_seq)
        self._count_unconfirmed(next_seq)
        n = 0
        for entry in reversed(self.history):
            if entry.seq < next_seq:
                break
            n += 1
        self.unsent = n
        self.accepted = True

    def _count_unconfirmed(self, next_seq: int) -> None:
        """Chunks written to a connection that broke before the relay read them
        (it holds up to ``next_seq - 1``) and that have left the history since:
        lost at the source, like the never-sent ones the spool dropped
        (``reason="spool_full"``). A relay without the stream (``next_seq`` 0,
        e.g. restarted) cannot say what it got, and nothing is counted."""
        runs, self._trimmed_sent = self._trimmed_sent, []
        if next_seq <= 0:
            return
        lost = sum(last - max(first, next_seq) + 1 for first, last in runs if last >= next_seq)
        if not lost:
            return
        self.dropped += lost
        self._dropped.inc(lost)
        log.warning(
            "stream %r: %d chunk(s) sent before the connection broke never reached the relay "
            "and have left the spool",
            self.name,
            lost,
        )

    @property
    def unsent(self) -> int:
        """Entries at the end of ``history`` not yet written to the relay."""
        return self._unsent

    @unsent.setter
    def unsent(self, n: int) -> None:
        """Mark the newest ``n`` chunks (clamped to 0..len(history)) as unsent."""
        n = max(0, min(n, len(self.history)))
        self._unsent = n
        self._unsent_seconds = sum(
            self.history[i].seconds for i in range(len(self.history) - n, len(self.history))
        )

    def take(self, budget: int, max_payload: int | None = None) -> list[SpooledChunk]:
        """Take the oldest unsent chunks, up to ``budget`` payload bytes (at least
        one chunk), and count them as sent. Nothing before the relay accepted
        the stream on this session. The chunks stay in ``history``.

        A chunk larger than ``max_payload`` (the relay's limit) is never taken:
        ``ChunkTooLarge`` once the chunks before it are.
        """
        out: list[SpooledChunk] = []
        if not self.accepted or not self.unsent:
            return out
        history = self.history
        for i in range(len(history) - self._unsent, len(history)):
            entry = history[i]
            if max_payload is not None and len(entry.payload) > max_payload:
                if out:
                    break
                raise ChunkTooLarge(self.name, self.format, len(entry.payload), max_payload)
            out.append(entry)
            self._unsent_seconds -= entry.seconds
            budget -= len(entry.payload)
            if budget <= 0:
                break
        self._unsent -= len(out)
        if not self._unsent:
            self._unsent_seconds = 0.0  # no float drift left behind
        self._depth.set(self._unsent)
        return out

    @property
    def spooled_seconds(self) -> float:
        """Audio not yet sent, in seconds."""
        return max(0.0, self._unsent_seconds)

    def unsent_chunks(self) -> list[SpooledChunk]:
        """The ``unsent`` chunks at the end of ``history``, oldest first.

        A new list (the spool is unchanged); each entry carries ``seq``,
        ``captured_ns`` (wall clock, ns), ``payload`` (PCM bytes) and
        ``seconds``. The recorder saves these to its disk spool on close.
        """
        history = self.history
        n = len(history)
        return [history[i] for i in range(n - self._unsent, n)]


class Publisher(ReconnectingClient):
    """Publishes named streams to a relay. Start, declare streams, send.

    Args:
        url: the relay, ``tcp://host:port`` (or a parsed ``RelayAddress``).
        name: this client's name in HELLO and the relay's status report.
        history_seconds: audio kept per stream for re-sending after a
            reconnect (the spool), in seconds; > 0, else ValueError.
        history_bytes: the most PCM bytes that history may hold per stream,
            whichever of the two is reached first (None: seconds only).
        token: HELLO token: the relay's shared ``--token``, or this client's
            token from its ``--credentials`` file.
        tls: the ``ssl.SSLContext`` for a ``tls://`` relay
            (``audiosockets.tls.client_context``: CA, client certificate);
            None: the system's trust store, host name checked.
        metrics: where to count (a fresh ``Metrics()`` by default).
        retry: reconnect backoff (``RetryPolicy()`` by default).
        limits: protocol limits; ``max_frame_size`` bounds one chunk.
        max_batch_bytes: payload bytes written per stream before draining
            the socket (256 KiB).
        instance: this publisher run's id in HELLO (random and non-zero by
            default; the same on every reconnect). The relay gives a stream back
            at once to the same run and refuses any other while one holds it.

    After a refusal no retry can change (``failure``, ``failed``: a wrong token, a
    role or stream not allowed, a certificate refused, a stream another publisher
    holds, a chunk over the relay's frame limit), the
    publisher stops; ``flush`` then returns False at once.
    """

    role = Role.PUBLISHER

    def __init__(
        self,
        url: str | RelayAddress,
        *,
        name: str = "publisher",
        history_seconds: float = 60.0,
        history_bytes: int | None = None,
        token: str = "",
        tls: ssl.SSLContext | None = None,
        metrics: Metrics | None = None,
        retry: RetryPolicy | None = None,
        limits: Limits | None = None,
        max_batch_bytes: int = 256 << 10,
        instance: int | None = None,
    ) -> None:
        super().__init__(
            url,
            name=name,
            token=token,
            metrics=metrics,
            retry=retry,
            limits=limits,
            tls=tls,
        )
        if history_seconds <= 0:
            raise ValueError("history_seconds must be > 0")
        #: This publisher run, in HELLO: random (non-zero), the same on every reconnect.
        self.instance = instance if instance else secrets.randbits(64) or 1
        #: Largest PCM payload per CHUNK, from the relay's WELCOME once connected.
        self.max_payload: int | None = None
        self.history_seconds = history_seconds
        self.history_bytes = history_bytes
        self.max_batch_bytes = max_batch_bytes
        self.streams: dict[str, PublishedStream] = {}
        self._by_id: dict[int, PublishedStream] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()

    def _hello(self) -> Hello:
        return Hello(self.role, self.name, self.token, self.instance)

    def _fail(self, failure: AudiosocketsError) -> None:
        super()._fail(failure)
        self._idle.set()  # flush() returns (False) instead of waiting on a dead session

    def stream(self, name: str, fmt: AudioFormat) -> PublishedStream:
        """Declare (or get) a stream. Its format is fixed for its lifetime.

        Raises ValueError for a name that is empty or over
        ``Limits.max_name_length`` bytes of UTF-8, or a name already declared
        with another format.
        """
        if not name:
            raise ValueError("stream name must not be empty")
        check_wire_name(name, "stream name", self.limits)
        existing = self.streams.get(name)
        if existing is not None:
            if existing.format != fmt:
                raise ValueError(f"stream {name!r} already declared as {existing.format}")
            return existing
        stream = PublishedStream(self, len(self.streams) + 1, name, fmt)
        self.streams[name] = stream
        self._by_id[stream.id] = stream
        channel = self.channel
        if channel is not None and not channel.closed:
            channel.send(OpenStream(stream.id, name, fmt))
        return stream

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until the relay has taken every queued chunk.

        Taken means written to the relay's socket *and* confirmed by a PING/PONG
        round trip behind them on the same session (the relay answers a PING after
        handling every frame before it), so a chunk the relay refused, or one lost
        with a session that broke, is never reported as taken: after a reconnect
        the relay says what it lacks and it is sent again.

        Returns False if ``timeout`` seconds passed first (None: no limit), or at
        once when the publisher has failed (a refusal).
        """
        try:
            async with asyncio.timeout(timeout):
                while True:
                    while self._pending():
                        if self.failure is not None:
                            return False
                        self._idle.clear()
                        self._wake.set()
                        await self._idle.wait()
                    if self.failure is not None:
                        return False
                    if await self._confirmed():
                        return True
        except TimeoutError:
            return False

    async def _confirmed(self) -> bool:
        """One round trip on the current session after everything written; False
        if there is no session (it is awaited) or it ended before the answer."""
        channel = self.channel
        if channel is None or channel.closed or not self.connected.is_set():
            waiters = [asyncio.ensure_future(self.connected.wait())]
            waiters.append(asyncio.ensure_future(self.failed.wait()))
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
            return False  # look again: the new session may have chunks to re-send
        try:
            await channel.round_trip()
        except (ConnectionClosed, LocalProtocolError):
            await asyncio.sleep(0)  # let the session's end be handled first
            return False
        return not self._pending()

    def _pending(self) -> bool:
        return any(s.unsent for s in self.streams.values())

    async def close(self, timeout: float = 2.0, *, drop_unsent: bool = True) -> None:
        """Flush what the relay can take within ``timeout`` (connecting first if
        need be), end the streams, say goodbye, stop. Subscribers get
        CLOSE_STREAM after the last chunk. Chunks still unsent after
        ``timeout`` are counted as dropped (``reason="closed_unsent"``), unless
        ``drop_unsent=False``: then they stay in ``history`` for the caller
        to keep (the recorder's disk spool does)."""
        if self._pending() and self._task is not None and self.failure is None:
            await self.flush(timeout)
        channel = self.channel
        if channel is not None and not channel.closed and not self._pending():
            for stream in self.streams.values():
                with contextlib.suppress(Exception):
                    channel.send(CloseStream(stream.id))
        for stream in self.streams.values():
            if stream.unsent and drop_unsent:
                log.warning(
                    "stream %r: %d chunk(s) never reached the relay", stream.name, stream.unsent
                )
                self.metrics.chunks_dropped.labels(stream.name, "closed_unsent").inc(stream.unsent)
                stream.dropped += stream.unsent
                stream.unsent = 0
        await self._stop_task(farewell=True)

    async def __aenter__(self) -> Publisher:
        """``start()`` and return self; connecting goes on in the background."""
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """``close()`` with its defaults."""
        await self.close()

    async def _session(self, channel: Channel) -> None:
        welcome = channel.conn.welcome
        if welcome is not None:
            self.max_payload = welcome.max_frame_size - CHUNK_HEAD.size
        for stream in self.streams.values():
            stream.accepted = False
            channel.send(OpenStream(stream.id, stream.name, stream.format))
        reader = asyncio.create_task(self._read_loop(channel))
        writer = asyncio.create_task(self._write_loop(channel))
        try:
            done, _ = await asyncio.wait([reader, writer], return_when=asyncio.FIRST_EXCEPTION)
            # The reader's end first: when the relay refused us, that is the cause,
            # and whatever the writer then hit is a consequence.
            for task in sorted(done, key=lambda t: t is not reader):
                task.result()
        finally:
            reader.cancel()
            writer.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(reader, writer, return_exceptions=True)

    async def _read_loop(self, channel: Channel) -> None:
        while True:
            event = await channel.next_event()
            if isinstance(event, StreamAccepted):
                stream = self._by_id.get(event.stream_id)
                if stream is None:
                    continue
                stream.resume_from(event.next_seq)
                if all(s.accepted for s in self.streams.values()):
                    self.connected.set()
                    self.metrics.connected.labels(self.role.label).set(1)
                self._wake.set()
            elif isinstance(event, Goodbye | ErrorFrame):
                raise ConnectionClosed(f"relay ended the session: {event.message}", event.code)
            elif isinstance(event, CloseStream):
                log.warning("relay closed stream id %d (%s)", event.stream_id, event.reason.name)

    async def _write_loop(self, channel: Channel) -> None:
        if not self.streams:
            self.connected.set()
            self.metrics.connected.labels(self.role.label).set(1)
        conn = channel.conn
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                frames: list[bytes] = []
                if conn.state is not State.OPEN:  # the relay ended the session
                    raise ConnectionClosed("the relay closed the session")
                for stream in list(self.streams.values()):
                    entries = stream.take(self.max_batch_bytes, self.max_payload)
                    if not entries:
                        continue
                    nbytes = 0
                    for e in entries:
                        frames.append(conn.chunk_frame(stream.id, e.seq, e.captured_ns, e.payload))
                        nbytes += len(e.payload)
                    stream._sent.inc(len(entries))
                    stream._bytes.inc(nbytes)
                if not frames:
                    break
                channel.writelines(frames)
                await channel.drain()
            if not self._pending():
                self._idle.set()

    def _session_ended(self) -> None:
        for stream in self.streams.values():
            stream.accepted = False


class ChunkTooLarge(RelayRefused):
    """A chunk does not fit the frame limit the relay announced in WELCOME (exit 2).

    ``chunk_bytes``: its PCM; ``max_payload``: the most PCM bytes a CHUNK may carry;
    ``fits_frames``: the most frames of the stream a chunk may hold.
    """

    def __init__(self, stream: str, fmt: AudioFormat, chunk_bytes: int, max_payload: int) -> None:
        self.stream = stream
        self.chunk_bytes = chunk_bytes
        self.max_payload = max_payload
        self.fits_frames = max(0, max_payload) // fmt.frame_bytes
        super().__init__(
            f"chunks of stream {stream} are {chunk_bytes} bytes "
            f"({chunk_bytes // fmt.frame_bytes} frames of {fmt}) but the relay takes at most "
            f"{max_payload} bytes of audio per chunk ({self.fits_frames} frames)",
            ErrorCode.FRAME_TOO_LARGE,
        )
