"""The load test's books (issue 11, item 11): every expected chunk is received,
unsent in a publisher, in flight at the end (held by the relay or in transit)
or dropped by a named reason, and the sum is exact."""

from __future__ import annotations

from typing import Any

import pytest

from audiosockets.loadtest import LoadTestConfig, account, run_loadtest


def test_the_books_balance_by_construction_of_what_each_side_counted() -> None:
    pub = {"unsent": 7, "spool_drops": 3}
    relay = {"received": 90, "sent": 150, "drops": {"subscriber_slow": 20.0}}
    books = account(sent=100, fanout=2, received=140, pub=pub, relay=relay)
    assert books["chunks_unsent"] == 14
    assert books["chunks_dropped"] == {"spool_full": 6, "subscriber_slow": 20}
    assert books["chunks_in_relay"] == 90 * 2 - 150 - 20
    assert books["chunks_in_flight"] == 10 + (150 - 140)
    assert books["chunks_unaccounted"] == 0
    # A chunk nobody counted shows up, it is not absorbed.
    lost = account(sent=101, fanout=2, received=140, pub=pub, relay=relay)
    assert lost["chunks_unaccounted"] == 2


def test_with_an_external_relay_the_relay_figures_are_unknown_not_zero() -> None:
    books = account(sent=10, fanout=1, received=8, pub={"unsent": 1}, relay=None)
    assert books["chunks_in_flight"] is None
    assert books["chunks_unaccounted"] is None
    assert books["chunks_unsent"] == 1


@pytest.mark.parametrize("client", ["raw", "library"])
def test_a_run_accounts_for_every_chunk(client: Any) -> None:
    cfg = LoadTestConfig(
        streams=200, subscribers=1, duration=2.0, rate="realtime", client=client, drain_seconds=2.0
    )
    report = run_loadtest(cfg)
    parts = (
        report.chunks_received
        + report.chunks_unsent
        + (report.chunks_in_flight or 0)
        + sum(report.chunks_dropped.values())
    )
    assert report.chunks_unaccounted == 0, report
    assert parts == report.chunks_expected
    assert report.chunks_in_relay is not None
    assert report.chunks_in_relay >= 0
    assert sum(report.chunks_dropped.get(r, 0) for r in report.relay_drops) == sum(
        int(v) for v in report.relay_drops.values()
    )
