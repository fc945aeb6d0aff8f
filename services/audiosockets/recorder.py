"""The recorder: one source -> one ``Publisher`` stream, and capture never waits.

Invariants:
- The capture loop only awaits the source. ``stream.send`` never blocks and never
  raises on network trouble: while the relay is away the Publisher keeps
  ``spool_seconds`` of audio in its history (the spool) and re-sends it in order on
  reconnect; beyond that it drops the oldest unsent chunks and counts them
  (``reason="spool_full"``).
- A device that vanishes is reopened with tenacity (backoff, no limit while running);
  the silence in between is counted as a capture gap (count and seconds), never
  filled in and never a crash. A bad source at start-up is an error, not a retry.
- Source counters (PortAudio overflows, hand-off ring drops) are cumulative over
  the source's life, reopenings included; the capture loop copies their deltas
  into Prometheus, so the audio callback never touches a metric.
- With ``spool_dir`` the Publisher keeps at most ``memory_seconds`` in memory and
  the rest of the ``spool_seconds`` waits in a ``DiskSpool``: once anything is on
  disk, new blocks go to disk too (order is kept), and a drain task moves them to
  the Publisher a batch at a time, each batch after the relay took the previous
  one. Audio still on disk at exit is sent first by the next run.
- What a crash loses (README, "Spool"): a clean stop moves the memory part to disk
  (``keep_unsent_on_disk``); a SIGKILL cannot, so it loses what the Publisher held
  and the relay had not confirmed, at most ``history_seconds``. Disk records are
  flushed to the OS one by one and fsynced only at a clean stop: they survive a
  process kill, and a power cut after a clean stop, not necessarily one mid-run.
- Stopping: ``stop()`` sets an event; ``run`` then cancels capture, flushes what the
  relay takes within ``flush_timeout`` and closes the Publisher.

State: the source, the Publisher and its stream handle, the disk spool live on the
``Recorder``; metrics live on ``RecorderMetrics`` (``recorder_metrics.py``, on the
service's registry).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import signal
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from .audio import AudioFormat, DTypeName, SampleType
from .audio_diagnose import explain_capture_failure
from .client.interfaces import SpoolingStream
from .errors import ConfigError, DeviceError, Refused
from .filenames import stream_stem
from .metrics import CallbackCollector, Metrics
from .protocol import CHUNK_HEAD, Limits
from .recorder_metrics import RecorderMetrics, spool_gauges
from .service import STOP_SIGNALS, run_service
from .sources import Clock, DeviceLost, Source, block_frames_for, parse_source
from .spool import DiskSpool
from .tasks import cancel_and_wait
from .urls import check_url, redact

if TYPE_CHECKING:
    from .metrics_http import MetricsEndpoint

log = logging.getLogger(__name__)


class PublisherLike(Protocol):
    """The part of ``client.Publisher`` the recorder uses (see ARCHITECTURE.md)."""

    async def start(self) -> None: ...

    def stream(self, name: str, fmt: AudioFormat) -> SpoolingStream: ...

    async def flush(self, timeout: float | None = ...) -> bool: ...

    async def close(self, timeout: float = ..., *, drop_unsent: bool = ...) -> None: ...


#: With ``--spool-dir``, the audio the Publisher holds in memory unless told otherwise.
DEFAULT_MEMORY_SECONDS: Final = 10.0


@dataclass(frozen=True, slots=True)
class RecorderConfig:
    """Everything ``audiosockets record`` takes."""

    relay: str = "tcp://127.0.0.1:7400"
    stream: str = "mic-1"
    source: str = "device"
    rate: int = 16000
    channels: int = 1
    dtype: DTypeName = "int16"
    block_ms: float = 20.0
    spool_seconds: float = 60.0
    #: Optional directory for a disk spool (then ``spool_seconds`` is on disk).
    spool_dir: Path | None = None
    #: With ``spool_dir``: the most audio the Publisher keeps in memory (None:
    #: ``DEFAULT_MEMORY_SECONDS``); a SIGKILL or power cut loses up to this much.
    memory_seconds: float | None = None
    #: The most audio the Publisher keeps in memory in MiB, with the seconds above:
    #: whichever is reached first drops the oldest (``spool_full``).
    spool_max_mib: float = 512.0
    name: str | None = None
    token: str | None = None
    #: The TLS context for a ``tls://`` relay (``tls.client_context``); None: defaults.
    tls: ssl.SSLContext | None = None
    flush_timeout: float = 2.0
    #: Longest wait between two attempts to reopen a lost device.
    retry_max_wait: float = 2.0

    @property
    def format(self) -> AudioFormat:
        try:
            return AudioFormat(self.rate, self.channels, SampleType.parse(self.dtype))
        except ValueError as err:
            raise ConfigError(str(err)) from err

    @property
    def block_frames(self) -> int:
        return block_frames_for(self.rate, self.block_ms)

    @property
    def history_seconds(self) -> float:
        """Seconds of audio the Publisher keeps in memory: ``spool_seconds`` without
        ``spool_dir``, else ``memory_seconds`` clamped to ``spool_seconds``."""
        if self.spool_dir is None:
            return self.spool_seconds
        memory = DEFAULT_MEMORY_SECONDS if self.memory_seconds is None else self.memory_seconds
        return min(self.spool_seconds, memory)

    @property
    def client_name(self) -> str:
        """The name the relay shows for this recorder (``--name``, else ``recorder-STREAM``)."""
        return self.name or f"recorder-{self.stream}"

    def validate(self) -> None:
        """Every value checked before anything is opened or sent (``ConfigError``)."""
        if not self.stream:
            raise ConfigError("--stream must not be empty")
        check_url(self.relay)
        from .client import check_wire_names

        check_wire_names(
            {
                "--stream": self.stream,
                "--name" if self.name else "the client name (shorten --stream or set --name)": (
                    self.client_name
                ),
                "--token": self.token or "",
            }
        )
        if not self.spool_seconds > 0:
            raise ConfigError(f"--spool-seconds must be positive, got {self.spool_seconds:g}")
        if self.memory_seconds is not None:
            if self.spool_dir is None:
                raise ConfigError(
                    "--spool-memory-seconds needs --spool-dir (without it the whole "
                    "--spool-seconds is held in memory)"
                )
            if not self.memory_seconds > 0:
                raise ConfigError(
                    f"--spool-memory-seconds must be positive, got {self.memory_seconds:g}"
                )
        self.format  # noqa: B018 - validates rate/channels/dtype
        chunk_bytes = self.block_frames * self.format.frame_bytes
        if chunk_bytes > self.spool_max_mib * 2**20:
            raise ConfigError(
                f"one chunk of --block-ms {self.block_ms:g} is {chunk_bytes} bytes, more than "
                f"--spool-max-mib {self.spool_max_mib:g} holds: raise it or lower --block-ms"
            )
        room = Limits().max_frame_size - CHUNK_HEAD.size
        if chunk_bytes > room:
            raise ConfigError(
                f"one chunk of --block-ms {self.block_ms:g} at {self.rate} Hz, {self.channels} ch, "
                f"{self.dtype} is {chunk_bytes} bytes; a frame carries at most {room}: "
                "lower --block-ms"
            )


def _make_publisher(config: RecorderConfig, metrics: Metrics) -> PublisherLike:
    from .connect import connect_publisher

    publisher: PublisherLike = connect_publisher(
        config.relay,
        name=config.client_name,
        history_seconds=config.history_seconds,
        history_bytes=int(config.spool_max_mib * 2**20),
        metrics=metrics,
        token=config.token or "",
        tls=config.tls,
    )
    return publisher


def keep_unsent_on_disk(stream: SpoolingStream | None, disk: DiskSpool, metrics: Metrics) -> None:
    """Save what the closed Publisher never sent of ``stream``, ahead of the disk
    spool; what the spool cannot hold is counted dropped (``reason="spool_full"``)."""
    if stream is None or not stream.unsent:
        return
    entries = stream.unsent_chunks()
    dropped = disk.prepend([(bytes(e.payload), int(e.captured_ns)) for e in entries])
    if dropped:
        metrics.chunks_dropped.labels(stream.name, "spool_full").inc(dropped)
    log.info("%d unsent chunks kept on disk for the next run", len(entries))


class Recorder:
    """Capture from a source and publish every block, whatever the relay does."""

    def __init__(
        self,
        config: RecorderConfig,
        *,
        metrics: Metrics | None = None,
        source: Source | None = None,
        publisher: PublisherLike | None = None,
        clock: Clock | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.format = config.format
        self.metrics = metrics if metrics is not None else Metrics()
        self.recorder_metrics = RecorderMetrics(self.metrics.registry)
        self.source = (
            source
            if source is not None
            else parse_source(config.source, self.format, config.block_frames, clock=clock)
        )
        if self.source.format != self.format:
            raise ConfigError(
                f"source format {self.source.format} is not the stream's {self.format}"
            )
        self.publisher = (
            publisher if publisher is not None else _make_publisher(config, self.metrics)
        )
        self._stream: SpoolingStream | None = None
        self._stopping = asyncio.Event()
        self._capture: asyncio.Task[None] | None = None
        self._seen_overflows = 0
        self._seen_dropped = 0
        self._last_end_ns: int | None = None
        self._gap_pending = False
        #: Blocks captured and handed on (to the publisher or the disk spool).
        self.blocks_captured = 0
        #: The last seq the publisher returned.
        self.last_seq: int | None = None
        self.disk: DiskSpool | None = None
        self._disk_pending = asyncio.Event()
        self._drain: asyncio.Task[None] | None = None
        self._closed: bool | None = None  # the result of close(), once it ran
        block_seconds = config.block_frames / self.format.rate
        #: Most chunks the publisher may hold unsent before new ones go to disk.
        self.high_water = max(1, int(config.history_seconds / 2 / block_seconds))
        if config.spool_dir is not None:
            self.disk = DiskSpool(
                config.spool_dir / _safe_name(config.stream), self.format, config.spool_seconds
            )
            _explain_memory_part(config)
        name = config.stream
        self.metrics.declare_stream(name)
        self.recorder_metrics.declare_stream(name)
        self.metrics.registry.register(
            CallbackCollector(lambda: spool_gauges(name, *self.spool_depth()))
        )

    # --- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Open the source (errors are raised here), start publishing and capturing."""
        try:
            await self.source.open()
        except DeviceError as err:
            raise explain_capture_failure(err) from err
        try:
            await self.publisher.start()
            self._stream = self.publisher.stream(self.config.stream, self.format)
        except BaseException:
            await self.source.close()
            raise
        if self.disk is not None:
            if self.disk.chunks:
                log.info(
                    "%.1f s of audio left on disk by an earlier run is sent first",
                    self.disk.seconds,
                )
                self._disk_pending.set()
            self._drain = asyncio.create_task(self._drain_disk(), name="recorder-disk-drain")
        self._capture = asyncio.create_task(self._capture_loop(), name="recorder-capture")
        log.info(
            "recording %s -> %s as %r",
            self.source.description,
            redact(self.config.relay),
            self.config.stream,
        )

    def request_stop(self) -> None:
        """Ask ``serve_forever`` to return (safe from a signal handler); ``stop`` drains."""
        self._stopping.set()

    async def serve_forever(self) -> None:
        """Return when stopped or when a finite source has ended.

        Raises what ended the capture, or the publisher's failure: a refusal of the
        relay that no retry can change (``RelayRefused``: its token, role, stream or
        certificate, a stream another publisher holds; a chunk too large for the
        relay's frame limit becomes a ``ConfigError`` naming the block length that fits).
        """
        assert self._capture is not None, "start() first"
        failed: asyncio.Event | None = getattr(self.publisher, "failed", None)  # a refusal
        events = (self._stopping, failed)
        waiters = {asyncio.create_task(e.wait()) for e in events if e is not None}
        try:
            await asyncio.wait({self._capture, *waiters}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if self._capture.done() and not self._capture.cancelled():
            self._capture.result()  # re-raise a capture failure
        failure = getattr(self.publisher, "failure", None)
        if failure is not None:
            raise in_recorder_terms(failure, self.config)

    async def stop(self) -> bool:
        """Stop capturing, flush within ``flush_timeout``, close. True if all was taken.

        Safe to call twice (the second call returns the first one's result); after
        ``stop`` whatever the relay did not take stays in the disk spool, if any."""
        if self._closed is not None:
            return self._closed
        self._closed = False
        self._stopping.set()
        if self._capture is not None and not self._capture.done():
            await cancel_and_wait(self._capture)
        await self.source.close()
        await cancel_and_wait(self._drain)
        flushed = False
        deadline = time.monotonic() + self.config.flush_timeout
        try:
            flushed = await self._flush_all(deadline)
        except Refused:
            flushed = False  # serve_forever raises it; what is unsent stays on disk
        finally:
            await self.publisher.close(
                timeout=max(0.0, deadline - time.monotonic()), drop_unsent=self.disk is None
            )
            if self.disk is not None:
                keep_unsent_on_disk(self._stream, self.disk, self.metrics)
                self.disk.close()
        if flushed:
            log.info(
                "recorder stopped: %d chunk(s) captured, all taken by the relay",
                self.blocks_captured,
            )
        else:
            kept = f"; {self.disk.seconds:.1f} s stay on disk" if self.disk else ""
            refused = getattr(self.publisher, "failure", None) is not None
            why = (
                " (it refused the session)"
                if refused
                else f" within {self.config.flush_timeout:g} s"
            )
            if self.blocks_captured == 0:
                log.warning("recorder stopped before it captured any audio")
            else:
                log.warning(
                    "recorder stopped: %d chunk(s) captured, the relay did not take all%s%s",
                    self.blocks_captured,
                    why,
                    kept,
                )
        self._closed = flushed
        return flushed

    async def _flush_all(self, deadline: float) -> bool:
        """Move the disk spool to the publisher and flush, until done or ``deadline``."""
        while True:
            self._feed_from_disk()
            left = max(0.0, deadline - time.monotonic())
            flushed = await self.publisher.flush(timeout=left)
            if not flushed or self.disk is None or not self.disk.chunks:
                return flushed and (self.disk is None or not self.disk.chunks)

    async def run(
        self,
        *,
        ready: Callable[[Recorder], object] | None = None,
        signals: Iterable[signal.Signals] = STOP_SIGNALS,
    ) -> bool:
        """``start``, ``serve_forever``, ``stop`` with SIGINT/SIGTERM/SIGHUP handling
        (``run_service``); returns whether the final flush completed."""
        await run_service(self, ready=ready, signals=signals)
        return self._closed is True

    # --- capture -----------------------------------------------------------------

    async def _capture_loop(self) -> None:
        source = self.source
        while not self._stopping.is_set():
            try:
                block = await source.read()
            except DeviceLost as err:
                log.warning("%s; reopening", err)
                self._account_source_counters()
                await self._reopen()
                continue
            self._account_source_counters()
            if block is None:
                log.info("source %s ended", source.description)
                return
            self._publish(block.samples, block.captured_ns, block.frames)

    def _publish(self, samples: Any, captured_ns: int, frames: int) -> None:
        name = self.config.stream
        m = self.recorder_metrics
        block_ns = frames * 1_000_000_000 // self.format.rate
        if self._gap_pending and self._last_end_ns is not None:
            self._gap_pending = False
            m.capture_gaps.labels(name).inc()
            m.capture_gap_seconds.labels(name).inc(max(0, captured_ns - self._last_end_ns) / 1e9)
        self._last_end_ns = captured_ns + block_ns
        m.frames_captured.labels(name).inc(frames)
        disk, stream = self.disk, self._stream
        assert stream is not None, "start() opens the stream before capturing"
        if disk is not None and (disk.chunks or stream.unsent >= self.high_water):
            dropped = disk.append(samples, captured_ns)
            if dropped:
                self.metrics.chunks_dropped.labels(name, "spool_full").inc(dropped)
            self._disk_pending.set()
        else:
            self.last_seq = stream.send(samples, captured_ns=captured_ns)
        self.blocks_captured += 1
        m.capture_to_send_latency.labels(name).observe(
            max(0.0, (time.time_ns() - captured_ns - block_ns) / 1e9)
        )

    # --- disk spool ---------------------------------------------------------------

    def _feed_from_disk(self) -> None:
        """Move the oldest chunks from disk to the publisher, up to ``high_water`` unsent."""
        disk, stream = self.disk, self._stream
        if disk is None or stream is None:
            return
        while disk.chunks and stream.unsent < self.high_water:
            block = disk.pop()
            if block is None:
                break
            self.last_seq = stream.send(block.samples, captured_ns=block.captured_ns)

    async def _drain_disk(self) -> None:
        disk = self.disk
        assert disk is not None
        while True:
            await self._disk_pending.wait()
            self._feed_from_disk()
            if not disk.chunks:
                self._disk_pending.clear()
                continue
            # Wait (without a timer) until the relay has taken this batch.
            await self.publisher.flush(timeout=None)

    def _account_source_counters(self) -> None:
        """Count the source's new overflows and capture-queue drops (the source
        keeps running totals; the audio callback cannot touch metrics)."""
        name, source = self.config.stream, self.source
        if delta := source.overflows - self._seen_overflows:
            self.recorder_metrics.input_overflows.labels(name).inc(delta)
            self.metrics.chunks_dropped.labels(name, "input_overflow").inc(delta)
        if dropped := source.dropped - self._seen_dropped:
            self.metrics.chunks_dropped.labels(name, "capture_queue_full").inc(dropped)
        self._seen_overflows, self._seen_dropped = source.overflows, source.dropped

    async def _reopen(self) -> None:
        await self.source.close()
        self._gap_pending = True
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(DeviceError),
            wait=wait_exponential(multiplier=0.1, max=self.config.retry_max_wait),
            reraise=True,
        ):
            with attempt:
                if self._stopping.is_set():
                    return
                try:
                    await self.source.open()
                except DeviceError as err:
                    log.warning("cannot reopen %s: %s", self.source.description, err)
                    raise

    # --- metrics ------------------------------------------------------------------

    def spool_depth(self) -> tuple[int, float]:
        """Chunks (and seconds of audio) the publisher holds that the relay has not taken."""
        stream = self._stream
        if stream is None:
            return 0, 0.0
        chunks, seconds = stream.unsent, stream.spooled_seconds
        if self.disk is not None:
            chunks += self.disk.chunks
            seconds += self.disk.seconds
        return chunks, seconds


# --- entry points for the CLI ---------------------------------------------------


async def record(
    config: RecorderConfig, *, metrics_port: int = 0, endpoint: MetricsEndpoint | None = None
) -> bool:
    """Run a recorder until SIGTERM/SIGINT/SIGHUP or the end of a finite source.

    ``metrics_port`` 0 disables the metrics endpoint; ``endpoint`` says where
    (host, default 127.0.0.1) and whether over TLS. Returns whether the final
    flush completed; errors a user can cause raise ``AudiosocketsError``.
    """
    from .health import Health, session_ready
    from .metrics import serve_metrics
    from .metrics_http import MetricsEndpoint

    endpoint = endpoint or MetricsEndpoint()
    tls = endpoint.context()  # unusable files: ConfigError before anything starts
    metrics = Metrics()
    recorder = Recorder(config, metrics=metrics)
    if metrics_port > 0:
        health = Health.watch_running_loop(session_ready(metrics.registry, "publisher"))
        host = endpoint.host or "127.0.0.1"
        serve_metrics(metrics_port, metrics.registry, host, health=health, tls=tls)
    return await recorder.run()


def in_recorder_terms(failure: BaseException, config: RecorderConfig) -> BaseException:
    """The publisher's failure as the recorder's user can act on it: a chunk over the
    relay's frame limit (``fits_frames``) or refused by the relay for its seconds (its
    ``--max-chunk-seconds``, read from the FRAME_TOO_LARGE sentence) becomes a
    ``ConfigError`` naming the ``--block-ms`` that fits (rounded down to 0.1 ms);
    anything else is unchanged."""
    fmt = config.format
    block_bytes = config.block_frames * fmt.frame_bytes
    fits = getattr(failure, "fits_frames", None)
    if isinstance(fits, int):
        limit = getattr(failure, "max_payload", 0)
        return ConfigError(
            f"the relay takes at most {limit} bytes of audio per chunk ({fits} frames of "
            f"{fmt}), but a {config.block_ms:g} ms block is {block_bytes} bytes; "
            f"{_block_advice(fits, fmt.rate, '--max-frame-bytes')}"
        )
    found = _CHUNK_SECONDS.search(str(failure))
    if not isinstance(failure, Refused) or found is None:
        return failure
    fits = (int(found["limit"]) - CHUNK_HEAD.size) // fmt.frame_bytes
    return ConfigError(
        f"the relay takes at most {found['seconds']} s of audio per chunk (its "
        f"--max-chunk-seconds; {fits} frames of {fmt}), but a {config.block_ms:g} ms block is "
        f"{config.block_frames} frames; {_block_advice(fits, fmt.rate, '--max-chunk-seconds')}"
    )


#: The relay's FRAME_TOO_LARGE sentence for a CHUNK over its stream's seconds
#: (``protocol.frames.CHUNK_SECONDS_TEXT``; WELCOME does not carry them).
_CHUNK_SECONDS = re.compile(
    r"limit of (?P<limit>\d+) for its stream: at most (?P<seconds>[0-9.e+-]+) s of audio"
)


def _block_advice(fits: int, rate: int, relay_flag: str) -> str:
    """Which ``--block-ms`` fits ``fits`` frames at ``rate`` (rounded down to 0.1 ms)."""
    block_ms = math.floor(fits * 1000 / rate * 10) / 10
    if block_ms > 0 and block_frames_for(rate, block_ms) > fits:
        block_ms -= 0.1  # rounding to 0.1 ms went over
    if block_ms < 1:
        return f"a block of even 1 ms does not fit: raise the relay's {relay_flag}"
    return f"use --block-ms {block_ms:g} or less, or raise the relay's {relay_flag}"


def _explain_memory_part(config: RecorderConfig) -> None:
    """Say how much audio a SIGKILL can lose, and whether the memory part was clamped."""
    asked = config.memory_seconds
    if asked is not None and asked > config.spool_seconds:
        log.warning(
            "--spool-memory-seconds %g is more than --spool-seconds %g: memory holds %g s",
            asked,
            config.spool_seconds,
            config.history_seconds,
        )
    log.info(
        "spool: up to %g s in memory, then up to %g s on disk in %s; a SIGKILL or power cut "
        "loses what is in memory (--spool-memory-seconds)",
        config.history_seconds,
        config.spool_seconds,
        config.spool_dir,
    )


def _safe_name(stream: str) -> str:
    """A stream name as one directory name: ``filenames.stream_stem``, so two streams
    (``mic 1``, ``mic_1``) never share a spool."""
    return stream_stem(stream)
