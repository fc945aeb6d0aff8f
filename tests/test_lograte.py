"""``LogRateLimit``: one log line per key per interval, the held-back count carried by
the next line (relay refusals and cuts, processor handler failures)."""

from __future__ import annotations

import logging

import pytest

from audiosockets.lograte import LogRateLimit


def test_refusals_are_logged_once_per_reason_per_interval() -> None:
    now = [0.0]
    limit = LogRateLimit(10.0, clock=lambda: now[0])
    assert limit.allow("empty_chunk") == (True, 0)
    assert [limit.allow("empty_chunk") for _ in range(49)] == [(False, 0)] * 49
    assert limit.allow("frame_timeout") == (True, 0)  # another reason has its own line
    now[0] = 10.0
    assert limit.allow("empty_chunk") == (True, 49)  # the next line says how many were held
    assert limit.allow("empty_chunk") == (False, 0)


def test_warning_writes_one_line_per_interval_and_then_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    limit = LogRateLimit(10.0, clock=lambda: now[0])
    logger = logging.getLogger("audiosockets.test_lograte")
    caplog.set_level(logging.WARNING, logger.name)
    assert limit.warning(logger, "cut:slow", "closing %s: %s", "sub-1", "too slow") is True
    held = [limit.warning(logger, "cut:slow", "closing %s: %s", f"sub-{i}", "x") for i in range(5)]
    assert held == [False] * 5
    now[0] = 9.999
    assert limit.warning(logger, "cut:slow", "closing %s: %s", "sub-9", "x") is False
    now[0] = 10.0
    assert limit.warning(logger, "cut:slow", "closing %s: %s", "sub-2", "again") is True
    assert [r.getMessage() for r in caplog.records] == [
        "closing sub-1: too slow",
        "closing sub-2: again (and 6 more like it since the last such line)",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)
