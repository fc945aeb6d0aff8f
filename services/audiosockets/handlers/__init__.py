"""Built-in processor handlers and the small API they share.

A built-in is a class constructed with a ``HandlerContext`` (one instance per
stream) that follows the user handler protocol: ``setup(fmt)``,
``handle(chunk) -> None | Event | list[Event]``, ``teardown()``.

Invariants:
- Built-ins never touch Prometheus objects. They report through
  ``HandlerContext.sink`` (``MetricOp`` records); the processor applies the
  records on its event loop. That is what lets the same handler run in a
  thread or in a worker process (where a registry of its own would never be
  scraped).
- Every metric a built-in may write is named in ``GAUGES``/``COUNTERS``; the
  processor maps those names onto the metric objects of ARCHITECTURE.md.
- ``BUILTINS`` maps a spec name to ``"module:Class"`` and is imported lazily,
  so ``level`` never imports what ``archive`` needs.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from ..audio import Chunk
from ..convert import FULL_SCALE as _CONVERT_FULL_SCALE
from ..errors import HandlerError

GaugeName = Literal["level_dbfs", "seconds_since_sound", "vad_active", "band_energy_dbfs"]
CounterName = Literal[
    "clipped_samples", "vad_segments", "archive_segments", "archive_bytes", "archive_evictions"
]
GAUGES: tuple[GaugeName, ...] = (
    "level_dbfs",
    "seconds_since_sound",
    "vad_active",
    "band_energy_dbfs",
)
COUNTERS: tuple[CounterName, ...] = (
    "clipped_samples",
    "vad_segments",
    "archive_segments",
    "archive_bytes",
    "archive_evictions",
)

#: A JSON-serialisable event: a mapping, or a dataclass instance.
Event = Mapping[str, Any] | Any


class MetricOp(NamedTuple):
    """One metric update made by a handler: ``set`` a gauge or ``inc`` a counter."""

    op: Literal["set", "inc"]
    metric: str
    labels: tuple[str, ...]
    value: float


@dataclass(slots=True)
class MetricSink:
    """Collects a handler's metric updates; the processor drains and applies them."""

    ops: list[MetricOp] = field(default_factory=list)

    def set(self, metric: GaugeName, labels: tuple[str, ...], value: float) -> None:
        self.ops.append(MetricOp("set", metric, labels, float(value)))

    def inc(self, metric: CounterName, labels: tuple[str, ...], amount: float = 1.0) -> None:
        self.ops.append(MetricOp("inc", metric, labels, float(amount)))

    def drain(self) -> list[MetricOp]:
        ops, self.ops = self.ops, []
        return ops


@dataclass(frozen=True, slots=True)
class HandlerOptions:
    """Knobs the CLI passes to built-ins (picklable: sent to worker processes)."""

    segment_seconds: float = 60.0
    #: archive: segment files open at once (one per stream being written); past
    #: it the least recently written is completed early. Below the process's
    #: descriptor limit (1024 by default), with room for sockets and logs.
    max_open_segments: int = 256


@dataclass(slots=True)
class HandlerContext:
    """What a built-in handler instance gets: its stream, its argument, a sink."""

    stream: str
    arg: str | None
    options: HandlerOptions
    sink: MetricSink


class Builtin(NamedTuple):
    """One built-in handler: where its class lives and how its spec is written."""

    #: ``module:Class``, imported only when the built-in is used.
    target: str
    #: Whether the spec takes ``:ARG`` (``archive:DIR``, ``vad:key=value``).
    takes_arg: Literal["none", "optional", "required"]
    #: Keeps state across chunks, so it must see every chunk of a stream in order
    #: (one instance per stream; at most one worker process).
    stateful: bool


#: Spec name -> the built-in it names.
BUILTINS: dict[str, Builtin] = {
    "level": Builtin("audiosockets.handlers.level:Level", "optional", stateful=True),
    "vad": Builtin("audiosockets.handlers.vad:Vad", "optional", stateful=True),
    "archive": Builtin("audiosockets.handlers.archive:Archive", "required", stateful=True),
    "spectrum": Builtin("audiosockets.handlers.spectrum:Spectrum", "none", stateful=False),
}


def builtin_class(name: str) -> type[Any]:
    """Import and return the class of built-in ``name`` (a key of ``BUILTINS``).

    Raises ``KeyError`` for an unknown name (``parse_spec`` checks names first).
    """
    target = BUILTINS[name].target
    module, _, attr = target.partition(":")
    cls: type[Any] = getattr(importlib.import_module(module), attr)
    return cls


#: Full scale per sample type: the magnitude that maps to 1.0 (0 dBFS peak). One table
#: for the meters and the converters (``convert.FULL_SCALE``).
FULL_SCALE = _CONVERT_FULL_SCALE

#: dBFS reported for digital silence instead of -inf (alerting rules stay simple).
FLOOR_DBFS = -120.0


def normalized(chunk: Chunk) -> npt.NDArray[np.float64]:
    """Samples as float64 in [-1, 1), shaped ``(frames, channels)``."""
    scale = FULL_SCALE[chunk.format.sample_type]
    return np.asarray(chunk.samples, dtype=np.float64) / scale


def dbfs(ratio: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """20*log10 of an amplitude ratio, clamped to ``FLOOR_DBFS``."""
    with np.errstate(divide="ignore"):
        out: npt.NDArray[np.float64] = np.maximum(20.0 * np.log10(ratio), FLOOR_DBFS)
    return out


def parse_params(handler: str, arg: str | None, defaults: Mapping[str, float]) -> dict[str, float]:
    """Parse ``key=value,key=value`` into floats, starting from ``defaults``.

    Unknown keys and non-numbers are a ``HandlerError`` naming the accepted keys.
    """
    values = dict(defaults)
    if not arg:
        return values
    for item in arg.split(","):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in defaults:
            known = ", ".join(f"{k}=" for k in defaults) or "no options"
            raise HandlerError(f"handler {handler}: unknown option {item!r} (accepted: {known})")
        try:
            values[key] = float(raw)
        except ValueError:
            raise HandlerError(
                f"handler {handler}: option {key} needs a number, got {raw!r}"
            ) from None
    return values


__all__ = [
    "BUILTINS",
    "COUNTERS",
    "FLOOR_DBFS",
    "FULL_SCALE",
    "GAUGES",
    "Builtin",
    "CounterName",
    "Event",
    "GaugeName",
    "HandlerContext",
    "HandlerOptions",
    "MetricOp",
    "MetricSink",
    "builtin_class",
    "dbfs",
    "normalized",
    "parse_params",
]
