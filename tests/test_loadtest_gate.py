"""The performance gate CI keeps: a few seconds of load that catch a collapse, not a dip.

The limits are far below what the relay does on a loaded 2-core machine (see the
README's Performance section and ``python -m tests.benchmarks``), so noise from a
shared CI runner does not trip them; what trips them is a change that costs a
multiple: a per-chunk scan of all streams, a wake-up storm, a lost fast path, chunks
lost without being counted.
"""

from __future__ import annotations

import pytest

from audiosockets.loadtest import LoadTestConfig, run_loadtest

pytestmark = pytest.mark.timeout(180)

# Limits: a collapse, not a dip. On the development machine shared by a dozen jobs
# (load average above 20 on 2 cores) these runs measured about 20 000 deliveries/s,
# 60 000 deliveries per relay CPU second, p99 2.3 s and no loss; unloaded they are
# several times better. The CPU-based limit is the one least moved by a busy runner.
MIN_FANOUT_DELIVERIES_PER_S = 3_000
MIN_RELAY_DELIVERIES_PER_CPU_S = 15_000
MAX_REALTIME_P99_MS = 8_000.0
MAX_REALTIME_LOSS = 0.05


def test_many_realtime_streams_to_a_group_arrive_once_and_in_time() -> None:
    """50 live 20 ms streams to a group of two library subscribers: each chunk arrives at
    most once, (almost) all arrive, whatever did not is in the relay's drop counters,
    and the p99 stays far below a collapse."""
    report = run_loadtest(
        LoadTestConfig(streams=50, subscribers=2, group="g", duration=3.0, rate="realtime")
    )
    assert report.chunks_sent >= 50 * 100  # 3 s of 50 chunks/s each, less start-up slack
    assert report.chunks_duplicated == 0
    assert report.loss_ratio <= MAX_REALTIME_LOSS, report.relay_drops
    assert report.chunks_lost <= sum(report.relay_drops.values())
    assert report.latency_ms["p99"] <= MAX_REALTIME_P99_MS


def test_fanout_at_max_rate_keeps_its_throughput_and_accounts_for_every_chunk() -> None:
    """1 stream to 4 library subscribers as fast as the relay takes it: the throughput and
    the relay's efficiency stay above a collapse, and whatever a subscriber did not get
    is in the relay's drop counters (received + dropped = expected)."""
    report = run_loadtest(LoadTestConfig(streams=1, subscribers=4, duration=2.0, rate="max"))
    assert report.throughput_chunks_per_s >= MIN_FANOUT_DELIVERIES_PER_S
    assert report.relay_chunks_per_cpu_s is not None
    assert report.relay_chunks_per_cpu_s >= MIN_RELAY_DELIVERIES_PER_CPU_S
    dropped = sum(report.relay_drops.values())
    assert report.chunks_received + dropped == report.chunks_expected
