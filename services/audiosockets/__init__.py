"""audiosockets: real-time audio over sockets.

A recorder publishes audio chunks to a relay; the relay fans them out to any
number of processors, each in its own process, so a slow or crashing analysis
never stalls the recording or the other analyses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .audio import AudioFormat, Chunk, SampleType

__all__ = ["AudioFormat", "Chunk", "SampleType", "__version__"]


def __getattr__(name: str) -> Any:
    """``AudioFormat``, ``Chunk`` and ``SampleType`` on first use: importing the
    package costs no numpy, so the command line's first lines run at once
    (``entry.py``)."""
    if name in ("AudioFormat", "Chunk", "SampleType"):
        from . import audio

        return getattr(audio, name)
    raise AttributeError(f"module 'audiosockets' has no attribute {name!r}")
