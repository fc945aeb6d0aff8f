"""The lock-free per-chunk metrics expose exactly what prometheus_client's own would."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from audiosockets.metrics import LATENCY_BUCKETS, LiveCounter, LiveGauge, LiveHistogram


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["mic-1", "mic-2"]),
            st.floats(min_value=0, max_value=10, allow_nan=False),
        ),
        max_size=50,
    )
)
def test_live_histogram_and_counter_match_prometheus_client(
    observations: list[tuple[str, float]],
) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    live_h = LiveHistogram("x_seconds", "x", ["stream"], LATENCY_BUCKETS, ours)
    live_c = LiveCounter("x_bytes", "x", ["stream"], ours)
    live_g = LiveGauge("x_depth", "x", ["stream"], ours)
    ref_h = Histogram("x_seconds", "x", ["stream"], buckets=LATENCY_BUCKETS, registry=theirs)
    ref_c = Counter("x_bytes", "x", ["stream"], registry=theirs)
    ref_g = Gauge("x_depth", "x", ["stream"], registry=theirs)
    for stream in ("mic-1", "mic-2"):  # declared up front, as the services do
        for metric in (live_h, live_c, live_g, ref_h, ref_c, ref_g):
            metric.labels(stream)
    for i, (stream, value) in enumerate(observations):
        live_h.labels(stream).observe(value)
        ref_h.labels(stream).observe(value)
        live_c.labels(stream).inc(value)
        ref_c.labels(stream).inc(value)
        for g in (live_g, ref_g):
            if i % 3 == 0:
                g.labels(stream).set(value)
            elif i % 3 == 1:
                g.labels(stream).inc(value)
            else:
                g.labels(stream).dec(value)
    assert _samples(ours) == pytest.approx(_samples(theirs))


def test_a_value_on_a_bucket_bound_counts_in_that_bucket() -> None:
    registry = CollectorRegistry()
    h = LiveHistogram("y_seconds", "y", ["stream"], (0.1, 1.0), registry)
    h.labels("a").observe(0.1)
    bucket = registry.get_sample_value("y_seconds_bucket", {"stream": "a", "le": "0.1"})
    assert bucket == 1.0


def test_counter_refuses_to_go_down_and_wrong_labels() -> None:
    c = LiveCounter("z", "z", ["stream"], CollectorRegistry())
    with pytest.raises(ValueError, match="non-negative"):
        c.labels("a").inc(-1)
    with pytest.raises(ValueError, match="takes labels"):
        c.labels("a", "b")


def test_a_name_registered_twice_is_refused() -> None:
    registry = CollectorRegistry()
    LiveCounter("dup", "d", ["stream"], registry)
    with pytest.raises(ValueError, match="Duplicated"):
        Counter("dup", "d", ["stream"], registry=registry)


def test_a_removed_series_is_gone_and_removing_it_twice_is_a_key_error() -> None:
    registry = CollectorRegistry()
    c = LiveCounter("w", "w", ["stream"], registry)
    c.labels("a").inc()
    c.remove("a")
    assert registry.get_sample_value("w_total", {"stream": "a"}) is None
    with pytest.raises(KeyError):
        c.remove("a")
