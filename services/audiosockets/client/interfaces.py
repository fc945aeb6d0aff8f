"""Typed seams: what other services read from the client library.

The recorder and the processor type against these protocols instead of
reaching into ``PublishedStream``/``Subscriber`` with ``getattr``. A future
transport (e.g. NATS JetStream behind the same ``Publisher``/``Subscriber``
API) must provide the same members.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..audio import AudioFormat, Chunk
from .history import SpooledChunk


@runtime_checkable
class SpoolingStream(Protocol):
    """One published stream as its producer (the recorder) sees it."""

    @property
    def name(self) -> str:
        """The stream's name (1..``Limits.max_name_length`` bytes of UTF-8)."""
        ...

    @property
    def format(self) -> AudioFormat:
        """The stream's audio format, fixed for its lifetime."""
        ...

    @property
    def unsent(self) -> int:
        """Chunks queued (spooled) but not yet written to the relay."""
        ...

    @property
    def spooled_seconds(self) -> float:
        """Seconds of audio queued but not yet written to the relay (>= 0.0)."""
        ...

    def unsent_chunks(self) -> Sequence[SpooledChunk]:
        """The ``unsent`` chunks, oldest first (a copy; the spool is unchanged)."""
        ...

    def send(
        self, samples: np.ndarray[Any, Any] | bytes | memoryview, captured_ns: int | None = None
    ) -> int:
        """Queue one chunk; returns its sequence number. Never blocks."""
        ...


@runtime_checkable
class ChunkSubscription(Protocol):
    """A source of chunks as a consumer (the processor) sees it."""

    def __aiter__(self) -> AsyncIterator[Chunk]:
        """Iterate over received chunks, in arrival order per stream."""
        ...

    @property
    def assigned(self) -> AbstractSet[str]:
        """Names of the streams the relay currently gives this subscriber (its group share)."""
        ...

    def ack(self, stream: str, seq: int) -> None:
        """Mark ``stream`` processed up to and including ``seq``."""
        ...
