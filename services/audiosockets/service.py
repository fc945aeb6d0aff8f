"""One lifecycle for every service, and the one place that handles signals.

Every long-running service (relay, recorder, processor) has the same shape:

- ``await start()`` returns once the service is bound or connected and ready
  (a listener bound to port 0 knows its real port by then);
- ``await serve_forever()`` returns when the service ends by itself (a finite
  source ran out, a handler gave up: then it raises) or after ``stop()``;
- ``await stop()`` stops taking new work, drains what is in flight within the
  service's own timeout, and releases everything ``start()`` acquired. It may
  be called more than once and before ``serve_forever`` returned.

``run_service`` wraps the three with SIGINT/SIGTERM/SIGHUP handling (SIGHUP: the
terminal closed or ``kill -HUP``; its default action would end the process on the
spot, losing the recorder's in-memory spool); ``signal_handlers``
installs callbacks on the running loop and restores the handlers that were in
place before (a Python handler, ``SIG_IGN``, the default, or the callbacks of
an enclosing ``signal_handlers`` on the same loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, Protocol, TypeVar

from .tasks import cancel_and_wait

log = logging.getLogger("audiosockets.service")

#: SIGHUP where the platform has one (not on Windows).
HANGUP_SIGNALS: Final[tuple[signal.Signals, ...]] = (
    (signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()
)
#: Interrupt and terminate: the signals that stop every service, the relay too.
TERMINATE_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)
#: The signals that ask a service to stop and drain. A service that gives SIGHUP
#: another meaning (the relay reloads its credentials) uses ``TERMINATE_SIGNALS``.
STOP_SIGNALS: Final = (*TERMINATE_SIGNALS, *HANGUP_SIGNALS)
#: Seconds ``serve_forever`` gets to return once ``stop()`` returned (stop already drained).
STOP_GRACE: Final = 5.0


class Service(Protocol):
    """What ``run_service`` drives; see the module docstring for the contract."""

    async def start(self) -> object:
        """Bind/connect and get ready; returns once ready. Raises if it cannot start."""

    async def serve_forever(self) -> object:
        """Run until the service ends by itself or ``stop()``; raises a fatal error."""

    async def stop(self) -> object:
        """Stop taking work, drain within the service's timeout, release resources."""


S = TypeVar("S", bound=Service)

_Handler = Callable[[int, Any], Any] | int | signal.Handlers | None


class _LoopSignals:
    """The callbacks ``signal_handlers`` installed on one loop, per signal.

    A loop keeps one handler per signal, so nested or overlapping users (the
    demo runs several services in one loop) share one dispatcher that calls
    every registered callback; the Python-level handler that was in place
    before the first one is put back when the last one leaves.
    """

    def __init__(self) -> None:
        self.callbacks: dict[signal.Signals, list[Callable[[], object]]] = {}
        self.previous: dict[signal.Signals, _Handler] = {}

    def dispatch(self, sig: signal.Signals) -> None:
        for callback in list(self.callbacks.get(sig, ())):
            callback()


_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopSignals] = (
    weakref.WeakKeyDictionary()
)

#: SIGHUPs that arrived while ``hold_hangups`` held them, before a service's own
#: handlers were in (the command line's start: about a second of imports).
_held_hangups: list[int] = []


def _hold_hangup(signum: int, frame: object) -> None:
    _held_hangups.append(signum)


def hold_hangups() -> None:
    """Keep a SIGHUP that arrives while the command line starts (imports, reading
    its configuration) for the service to handle once its handlers are in.

    SIGHUP's default action ends the process on the spot: a relay sent a reload
    right after it was started, or a terminal closed as a recorder starts, would
    die (exit 129) instead of reloading or stopping cleanly. The first
    ``signal_handlers`` for SIGHUP on a loop then gets the held signal (once, on
    the loop). A command that runs no service ignores it. A Python-level handler,
    so it is not inherited by the processes a command starts (``exec`` resets it).
    Call it first thing, before the slow imports; a no-op without SIGHUP.
    """
    for sig in HANGUP_SIGNALS:
        signal.signal(sig, _hold_hangup)


@contextlib.contextmanager
def signal_handlers(
    callback: Callable[[], object], signals: Iterable[signal.Signals] = STOP_SIGNALS
) -> Iterator[list[signal.Signals]]:
    """Call ``callback`` (on the running loop) when one of ``signals`` arrives.

    Yields the signals actually handled: none outside the main thread or on a
    loop without signal support (Windows' proactor), where this is a no-op.
    On exit the handlers in place before are restored: the previous Python
    handler (``signal.getsignal``), or the callbacks of an enclosing
    ``signal_handlers`` block on the same loop, which keep working throughout.
    """
    loop = asyncio.get_running_loop()
    state = _by_loop.setdefault(loop, _LoopSignals())
    installed: list[signal.Signals] = []
    for sig in signals:
        callbacks = state.callbacks.setdefault(sig, [])
        if not callbacks:
            previous = signal.getsignal(sig)
            try:
                loop.add_signal_handler(sig, state.dispatch, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                continue  # not the main thread, or no signal support on this loop
            state.previous[sig] = previous
            if previous is _hold_hangup and _held_hangups:
                _held_hangups.clear()
                loop.call_soon(state.dispatch, sig)  # the hang-up that came before us
        callbacks.append(callback)
        installed.append(sig)
    try:
        yield installed
    finally:
        for sig in installed:
            callbacks = state.callbacks[sig]
            callbacks.remove(callback)
            if callbacks:
                continue
            loop.remove_signal_handler(sig)  # resets to SIG_DFL / default_int_handler
            previous = state.previous.pop(sig)
            if previous is not None:  # None: installed outside Python, cannot restore
                signal.signal(sig, previous)


async def run_service(
    service: S,
    *,
    ready: Callable[[S], object] | None = None,
    signals: Iterable[signal.Signals] = STOP_SIGNALS,
) -> None:
    """``start``, ``serve_forever`` until it returns or a signal arrives, then ``stop``.

    Signal handlers go in before ``start()``, so a signal sent as soon as the
    service announces itself is handled; ``ready(service)`` is called once
    ``start()`` returned. ``stop()`` always runs once ``start()`` succeeded
    (also when ``serve_forever`` raised or the caller was cancelled), and an
    exception from ``serve_forever`` (e.g. ``HandlerError``) is raised after it.
    """
    requested = asyncio.Event()
    with signal_handlers(requested.set, signals):
        await service.start()
        serving = asyncio.ensure_future(service.serve_forever())
        try:
            if ready is not None:
                ready(service)
            waiter = asyncio.ensure_future(requested.wait())
            try:
                await asyncio.wait({serving, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if requested.is_set():
                log.info("%s: stop requested by signal, draining", type(service).__name__)
        finally:
            try:
                await service.stop()
            finally:
                await _settle(service, serving)
        serving.result()  # raises what serve_forever raised


async def _settle(service: Service, serving: asyncio.Future[object]) -> None:
    """After ``stop()``: ``serve_forever`` must return; a hung one is cancelled, said loudly."""
    if serving.done():
        return
    done, _ = await asyncio.wait({serving}, timeout=STOP_GRACE)
    if not done:
        log.error(
            "%s: serve_forever did not return after stop(); cancelled", type(service).__name__
        )
        with contextlib.suppress(Exception):
            await cancel_and_wait(serving)


__all__ = [
    "HANGUP_SIGNALS",
    "STOP_GRACE",
    "STOP_SIGNALS",
    "TERMINATE_SIGNALS",
    "Service",
    "hold_hangups",
    "run_service",
    "signal_handlers",
]
