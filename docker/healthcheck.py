"""Container health probe: exit 0 when the service's event loop is alive.

Usage inside an image: ``python /opt/audiosockets/healthcheck.py PORT_ENV DEFAULT_PORT [PATH]``.
It asks ``PATH`` (default ``/healthz``) on the service's metrics port, read from
``PORT_ENV`` (the same ``AUDIOSOCKETS_<COMMAND>_METRICS_PORT`` variable the service
reads), so moving the port in compose's environment moves the probe with it.

``/healthz`` answers 503 when the service's asyncio event loop has made no progress
for 10 s (a heartbeat on the loop, checked by the HTTP thread; see
``audiosockets/health.py``). ``/metrics`` alone would not do: it is served from its
own thread and keeps answering while the loop is wedged. Docker only marks the
container unhealthy; what restarts it is an orchestrator (README, "Deployment").

It deliberately does not touch the relay's protocol port: a bare connect there
would be counted as a protocol error every interval. Standard library only, so the
probe still runs (and reports) when the package itself fails to import; no proxy
from the environment is used for this loopback request.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_SECONDS = 2.0
DEFAULT_PATH = "/healthz"


def probe(port: str, path: str = DEFAULT_PATH) -> str | None:
    """Return why ``path`` on ``port`` is unhealthy (the service's own words), or None."""
    url = f"http://127.0.0.1:{port}{path}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT_SECONDS) as response:
            if response.status != 200:
                return f"{url} answered HTTP {response.status}"
    except urllib.error.HTTPError as exc:  # 503 and its one-line reason
        reason = exc.read(500).decode(errors="replace").strip()
        return f"{url} answered HTTP {exc.code}: {reason}"
    except OSError as exc:  # URLError and timeouts are OSErrors
        return f"{url}: {exc}"
    return None


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: healthcheck.py PORT_ENV DEFAULT_PORT [PATH]", file=sys.stderr)
        return 2
    path = argv[2] if len(argv) == 3 else DEFAULT_PATH
    problem = probe(os.environ.get(argv[0]) or argv[1], path)
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
