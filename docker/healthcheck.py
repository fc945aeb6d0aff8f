"""Container health probe: exit 0 when the service's metrics endpoint answers.

Usage inside an image: ``python /opt/audiosockets/healthcheck.py PORT_ENV DEFAULT_PORT``.
The port is read from ``PORT_ENV`` (the same ``AUDIOSOCKETS_<COMMAND>_METRICS_PORT``
variable the service reads), so moving the port in compose's environment moves the
probe with it. It deliberately does not touch the relay's protocol port: a bare
connect there would be counted as a protocol error every interval. Standard library
only, so the probe still runs (and reports) when the package itself fails to import.
"""

from __future__ import annotations

import os
import sys
import urllib.request

TIMEOUT_SECONDS = 2.0


def probe(port: str) -> str | None:
    """Return why the metrics endpoint on ``port`` is unhealthy, or None."""
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            if response.status != 200:
                return f"{url} answered HTTP {response.status}"
    except OSError as exc:  # URLError and timeouts are OSErrors
        return f"{url}: {exc}"
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: healthcheck.py PORT_ENV DEFAULT_PORT", file=sys.stderr)
        return 2
    problem = probe(os.environ.get(argv[0]) or argv[1])
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
