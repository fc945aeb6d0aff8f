"""Choosing the asyncio event loop: uvloop where installed (the ``speed`` extra), else asyncio.

uvloop is an optional import. Whatever it returns is never passed back to a typed caller:
the only thing taken from it is a loop *factory*, handed to ``asyncio.Runner``, so the
code type-checks the same with and without the extra installed (mypy is configured to
treat every optional-extra module as untyped, see ``pyproject.toml``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar, get_args

from .errors import ConfigError

T = TypeVar("T")

#: ``auto``: uvloop if importable, else asyncio. ``uvloop``: uvloop or a ConfigError.
LoopName = Literal["auto", "asyncio", "uvloop"]
LOOP_NAMES: tuple[str, ...] = get_args(LoopName)

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(loop: LoopName = "auto") -> LoopFactory | None:
    """The event loop factory for ``loop``; ``None`` means asyncio's default loop.

    Raises:
        ConfigError: ``loop == "uvloop"`` and uvloop is not installed.
    """
    if loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if loop == "uvloop":
            raise ConfigError(
                "--loop uvloop asked for, but uvloop is not installed"
                " (pip install 'audiosockets[speed]')"
            ) from None
        return None
    factory: LoopFactory = uvloop.new_event_loop
    return factory


def run(coro: Coroutine[Any, Any, T], loop: LoopName = "auto") -> T:
    """Run ``coro`` to completion on a new event loop of kind ``loop`` and return its result.

    Raises:
        ConfigError: as :func:`loop_factory`; whatever ``coro`` raises propagates.
    """
    try:
        factory = loop_factory(loop)
    except ConfigError:
        coro.close()  # never awaited: close it so Python does not warn
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)
