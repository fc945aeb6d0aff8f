"""Handler failures in a row, per stream, and when they mean the handler is broken.

One stream can fail on its own: its name (an archive file name the file system
refuses), its data, its format. Counting failures in a row over all streams made
such a stream end the run (exit 6) and take the healthy streams down with it. So
the count is per stream (a success on that stream resets it), and the run gives
up only when *every* active stream (one with an outcome within
``active_seconds``) has ``exit_after`` failures in a row: then it is the handler.

Pure: the caller passes the outcomes in; time comes from ``clock`` (seconds).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from ..errors import HandlerError

log = logging.getLogger("audiosockets.processor")

#: A stream counts toward the give-up rule while it had an outcome this recently (s).
ACTIVE_STREAM_SECONDS: Final = 30.0


class FailureTracker:
    """Failures in a row per stream of one handler, and what they mean.

    ``failing_after``: failures in a row that mark a stream failing (logged once)
    and set the handler's gauge (``set_failing(0|1)``: 1 while any stream is
    failing). ``exit_after``: failures in a row every active stream must have for
    ``give_up`` (0: never). ``clock``: seconds (monotonic).
    """

    def __init__(
        self,
        handler: str,
        failing_after: int,
        exit_after: int,
        clock: Callable[[], float],
        set_failing: Callable[[int], None],
        *,
        active_seconds: float = ACTIVE_STREAM_SECONDS,
    ) -> None:
        self.handler = handler
        self.failing_after = failing_after
        self.exit_after = exit_after
        self.active_seconds = active_seconds
        self._clock = clock
        self._set_failing = set_failing
        self._in_a_row: dict[str, int] = {}
        self._last_outcome: dict[str, float] = {}

    def succeeded(self, stream: str) -> None:
        """A chunk of ``stream`` was handled: its count starts over."""
        if self._in_a_row.get(stream, 0) >= self.failing_after:
            log.info("%s: handler recovered on %s", self.handler, stream)
        self._in_a_row[stream] = 0
        self._last_outcome[stream] = self._clock()
        self._update()

    def failed(self, stream: str) -> int:
        """A chunk of ``stream`` failed; returns the stream's failures in a row."""
        n = self._in_a_row[stream] = self._in_a_row.get(stream, 0) + 1
        self._last_outcome[stream] = self._clock()
        if n == self.failing_after:
            log.error(
                "%s: %d failures in a row, marked failing (stream %s)", self.handler, n, stream
            )
        self._update()
        return n

    def forget(self, stream: str) -> None:
        """``stream`` was released (closed, handed to another group member)."""
        self._in_a_row.pop(stream, None)
        self._last_outcome.pop(stream, None)
        self._update()

    def _update(self) -> None:
        self._set_failing(1 if self.failing else 0)

    @property
    def worst(self) -> int:
        """The most failures in a row of any stream."""
        return max(self._in_a_row.values(), default=0)

    @property
    def failing(self) -> bool:
        """Some stream has ``failing_after`` failures in a row."""
        return self.worst >= self.failing_after

    def give_up(self, in_a_row: int, last_error: str) -> HandlerError | None:
        """A ``HandlerError`` to end the run with if every active stream has
        ``exit_after`` failures in a row (the handler is broken), else None."""
        if not self.exit_after:
            return None
        now = self._clock()
        active = [s for s, t in self._last_outcome.items() if now - t <= self.active_seconds]
        if not active or any(self._in_a_row.get(s, 0) < self.exit_after for s in active):
            return None
        each = f" on each of its {len(active)} streams" if len(active) > 1 else ""
        return HandlerError(
            f"handler {self.handler} failed {in_a_row} times in a row{each} "
            f"(last: {last_error}); giving up"
        )


__all__ = ["ACTIVE_STREAM_SECONDS", "FailureTracker"]
