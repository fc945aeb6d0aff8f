"""Fixtures shared by every test: an in-process relay on a free loopback port."""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from audiosockets.metrics import Metrics
from audiosockets.relay import Clock, Relay, RelayConfig


@pytest.fixture
def relay_config() -> RelayConfig:
    return RelayConfig(
        host="127.0.0.1", port=0, replay_seconds=30.0, queue_seconds=2.0, heartbeat_interval=1.0
    )


@pytest.fixture
def relay_clock() -> Clock:
    """The relay's clock; a test parametrizes this to drive a fake one."""
    return time.monotonic


@pytest.fixture
async def relay(relay_config: RelayConfig, relay_clock: Clock) -> AsyncIterator[Relay]:
    r = Relay(relay_config, metrics=Metrics(), clock=relay_clock)
    await r.start()
    try:
        yield r
    finally:
        await r.stop()
