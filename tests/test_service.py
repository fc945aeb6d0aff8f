"""The one service lifecycle: signal handlers restored, run_service's order of calls."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from types import FrameType

import pytest

from _support import wait_until
from audiosockets.service import run_service, signal_handlers

SIG = signal.SIGUSR1


@pytest.fixture
def python_handler() -> Iterator[list[int]]:
    """A plain Python handler for SIGUSR1, as a host application would install it."""
    seen: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    before = signal.signal(SIG, handler)
    try:
        yield seen
    finally:
        signal.signal(SIG, before)


async def test_signal_handlers_call_back_and_restore_the_previous_python_handler(
    python_handler: list[int],
) -> None:
    previous = signal.getsignal(SIG)
    got: list[str] = []
    with signal_handlers(lambda: got.append("ours"), [SIG]) as installed:
        assert installed == [SIG]
        os.kill(os.getpid(), SIG)
        await wait_until(lambda: got == ["ours"], what="our callback ran")
    assert python_handler == []  # the loop's handler took it, not the previous one
    assert signal.getsignal(SIG) is previous
    os.kill(os.getpid(), SIG)
    await wait_until(lambda: python_handler == [SIG], what="the previous handler is back")
    assert got == ["ours"]


async def test_overlapping_blocks_share_a_signal_and_the_outer_one_keeps_working(
    python_handler: list[int],
) -> None:
    previous = signal.getsignal(SIG)
    got: list[str] = []
    with signal_handlers(lambda: got.append("outer"), [SIG]):
        with signal_handlers(lambda: got.append("inner"), [SIG]):
            os.kill(os.getpid(), SIG)
            await wait_until(lambda: len(got) == 2, what="both callbacks ran")
            assert sorted(got) == ["inner", "outer"]
        got.clear()
        os.kill(os.getpid(), SIG)
        await wait_until(lambda: got == ["outer"], what="the outer callback alone ran")
    assert signal.getsignal(SIG) is previous
    assert python_handler == []


async def test_sigint_gets_python_default_handler_back() -> None:
    before = signal.getsignal(signal.SIGINT)
    with signal_handlers(lambda: None, [signal.SIGINT]):
        assert signal.getsignal(signal.SIGINT) is not before
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C raises KeyboardInterrupt again


class ScriptedService:
    """Records the calls run_service makes; serve_forever ends on stop() or by itself."""

    def __init__(self, *, ends_with: BaseException | None = None) -> None:
        self.calls: list[str] = []
        self.stopped = asyncio.Event()
        self.serving = asyncio.Event()
        self.ends_with = ends_with

    async def start(self) -> None:
        self.calls.append("start")

    async def serve_forever(self) -> None:
        self.calls.append("serve_forever")
        self.serving.set()
        if self.ends_with is not None:
            raise self.ends_with
        await self.stopped.wait()

    async def stop(self) -> None:
        self.calls.append("stop")
        self.stopped.set()


async def test_run_service_stops_on_a_signal_after_ready() -> None:
    service = ScriptedService()
    ready: list[ScriptedService] = []
    task = asyncio.create_task(run_service(service, ready=ready.append, signals=[SIG]))
    await asyncio.wait_for(service.serving.wait(), 5)
    assert ready == [service]
    os.kill(os.getpid(), SIG)
    await asyncio.wait_for(task, 5)
    assert service.calls == ["start", "serve_forever", "stop"]


async def test_run_service_stops_and_raises_when_serve_forever_fails() -> None:
    service = ScriptedService(ends_with=RuntimeError("gave up"))
    with pytest.raises(RuntimeError, match="gave up"):
        await run_service(service, signals=[SIG])
    assert service.calls == ["start", "serve_forever", "stop"]


async def test_run_service_stops_when_cancelled() -> None:
    service = ScriptedService()
    task = asyncio.create_task(run_service(service, signals=[SIG]))
    await asyncio.wait_for(service.serving.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert service.calls == ["start", "serve_forever", "stop"]
