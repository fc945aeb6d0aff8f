"""What the relay reports about itself: the ``status`` JSON and the gauges
computed at scrape time."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric

from .. import __version__
from .sessions import PublisherSession, SubscriberSession

if TYPE_CHECKING:
    from .server import Relay


def status_report(relay: Relay) -> dict[str, object]:
    """The report ``audiosockets status`` prints, JSON-serialisable.

    Keys: ``server``, ``version``, ``uptime_s`` (wall-clock seconds since the
    relay was made), ``replay_seconds`` and ``queue_seconds`` (from the
    config), ``streams`` (by name: format, publisher, last seq, chunks, rate
    over the last 5 s of arrivals in chunks/s, window seconds and chunks,
    subscriber names), ``publishers``, ``subscribers`` (pattern, group,
    streams, lag in chunks, chunks dropped), ``groups`` (members, assignment)
    and ``drops`` (``audiosockets_chunks_dropped_total`` summed by reason).
    """
    now = relay.clock()
    subs = relay.subscriptions
    streams = []
    for s in sorted(relay.streams.values(), key=lambda s: s.name):
        streams.append(
            {
                "name": s.name,
                "format": {
                    "rate": s.format.rate,
                    "channels": s.format.channels,
                    "sample_type": s.format.sample_type.label,
                },
                "publisher": s.publisher.name if s.publisher else None,
                "last_seq": s.last_seq,
                "chunks": s.chunks_total,
                "rate_chunks_per_s": round(s.rate(now), 2),
                "window_seconds": round(s.window.total_seconds, 3),
                "window_chunks": len(s.window),
                "subscribers": sorted(r.name for r in subs.readers(s.name)),
            }
        )
    subscribers = []
    publishers = []
    for sess in sorted(relay.sessions, key=lambda x: x.id):
        if isinstance(sess, SubscriberSession) and sess.subscription is not None:
            subscribers.append(
                {
                    "name": sess.name,
                    "peer": sess.channel.peer,
                    "pattern": sess.subscription.pattern,
                    "group": sess.group_name or None,
                    "streams": subs.streams_of(sess),
                    "lag_chunks": sess.lag(),
                    "dropped": sess.dropped,
                }
            )
        elif isinstance(sess, PublisherSession):
            publishers.append(
                {
                    "name": sess.name,
                    "peer": sess.channel.peer,
                    "streams": sorted(s.name for s in sess.streams.values()),
                }
            )
    groups = {
        g.name: {
            "members": [m.name for m in g.members],
            "assignment": {stream: m.name for stream, m in sorted(g.assignment.items())},
        }
        for g in relay.groups.values()
    }
    drops: dict[str, float] = {}
    for metric in relay.metrics.chunks_dropped.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.value:
                reason = sample.labels["reason"]
                drops[reason] = drops.get(reason, 0) + sample.value
    return {
        "server": relay.config.server_name,
        "version": __version__,
        "uptime_s": round(time.time() - relay.started_at, 1),
        "replay_seconds": relay.config.replay_seconds,
        "queue_seconds": relay.config.queue_seconds,
        "streams": streams,
        "publishers": publishers,
        "subscribers": subscribers,
        "groups": groups,
        "drops": drops,
    }


def collect_gauges(relay: Relay) -> Iterator[Metric]:
    """The gauges read from the relay's state at scrape time: queue depth
    (chunks held and not yet sent, by stream), replay window (seconds), last
    chunk's capture time (Unix seconds), streams, group members and streams
    per group member (members sharing a client name summed into one series,
    since a duplicate series makes Prometheus reject the scrape)."""
    streams = list(relay.streams.values())
    depth = GaugeMetricFamily(
        "audiosockets_queue_depth_chunks",
        "Chunks waiting to be delivered or processed, by stream.",
        labels=["stream"],
    )
    window = GaugeMetricFamily(
        "audiosockets_replay_window_seconds",
        "Audio held for replay, by stream.",
        labels=["stream"],
    )
    last = GaugeMetricFamily(
        "audiosockets_last_chunk_timestamp_seconds",
        "Capture time (Unix seconds) of the newest chunk, by stream.",
        labels=["stream"],
    )
    for s in streams:
        depth.add_metric([s.name], relay.subscriptions.stream_lag(s.name))
        window.add_metric([s.name], s.window.total_seconds)
        last.add_metric([s.name], s.last_captured_ns / 1e9)
    count = GaugeMetricFamily("audiosockets_streams", "Streams known to the relay.")
    count.add_metric([], len(streams))
    members = GaugeMetricFamily(
        "audiosockets_group_members", "Members of each group.", labels=["group"]
    )
    assigned = GaugeMetricFamily(
        "audiosockets_group_streams",
        "Streams assigned to each group member.",
        labels=["group", "member"],
    )
    for group in list(relay.groups.values()):
        ms = list(group.members)
        members.add_metric([group.name], len(ms))
        loads: dict[str, int] = {}
        for m in ms:
            loads[m.name] = loads.get(m.name, 0) + group.load(m)
        for member_name, load in sorted(loads.items()):
            assigned.add_metric([group.name, member_name], load)
    yield from (depth, window, last, count, members, assigned)
