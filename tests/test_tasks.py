"""``cancel_and_wait``: a task that took a cancellation and went on running is
cancelled again until it ends; the caller's own cancellation is never lost."""

from __future__ import annotations

import asyncio
import logging

import pytest

from _support import wait_until
from audiosockets.tasks import cancel_and_wait


async def _swallows(times: int, ran_on: list[int]) -> None:
    """Takes ``times`` cancellations and runs on after each (as ``asyncio.wait_for``
    on Python 3.11 does when its awaitable finished in the same loop turn)."""
    for i in range(times):
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            ran_on.append(i)
    await asyncio.Event().wait()


@pytest.mark.parametrize("times", [0, 1, 3])
async def test_a_task_that_swallows_cancellations_is_cancelled_until_it_ends(times: int) -> None:
    ran_on: list[int] = []
    task = asyncio.create_task(_swallows(times, ran_on))
    await asyncio.sleep(0)
    assert await cancel_and_wait(task, timeout=10) is True
    assert task.cancelled()
    assert ran_on == list(range(times))


async def test_a_task_that_never_ends_is_left_behind_after_the_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = asyncio.Event()

    async def stubborn() -> None:
        while not stop.is_set():
            try:
                await stop.wait()
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="audiosockets.tasks"):
        assert await cancel_and_wait(task, timeout=1.2) is False
    assert not task.done()
    assert "'stubborn' did not end 1.2 s after it was cancelled" in caplog.text
    stop.set()
    await task


async def test_the_tasks_own_error_is_raised_like_await_task() -> None:
    async def fails_on_cancel() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise OSError("socket gone") from None

    task = asyncio.create_task(fails_on_cancel())
    await asyncio.sleep(0)
    with pytest.raises(OSError, match="socket gone"):
        await cancel_and_wait(task)

    async def failed_before() -> None:
        raise ValueError("early")

    early = asyncio.create_task(failed_before())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="early"):
        await cancel_and_wait(early)
    assert await cancel_and_wait(None) is True


async def test_the_callers_cancellation_propagates_and_cancels_the_task_again() -> None:
    cancels = 0

    async def slow_to_stop() -> None:
        nonlocal cancels
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancels += 1
                if cancels >= 2:
                    raise

    inner = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    outer = asyncio.create_task(cancel_and_wait(inner, timeout=30))
    await wait_until(lambda: cancels == 1, timeout=5, what="the first cancellation")
    assert cancels == 1
    assert not outer.done()
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    await asyncio.sleep(0)
    assert inner.cancelled()
    assert cancels == 2
