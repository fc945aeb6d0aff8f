"""A processor's worker processes leave stopping to the processor.

A closing terminal sends SIGHUP to the whole process group, workers included.
The processor drains on it (``service.py``); a worker that the signal kills
instead breaks its pool. The window that matters is a worker's start: before
its initializer runs it has no handler of its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest
from processor_support import sine, to_chunks

from _support import children_of
from audiosockets.handlers import HandlerOptions
from audiosockets.processor.loading import parse_spec
from audiosockets.processor.runners import HandlerPool

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="/proc and the process group signals"
)


async def test_a_sighup_while_workers_start_does_not_break_their_pools() -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the processor's, as run_service's
    before = children_of(os.getpid())
    pool = HandlerPool(parse_spec("level"), HandlerOptions(), 2)
    hit: set[int] = set()
    try:
        start = asyncio.create_task(pool.start())
        # What killpg does to every new process of ours, from its first instant on.
        while not start.done():
            for pid in children_of(os.getpid()) - before:
                os.kill(pid, signal.SIGHUP)
                hit.add(pid)
            await asyncio.sleep(0.005)  # polling for new processes
        await start  # "worker process failed to start" when a worker died
        assert hit, "no worker was signalled while starting"
        (chunk,) = to_chunks(sine(440, 0.02, 16000, 0.5), 16000, 320)
        outcomes = [await pool.process(i, chunk) for i in range(2)]
        assert [o.error for o in outcomes] == [None, None]
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        await pool.shutdown(1.0)
