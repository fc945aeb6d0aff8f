"""A processor handler the live test can stall from outside.

While the file named by ``AUDIOSOCKETS_TEST_STALL_FILE`` exists, each chunk
takes ``STALLED_SECONDS_PER_CHUNK``: 50 ms per 20 ms chunk, slower than real
time, so the processor's backlog overruns and drops the oldest chunks; it is
also the "50 ms handler" whose processing-time p95 the dashboards must read
as 50 ms. Every chunk it handles becomes an event line with its seq and
capture time and the time it took: the test's ground truth for what each
processor missed and how long the handler really ran.
"""

from __future__ import annotations

import os
import time
from typing import Any

STALLED_SECONDS_PER_CHUNK = 0.05
_STALL_FILE = os.environ.get("AUDIOSOCKETS_TEST_STALL_FILE", "")


def handle(chunk: Any) -> dict[str, Any]:
    started = time.perf_counter()
    if _STALL_FILE and os.path.exists(_STALL_FILE):
        time.sleep(STALLED_SECONDS_PER_CHUNK)  # the injected fault: a slow analysis
    # what the call really took (a loaded machine oversleeps): the p95's truth
    took = time.perf_counter() - started
    return {"captured_ns": chunk.captured_ns, "took": took}
