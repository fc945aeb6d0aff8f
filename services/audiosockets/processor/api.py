"""The handler API, typed: what ``--handler`` may name and what the processor calls.

A handler is one of:

- a function ``handle(chunk) -> result`` (shared by every stream);
- an object with a ``handle(chunk)`` method (shared by every stream);
- a class with a ``handle(chunk)`` method: one instance per stream, built with no
  arguments (built-ins get a ``HandlerContext``). It may also have
  ``setup(fmt)``, called before its first chunk and again after a format
  change, and ``teardown()``, called when its stream ends (relay closed it,
  group handover, format change, processor stopping); ``teardown`` may return
  events too.

``handle``, ``setup`` and ``teardown`` may be coroutines; they run to completion
on a private loop of the handler thread or worker. ``chunk`` is an
``audiosockets.audio.Chunk``: ``chunk.samples`` is a numpy array shaped
``(frames, channels)`` in the stream's sample type; ``chunk.captured_ns`` is the
capture time of its first frame (ns since the epoch); ``chunk.seq`` counts
chunks of the stream from 0.

A result is ``None`` (nothing to report), an event (a ``dict`` or a dataclass
instance, JSON-serialisable; numpy scalars and arrays, enums, bytes and paths
are converted), or a list/tuple of events. Each event becomes one JSON line with
``handler``, ``stream`` and ``seq`` added. Anything else, or an exception, is a
counted handler failure (``audiosockets_handler_errors_total``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..audio import AudioFormat, Chunk


@runtime_checkable
class Handler(Protocol):
    """Anything with ``handle(chunk)``: returns ``None``, an event or a list of events
    (or an awaitable of one of those)."""

    def handle(self, chunk: Chunk, /) -> object:
        """Analyse one chunk; ``None``, an event or a list of events (or an awaitable)."""


@runtime_checkable
class SetsUp(Protocol):
    """A handler instance told its stream's format before its first chunk."""

    def setup(self, fmt: AudioFormat, /) -> object:
        """Called before the stream's first chunk and after a format change."""


@runtime_checkable
class TearsDown(Protocol):
    """A handler instance told that its stream ended; may return final events."""

    def teardown(self) -> object:
        """Called once when the stream ends; may return final events (``seq`` omitted)."""


__all__ = ["Handler", "SetsUp", "TearsDown"]
