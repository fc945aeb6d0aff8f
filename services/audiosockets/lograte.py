"""One log line per kind of event per interval, however many times it happens.

A flood of bad clients or a handler failing on every chunk must not become a
flood of log lines (issue 11: 133 MB of tracebacks). ``LogRateLimit.allow(key)``
says whether to log now; when it does after a quiet spell it also says how many
lines of that key it held back, so the next line carries the count.
``LogRateLimit.warning`` is that decision and the line in one call.

State: per key, when it was last logged and how many were held back since; one
entry per key ever seen, so keys are a small fixed set (reasons, kinds of
refusal), never client-chosen text.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class LogRateLimit:
    """At most one line per ``key`` every ``interval`` seconds (``clock``: monotonic)."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str) -> tuple[bool, int]:
        """``(log now, lines held back since the last one)`` for ``key``."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return False, 0
        self._last[key] = now
        return True, self._held.pop(key, 0)

    def warning(self, logger: logging.Logger, key: str, message: str, *args: object) -> bool:
        """Log ``message % args`` at WARNING on ``logger`` if ``allow(key)``, with
        "(and N more like it since the last such line)" when N were held back;
        returns whether it logged."""
        now, held = self.allow(key)
        if not now:
            return False
        if held:
            logger.warning(message + " (and %d more like it since the last such line)", *args, held)
        else:
            logger.warning(message, *args)
        return True
