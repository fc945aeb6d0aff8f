"""audiosockets: real-time audio over sockets.

A recorder publishes audio chunks to a relay; the relay fans them out to any
number of processors, each in its own process, so a slow or crashing analysis
never stalls the recording or the other analyses.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .audio import AudioFormat, Chunk, SampleType

__all__ = ["AudioFormat", "Chunk", "SampleType", "__version__"]
