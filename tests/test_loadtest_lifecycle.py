"""A killed ``audiosockets loadtest`` takes its child processes with it.

The parent runs as a real process against a relay in this test; its children
(subscribers, publishers) are found through /proc by parent pid.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import pytest

from _support import children_of, end_for_good, wait_gone, wait_until
from audiosockets.relay import Relay

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's"
)


@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
async def test_children_die_with_a_killed_loadtest(relay: Relay, kill: signal.Signals) -> None:
    """Publishers in a long run used to keep sending after the parent was gone."""
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "audiosockets", "loadtest", "--relay", relay.url,
        "--streams", "1", "--subscribers", "1", "--duration", "600",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    children: set[int] = set()
    try:
        # Running: the publisher process is sending audio.
        await wait_until(
            lambda: bool(
                relay.metrics.registry.get_sample_value(
                    "audiosockets_chunks_received_total", {"stream": "load-0000"}
                )
            ),
            timeout=60,
            what="the load test's audio at the relay",
        )
        children = children_of(parent.pid)
        assert len(children) >= 2, children  # a subscriber and a publisher process
        parent.send_signal(kill)
        rc = await asyncio.wait_for(parent.wait(), 10)
        await wait_gone(children, f"children {sorted(children)} to end with their parent")
    finally:
        await end_for_good(parent, children)
    assert rc == (-signal.SIGKILL if kill == signal.SIGKILL else 128 + signal.SIGTERM)
