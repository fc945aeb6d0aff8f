"""``watch_lag`` keeps going through a fault of its own and exports no stale lag
while the link is down (no server needed: the link and readers are stand-ins)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("nats", reason="the nats extra")

from _support import wait_until
from audiosockets.jetstream.lag import STALE_ROUNDS, watch_lag
from audiosockets.metrics import Metrics

GAUGE = "audiosockets_jetstream_consumer_pending_chunks"


class Readers(Mapping[str, Any]):
    """One reader ``mic``; the first ``faults`` listings raise, as a bug would."""

    def __init__(self, faults: int) -> None:
        self.faults = faults
        self.readers = {"mic": SimpleNamespace(consumer="c-mic")}

    def __getitem__(self, key: str) -> Any:
        return self.readers[key]

    def __len__(self) -> int:
        return len(self.readers)

    def __iter__(self) -> Iterator[str]:
        return iter(self.readers)

    def items(self) -> Any:
        if self.faults:
            self.faults -= 1
            raise RuntimeError("injected")
        return self.readers.items()


def stub_link(pending: int) -> Any:
    async def consumer_info(stream: str, consumer: str) -> Any:
        return SimpleNamespace(num_pending=pending)

    connected = asyncio.Event()
    connected.set()
    return SimpleNamespace(
        js=SimpleNamespace(consumer_info=consumer_info),
        connected=connected,
        settings=SimpleNamespace(stream="AUDIO"),
    )


async def test_a_fault_in_one_round_is_logged_and_the_next_round_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    link = stub_link(42)
    task = asyncio.create_task(watch_lag(link, Readers(faults=1), str, metrics, interval=0.01))
    try:
        await wait_until(
            lambda: metrics.registry.get_sample_value(GAUGE, {"stream": "mic"}) == 42,
            timeout=5,
            what="the lag after the faulty round",
        )
        assert "polling the consumers' lag failed" in caplog.text
        link.connected.clear()  # the server is gone: the lag is unknown
        await wait_until(
            lambda: metrics.registry.get_sample_value(GAUGE, {"stream": "mic"}) is None,
            timeout=5,
            what="no stale lag while disconnected",
        )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_lag_that_cannot_be_read_for_three_rounds_is_removed_then_comes_back() -> None:
    metrics = Metrics()
    rounds: list[str] = []  # what each request did
    failing = asyncio.Event()

    async def consumer_info(stream: str, consumer: str) -> Any:
        if failing.is_set():
            rounds.append("failed")
            raise TimeoutError("the server is too busy to answer")
        rounds.append("ok")
        return SimpleNamespace(num_pending=7)

    link = stub_link(0)
    link.js = SimpleNamespace(consumer_info=consumer_info)

    def lag() -> float | None:
        return metrics.registry.get_sample_value(GAUGE, {"stream": "mic"})

    task = asyncio.create_task(watch_lag(link, Readers(faults=0), str, metrics, interval=0.05))
    try:
        await wait_until(lambda: lag() == 7, timeout=5, what="the first lag")
        failing.set()
        await wait_until(lambda: "failed" in rounds, timeout=5, what="a failed request")
        assert lag() == 7  # one miss keeps the value
        await wait_until(lambda: lag() is None, timeout=5, what="the stale lag removed")
        misses = len(rounds) - rounds.index("failed")
        assert misses >= STALE_ROUNDS  # it kept the value through shorter trouble
        failing.clear()
        await wait_until(lambda: lag() == 7, timeout=5, what="the lag back")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
