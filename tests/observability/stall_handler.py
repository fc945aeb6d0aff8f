"""A processor handler the live test can stall from outside.

While the file named by ``AUDIOSOCKETS_TEST_STALL_FILE`` exists, each chunk
takes ``STALLED_SECONDS_PER_CHUNK`` (far slower than real time for 20 ms
chunks), so the processor's backlog overruns and drops the oldest chunks.
Every chunk it does handle becomes an event line with its seq: the test's
ground truth for what was lost.
"""

from __future__ import annotations

import os
import time
from typing import Any

STALLED_SECONDS_PER_CHUNK = 0.1
_STALL_FILE = os.environ.get("AUDIOSOCKETS_TEST_STALL_FILE", "")


def handle(chunk: Any) -> dict[str, Any]:
    if _STALL_FILE and os.path.exists(_STALL_FILE):
        time.sleep(STALLED_SECONDS_PER_CHUNK)  # the injected fault: a slow analysis
    return {"handled": True}
