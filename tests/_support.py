"""Small helpers shared by the test suite."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip when a system component is missing; under CI=true, fail instead."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def require_binary(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"{name} is not installed")
    assert path is not None
    return path


async def wait_until(
    predicate: Callable[[], bool], *, timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` on the event loop until true or the deadline passes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.01)


def wait_until_sync(
    predicate: Callable[[], bool],
    *,
    timeout: float = 10.0,
    what: str = "condition",
    every: float = 0.02,
) -> None:
    """Call ``predicate`` every ``every`` seconds until it is true; AssertionError
    naming ``what`` after ``timeout`` seconds. A predicate that scrapes a service
    should poll slower (0.2 s): each scrape costs the service under test CPU."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


async def gather_with_timeout(*aws: Awaitable[object], timeout: float = 10.0) -> list[object]:
    async with asyncio.timeout(timeout):
        return list(await asyncio.gather(*aws))


def children_of(pid: int) -> set[int]:
    """The pids whose parent is ``pid`` (zombies excluded)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        state, ppid = text[text.rindex(")") + 2 :].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.add(int(text.split(" ", 1)[0]))
    return found


def alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] != "Z"


async def wait_gone(pids: set[int], what: str, timeout: float = 5.0) -> None:
    """Wait until none of ``pids`` runs any more (a zombie counts as gone)."""
    await wait_until(lambda: not any(alive(pid) for pid in pids), timeout=timeout, what=what)


async def end_for_good(parent: asyncio.subprocess.Process, children: set[int]) -> None:
    """Cleanup after a process-lifecycle test: ``parent`` killed and reaped if it
    still runs, and every one of ``children`` still running SIGKILLed (a broken
    fix must not leave them behind)."""
    if parent.returncode is None:
        parent.kill()
        await parent.wait()
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
