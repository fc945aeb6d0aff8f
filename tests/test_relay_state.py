"""Relay state without sockets: the replay window, metric naming rules."""

from __future__ import annotations

import re
from typing import cast

from prometheus_client import CollectorRegistry

from audiosockets.metrics import DROP_REASONS, LATENCY_BUCKETS, Metrics
from audiosockets.relay import Relay, RelayConfig, ReplayWindow


def filled(n: int, seconds: float = 0.02) -> ReplayWindow:
    w = ReplayWindow()
    for seq in range(n):
        w.append(seq, b"x" * 10, seconds, arrived=float(seq))
    return w


def test_window_trims_by_seconds_and_keeps_ordinals() -> None:
    w = filled(100)  # 2 s of audio
    w.trim(max_seconds=1.0, max_bytes=1 << 30)
    assert len(w) == 50
    assert w.base == 50
    assert w.end == 100
    assert w.first_seq() == 50
    assert abs(w.total_seconds - 1.0) < 1e-9


def test_window_trims_by_bytes_but_keeps_the_newest() -> None:
    w = filled(10)
    w.trim(max_seconds=100, max_bytes=1)
    assert len(w) == 1
    assert w.first_seq() == 9


def test_window_lookup_by_seq_and_arrival_after_compaction() -> None:
    w = ReplayWindow()
    for seq in range(0, 6000, 2):  # gaps in seq are allowed
        w.append(seq, b"", 0.01, arrived=seq / 1000)
    w.trim(max_seconds=10, max_bytes=1 << 30)  # keeps the last 1000 entries, compacts
    assert w.head < 1024
    assert w.base == 2000
    assert w.ordinal_after_seq(4001) == w.ordinal_after_seq(4000) == 2001
    assert w.ordinal_after_seq(-1) == w.base
    assert w.ordinal_after_seq(10**9) == w.end
    assert w.ordinal_arrived_at(5.0) == 2500


def test_window_clear_moves_base_forward() -> None:
    w = filled(5)
    w.clear()
    assert len(w) == 0
    assert w.base == w.end == 5


def test_metric_names_follow_the_conventions() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    Relay(RelayConfig(port=0), metrics=metrics)
    metrics.declare_stream("mic-1")
    names = set()
    for family in registry.collect():
        names.add(family.name)
        assert family.name.startswith("audiosockets_"), family.name
        if family.type == "counter":
            assert not family.name.endswith("_total"), "client_python appends _total itself"
            assert any(s.name.endswith("_total") for s in family.samples) or not family.samples
        assert not re.search(r"_(ms|milliseconds|kb|mb)(_|$)", family.name), "base units only"
        for sample in family.samples:
            assert "seq" not in sample.labels
            assert "port" not in sample.labels
    required = {
        "audiosockets_chunks_received",
        "audiosockets_chunks_sent",
        "audiosockets_bytes_received",
        "audiosockets_bytes_sent",
        "audiosockets_chunks_dropped",
        "audiosockets_end_to_end_latency_seconds",
        "audiosockets_connected_clients",
        "audiosockets_queue_depth_chunks",
        "audiosockets_reconnects",
        "audiosockets_protocol_errors",
        "audiosockets_build_info",
    }
    assert required <= names
    for reason in DROP_REASONS:  # zeros exist before the first drop
        assert (
            registry.get_sample_value(
                "audiosockets_chunks_dropped_total", {"stream": "mic-1", "reason": reason}
            )
            == 0
        )
    assert registry.get_sample_value("audiosockets_connected_clients", {"role": "publisher"}) == 0
    assert LATENCY_BUCKETS[0] == 0.0001
    assert LATENCY_BUCKETS[-1] == 300.0  # a spool replayed minutes late still resolves


def test_subscriptions_keep_both_indexes_in_one_step() -> None:
    from prometheus_client import Counter, Histogram

    from audiosockets.audio import AudioFormat, SampleType
    from audiosockets.relay import (
        Cursor,
        StreamCounters,
        StreamState,
        SubscriberSession,
        Subscriptions,
    )

    registry = CollectorRegistry()
    counters = StreamCounters(
        Counter("c", "c", registry=registry),
        Counter("b", "b", registry=registry),
        Histogram("h", "h", registry=registry),
    )
    fmt = AudioFormat(16000, 1, SampleType.INT16)
    mic, line = StreamState(1, "mic", fmt, counters), StreamState(2, "line", fmt, counters)
    for seq in range(5):
        mic.window.append(seq, b"x", 0.02, arrived=float(seq))
    # Any hashable object stands in for a subscriber session here.
    a, b = cast(SubscriberSession, object()), cast(SubscriberSession, object())
    subs = Subscriptions()
    subs.add(a, Cursor(mic, 2, 1, 0.0))
    subs.add(a, Cursor(line, 0, -1, 0.0))
    subs.add(b, Cursor(mic, 0, -1, 0.0))
    assert subs.streams_of(a) == ["line", "mic"]
    assert set(subs.readers("mic")) == {a, b}
    assert subs.stream_lag("mic") == 3 + 5
    assert subs.session_lag(a) == 3
    replaced = Cursor(mic, 4, 3, 0.0)
    subs.add(a, replaced)
    assert subs.get(a, "mic") is replaced
    assert subs.readers("mic")[a] is replaced
    assert subs.remove(a, "mic") is replaced
    assert set(subs.readers("mic")) == {b}
    assert subs.remove(a, "mic") is None
    assert [c.stream.name for c in subs.remove_session(b)] == ["mic"]
    assert dict(subs.readers("mic")) == {}
    assert subs.streams_of(a) == ["line"]
    assert subs.stream_lag("mic") == 0
