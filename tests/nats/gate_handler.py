"""A processor handler the NATS observability test holds shut from outside.

While the file named by ``AUDIOSOCKETS_TEST_GATE_FILE`` exists, ``handle`` does
not return (it checks every 10 ms: the injected fault, a handler that hangs),
so the processor stops pulling and the audio waits in JetStream: the lag.
"""

from __future__ import annotations

import os
import time
from typing import Any

_GATE_FILE = os.environ.get("AUDIOSOCKETS_TEST_GATE_FILE", "")


def handle(chunk: Any) -> None:
    while _GATE_FILE and os.path.exists(_GATE_FILE):
        time.sleep(0.01)
