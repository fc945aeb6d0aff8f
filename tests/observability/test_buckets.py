"""Histogram bucket layouts resolve what handlers and catch-up really produce.

``histogram_quantile`` interpolates linearly inside the bucket a quantile
falls in, so the ratio between neighbouring bounds bounds the error of every
quantile a dashboard shows. ``quantile`` below is Prometheus' algorithm
(promql/quantile.go, ``bucketQuantile``) over one scrape's cumulative buckets;
the live-stack test checks the same against a real Prometheus.
"""

from __future__ import annotations

import bisect
import itertools
import random

import pytest
from prometheus_client import CollectorRegistry, Histogram

from audiosockets.metrics import (
    E12,
    E24,
    LATENCY_BUCKETS,
    PROCESSING_TIME_BUCKETS,
    decades,
)


def quantile(q: float, bounds: tuple[float, ...], samples: list[float]) -> float:
    """What ``histogram_quantile(q, ...)`` reads for ``samples`` in ``bounds``."""
    registry = CollectorRegistry()
    histogram = Histogram("h_seconds", "h", buckets=bounds, registry=registry)
    for sample in samples:
        histogram.observe(sample)
    uppers = [*bounds, float("inf")]
    counts = [
        registry.get_sample_value("h_seconds_bucket", {"le": le}) or 0.0
        for le in [*(repr(float(b)) for b in bounds), "+Inf"]
    ]
    rank = q * counts[-1]
    i = bisect.bisect_left(counts, rank)
    if i == len(uppers) - 1:
        return uppers[-2]  # the top finite bound: Prometheus' answer past it
    lower, below = (0.0, 0.0) if i == 0 else (uppers[i - 1], counts[i - 1])
    return lower + (uppers[i] - lower) * (rank - below) / (counts[i] - below)


def neighbour_ratios(bounds: tuple[float, ...], low: float, high: float) -> list[float]:
    inside = [b for b in bounds if low <= b <= high]
    return [b / a for a, b in itertools.pairwise(inside)]


def test_e_series_are_the_iec_values() -> None:
    assert len(E12) == 12
    assert len(E24) == 24
    assert set(E12) <= set(E24)
    assert decades(E12, -3, -2) == (
        0.001, 0.0012, 0.0015, 0.0018, 0.0022, 0.0027,
        0.0033, 0.0039, 0.0047, 0.0056, 0.0068, 0.0082, 0.01,
    )  # fmt: skip


@pytest.mark.parametrize("bounds", [LATENCY_BUCKETS, PROCESSING_TIME_BUCKETS])
def test_layouts_are_increasing_and_reach_past_a_minute(bounds: tuple[float, ...]) -> None:
    assert list(bounds) == sorted(set(bounds))
    assert bounds[0] <= 0.0001
    assert bounds[-1] >= 60.0


def test_processing_time_resolves_one_millisecond_to_one_second_within_16_percent() -> None:
    ratios = neighbour_ratios(PROCESSING_TIME_BUCKETS, 0.001, 1.0)
    assert len(ratios) == 72
    assert max(ratios) < 1.16


def test_latency_resolves_one_millisecond_to_one_second_within_25_percent() -> None:
    ratios = neighbour_ratios(LATENCY_BUCKETS, 0.001, 1.0)
    assert len(ratios) == 36
    assert max(ratios) < 1.26
    # and catch-up (seconds to minutes late) at most 1.5x apart up to 5 min
    assert max(neighbour_ratios(LATENCY_BUCKETS, 1.0, 300.0)) <= 2.0


@pytest.mark.parametrize("seconds", [0.002, 0.0105, 0.020, 0.050, 0.0505, 0.120, 0.400])
def test_a_handler_that_always_takes_the_same_time_reads_within_20_percent(
    seconds: float,
) -> None:
    rng = random.Random(seconds)
    # what time.sleep(s) measures: s plus up to 2 % of scheduling overshoot
    samples = [seconds * (1 + rng.uniform(0.0, 0.02)) for _ in range(1000)]
    p95 = quantile(0.95, PROCESSING_TIME_BUCKETS, samples)
    assert p95 == pytest.approx(seconds, rel=0.20)


def test_catch_up_latency_of_a_minute_is_not_clipped_at_the_top_bucket() -> None:
    samples = [40.0 + i * 0.01 for i in range(1000)]  # a spool replayed 40-50 s late
    p99 = quantile(0.99, LATENCY_BUCKETS, samples)
    assert 45.0 <= p99 <= 60.0


def test_old_layout_hid_a_50_ms_handler() -> None:
    """The layout before issue 17 read 97.5 ms for a handler taking 50 ms: the quantile
    function above must reproduce that, or it proves nothing about the new one."""
    old = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5)
    assert quantile(0.95, old, [0.0502] * 100) == pytest.approx(0.0975)
