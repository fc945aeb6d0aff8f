"""Stopping a background task so that it really stops.

``task.cancel(); await task`` looks final, but on Python 3.11 a task can take a
cancellation and go on running: ``asyncio.wait_for`` returns the result of an
awaitable that completed in the same loop turn as the cancellation and drops
the ``CancelledError`` (fixed in 3.12; this is why the package uses
``asyncio.timeout`` instead, and tests/test_codebase.py holds it to that). A
library can do the same. A task that swallowed its cancellation and then
blocks (a JetStream reader putting into a full hand-off queue nobody reads any
more) turns ``await task`` into a hang: a processor that never exits after
SIGTERM.

``cancel_and_wait`` cancels again until the task ends, bounded in time, and
never swallows the *caller's* own cancellation.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

#: Seconds between repeated cancellations of a task that did not end.
_RECANCEL_EVERY = 0.5


async def cancel_and_wait(task: asyncio.Future[Any] | None, *, timeout: float = 10.0) -> bool:
    """Cancel ``task`` and wait until it has finished, like ``task.cancel(); await task``.

    Returns True once the task has ended (``task`` None counts as ended). Raises
    what the task raised other than its cancellation, as ``await task`` would
    (a task that had already failed before the call too). Cancels again every
    0.5 s while the task runs on (it took a cancellation without ending), for up
    to ``timeout`` s in all; a task still running then is logged as an error
    and left behind (returns False), so a stuck task cannot hang a shutdown.
    If the caller is cancelled meanwhile, ``task`` is cancelled once more and
    the caller's ``CancelledError`` propagates.
    """
    if task is None:
        return True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.error(
                "task %s did not end %g s after it was cancelled; left behind",
                _name(task),
                timeout,
            )
            return False
        task.cancel()
        try:
            await asyncio.wait({task}, timeout=min(_RECANCEL_EVERY, remaining))
        except asyncio.CancelledError:
            task.cancel()
            raise
    if not task.cancelled() and (error := task.exception()) is not None:
        raise error
    return True


def _name(task: asyncio.Future[Any]) -> str:
    return repr(task.get_name()) if isinstance(task, asyncio.Task) else repr(task)


__all__ = ["cancel_and_wait"]
