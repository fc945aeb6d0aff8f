"""Housekeeping: what the relay lets go of with time, even when nothing arrives.

Run every ``Housekeeping.interval`` seconds (and callable directly, which is
how tests drive it with a fake clock):

- **Audio expires by age.** A chunk that arrived more than ``replay_seconds``
  ago (relay clock) leaves its window, the newest one too: a stream whose
  publisher went quiet holds nothing after ``replay_seconds``. A reader that
  had not been sent an expired chunk counts it as ``replay_window_exceeded``
  when its writer next runs (it is woken for that).
- **Abandoned streams are forgotten.** A stream with no publisher and nothing
  in its window for ``stream_grace_seconds`` is removed: its name, id, group
  assignments and resume points, its readers' cursors (a reader still told
  the stream is open gets CLOSE_STREAM ``publisher_lost``) and every metric
  series labelled with it. A publisher that comes back under that name later
  starts a new stream, as after a relay restart (``next_seq`` 0).
- **Empty groups are forgotten.** A group whose last member left keeps its
  ACKed points for ``stream_grace_seconds`` (members that all restart at once
  resume where the group left off), then it is removed.
- **Idle sessions are closed.** A session that holds nothing (an observer, a
  publisher with no stream open, a subscriber before SUBSCRIBE) and sent no
  request for ``idle_timeout`` gets GOODBYE ``NORMAL`` and is closed, counted
  in ``audiosockets_sessions_cut_total{reason="idle"}``. PINGs do not count as
  requests: a heartbeat keeps a connection alive, not a session useful.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from ..errors import ErrorCode
from ..metrics import DROP_REASONS
from ..protocol import CloseReason, Goodbye
from .sessions import ObserverSession, PublisherSession, Session, SubscriberSession

if TYPE_CHECKING:
    from .server import Relay
    from .streams import StreamState

log = logging.getLogger("audiosockets.relay")


def holds_nothing(session: Session) -> bool:
    """Whether ``session`` holds no stream and no subscription (idle-able)."""
    if isinstance(session, ObserverSession):
        return True
    if isinstance(session, PublisherSession):
        return not any(s.publisher is session for s in session.streams.values())
    if isinstance(session, SubscriberSession):
        return session.subscription is None
    return True


class Housekeeping:
    """The relay's periodic clean-up (see the module docstring).

    ``interval`` (seconds of real time between runs) is at most 0.5 s and at
    most a quarter of ``replay_seconds`` (at least 0.1 s), so audio outlives
    ``replay_seconds`` by at most one interval.
    """

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        cfg = relay.config
        self.interval = min(0.5, max(0.1, cfg.replay_seconds / 4))
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run ``run`` in a task on the running loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="relay housekeeping")

    def stop(self) -> None:
        """Cancel the task ``start`` made."""
        if self._task is not None:
            self._task.cancel()

    async def run(self) -> None:
        """Run ``run_once`` every ``interval`` until cancelled; a failure in
        one run is logged and the next run goes on."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.run_once()
            except Exception:  # a bug of ours: keep the relay and its clean-up
                log.exception("housekeeping failed")

    def run_once(self) -> None:
        """One pass at the relay clock's current reading."""
        now = self.relay.clock()
        self.expire_audio(now)
        self.forget_abandoned(now)
        self.forget_empty_groups(now)
        self.close_idle(now)

    def expire_audio(self, now: float) -> None:
        """Drop every chunk that arrived more than ``replay_seconds`` before ``now``."""
        relay = self.relay
        cutoff = now - relay.config.replay_seconds
        for stream in list(relay.streams.values()):
            window = stream.window
            if not len(window) or window.arrivals[window.head] >= cutoff:
                continue
            window.drop_oldest(window.ordinal_arrived_at(cutoff) - window.base)
            for reader in relay.subscriptions.readers(stream.name):
                reader.wake.set()  # its writer counts what it had not been sent

    def forget_abandoned(self, now: float) -> None:
        """Forget streams with no publisher and an empty window for
        ``stream_grace_seconds``."""
        relay = self.relay
        grace = relay.config.stream_grace_seconds
        doomed = []
        for stream in list(relay.streams.values()):
            if stream.publisher is not None or len(stream.window):
                stream.abandoned_at = None
                continue
            if stream.abandoned_at is None:
                stream.abandoned_at = now
            if now - stream.abandoned_at >= grace:
                doomed.append(stream)
        forget_streams(relay, doomed)

    def forget_empty_groups(self, now: float) -> None:
        """Forget groups that have had no member for ``stream_grace_seconds``
        (with their ACKed points)."""
        relay = self.relay
        grace = relay.config.stream_grace_seconds
        for name, group in list(relay.groups.items()):
            if group.members:
                group.empty_since = None
            elif group.empty_since is not None and now - group.empty_since >= grace:
                del relay.groups[name]  # its gauges are computed at scrape time

    def close_idle(self, now: float) -> None:
        """Close sessions that hold nothing and asked nothing for ``idle_timeout``."""
        relay = self.relay
        timeout = relay.config.idle_timeout
        for session in list(relay.sessions):
            if session.cut_reason or session.channel.closed:
                continue
            if now - session.last_active >= timeout and holds_nothing(session):
                relay.guard.cut_session(
                    session,
                    "idle",
                    Goodbye(ErrorCode.NORMAL, f"idle for {timeout:g} s: session closed"),
                )


def forget_stream(relay: Relay, stream: StreamState) -> None:
    """Forget one stream (see ``forget_streams``)."""
    forget_streams(relay, [stream])


def forget_streams(relay: Relay, streams: list[StreamState]) -> None:
    """Forget ``streams``: their state, their readers' cursors (CLOSE_STREAM
    ``publisher_lost`` where one was declared), their group entries and every
    metric series labelled with their names (per-subscriber series found in
    one pass for all of them); each counted in
    ``audiosockets_streams_forgotten_total``."""
    names = set()
    for stream in streams:
        name = stream.name
        if relay.streams.get(name) is not stream:
            continue
        names.add(name)
        del relay.streams[name]
        relay.stream_ids.pop(stream.id, None)
        for reader in list(relay.subscriptions.readers(name)):
            reader.unassign(stream, CloseReason.PUBLISHER_LOST)
        for group in relay.groups.values():
            group.assignment.pop(name, None)
            group.acked.pop(name, None)
        _remove_series(relay, name)
        relay.guard.counters.streams_forgotten.inc()
        log.info("stream %r forgotten: no publisher and no audio held", name)
    if not names:
        return
    m = relay.metrics
    for metric in (m.subscriber_chunks_sent, m.subscriber_chunks_dropped):
        doomed = [
            sample.labels
            for family in metric.collect()
            for sample in family.samples
            if sample.labels.get("stream") in names and sample.name.endswith("_total")
        ]
        for labels in doomed:
            with contextlib.suppress(KeyError):
                metric.remove(*labels.values())


def _remove_series(relay: Relay, name: str) -> None:
    m = relay.metrics
    for metric in (
        m.chunks_received,
        m.chunks_sent,
        m.bytes_received,
        m.bytes_sent,
        m.duplicates_suppressed,
        m.sequence_gaps,
        m.end_to_end_latency,
        m.queue_depth,
    ):
        with contextlib.suppress(KeyError):
            metric.remove(name)
    for reason in DROP_REASONS:  # every reason the relay counts is declared there
        with contextlib.suppress(KeyError):
            m.chunks_dropped.remove(name, reason)
