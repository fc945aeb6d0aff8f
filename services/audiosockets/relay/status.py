"""What the relay reports about itself: the ``status`` JSON and the gauges
computed at scrape time."""

from __future__ import annotations

import json
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
    subscriber names, window bytes), ``publishers``, ``subscribers`` (pattern, group,
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
                "window_bytes": s.window.memory_bytes,
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


class StatusCache:
    """The status report as a STATUS frame's JSON, built at most once per
    ``status_interval`` relay-wide: requests within it get the same document,
    so many observers cost one build. Cut to fit ``max_frame_size``
    (``fit_status``)."""

    def __init__(self) -> None:
        self._built: tuple[float, str] | None = None  # (relay clock, document)

    def document(self, relay: Relay) -> str:
        now = relay.clock()
        if self._built is not None and now - self._built[0] < relay.config.status_interval:
            return self._built[1]
        document = fit_status(status_report(relay), relay.config.limits.max_frame_size)
        self._built = (now, document)
        return document


def fit_status(report: dict[str, object], max_bytes: int) -> str:
    """``report`` as JSON of at most ``max_bytes`` UTF-8 bytes (a STATUS frame's
    payload limit, ``Limits.max_frame_size``).

    When the whole report does not fit, the lists ``streams``, ``publishers``,
    ``subscribers`` and ``groups`` (and each entry's own lists of streams) are
    cut to their first N entries, N as large as fits, and the key
    ``truncated`` says how many entries of each were left out. A client gets
    a smaller report, never an oversized frame.
    """
    document = json.dumps(report)
    if len(document.encode()) <= max_bytes:
        return document

    def cut(keep: int) -> str:
        out = dict(report)
        omitted: dict[str, int] = {}
        for key in ("streams", "publishers", "subscribers"):
            entries = report.get(key)
            assert isinstance(entries, list)
            kept = []
            for entry in entries[:keep]:
                entry = dict(entry)
                for inner in ("streams", "subscribers"):
                    full = entry.get(inner)
                    if isinstance(full, list) and len(full) > keep:
                        entry[inner] = full[:keep]
                        entry[f"{inner}_omitted"] = len(full) - keep
                kept.append(entry)
            out[key] = kept
            omitted[key] = len(entries) - len(kept)
        groups = report.get("groups")
        assert isinstance(groups, dict)
        cut_groups = {}
        for name in list(groups)[:keep]:
            group = dict(groups[name])
            assignment = group["assignment"]
            if len(assignment) > keep:
                group["assignment"] = dict(list(assignment.items())[:keep])
                group["assignment_omitted"] = len(assignment) - keep
            if len(group["members"]) > keep:
                group["members_omitted"] = len(group["members"]) - keep
                group["members"] = group["members"][:keep]
            cut_groups[name] = group
        out["groups"] = cut_groups
        omitted["groups"] = len(groups) - len(cut_groups)
        out["truncated"] = omitted
        return json.dumps(out)

    # The largest N that fits lies in [lo, hi].
    lengths = [len(v) for v in report.values() if isinstance(v, list | dict)]
    for key in ("streams", "subscribers"):
        entries = report[key]
        assert isinstance(entries, list)
        lengths += [len(e.get(inner, ())) for e in entries for inner in ("streams", "subscribers")]
    lo, hi = 0, max(lengths)
    best = cut(0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        candidate = cut(mid)
        if len(candidate.encode()) <= max_bytes:
            best, lo = candidate, mid
        else:
            hi = mid - 1
    return best


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
    window_bytes = GaugeMetricFamily(
        "audiosockets_replay_window_bytes",
        "Memory held for replay (frames plus per-chunk overhead), by stream.",
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
        window_bytes.add_metric([s.name], s.window.memory_bytes)
        last.add_metric([s.name], s.last_captured_ns / 1e9)
    count = GaugeMetricFamily("audiosockets_streams", "Streams known to the relay.")
    count.add_metric([], len(streams))
    memory = GaugeMetricFamily(
        "audiosockets_window_memory_bytes",
        "Memory every replay window holds together (bounded by max_window_memory).",
    )
    memory.add_metric([], relay.window_memory.held)
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
    yield from (depth, window, window_bytes, last, count, memory, members, assigned)
