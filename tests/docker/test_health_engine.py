"""The relay image's HEALTHCHECK on the real engine: a wedged event loop turns it unhealthy.

The container runs the image's own ``audiosockets relay`` (same entrypoint, same
HEALTHCHECK) from a two-line wrapper that installs a SIGUSR1 handler blocking the
main thread, which is the thread the event loop runs on: ``docker kill -s USR1``
then wedges the loop the way a blocking call in a coroutine would, while the
metrics thread keeps serving. The test sees ``/healthz`` answer 503 with the reason,
``/metrics`` still answer 200, and Docker report the container ``unhealthy``; and,
as the README says, Docker leaves it running even with a restart policy.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from docker_harness import container_ip, docker, health, inspect, poll

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(300)]

METRICS_PORT = 9400
# Python runs signal handlers on the main thread, between two bytecodes of
# whatever it is doing there: here, the event loop. The sleep never returns.
WEDGE_ON_SIGUSR1 = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGUSR1, lambda *_: time.sleep(3600))\n"
    "from audiosockets.cli import main\n"
    "sys.exit(main())\n"
)
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(container: str, path: str) -> tuple[int, str]:
    url = f"http://{container_ip(container)}:{METRICS_PORT}{path}"
    try:
        with _OPENER.open(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


@pytest.fixture
def relay_container(service_images: str) -> Iterator[str]:
    name = f"audiosockets-wedge-{os.getpid()}"
    docker(
        "run", "--detach", "--name", name,
        "--restart", "unless-stopped",  # to show it does not restart an unhealthy container
        "--entrypoint", "tini",
        f"audiosockets/relay:{service_images}",
        "--", "python", "-c", WEDGE_ON_SIGUSR1, "relay",
    )  # fmt: skip
    try:
        yield name
    finally:
        docker("rm", "--force", name, timeout=60)


def last_probe_output(container: str) -> str:
    log = inspect(container)["State"].get("Health", {}).get("Log") or [{}]
    return str(log[-1].get("Output", ""))


def test_a_wedged_relay_turns_unhealthy_while_metrics_still_answers(relay_container: str) -> None:
    c = relay_container
    assert poll(lambda: health(c) == "healthy", 60), f"never healthy: {last_probe_output(c)}"
    assert get(c, "/healthz")[0] == 200
    assert get(c, "/readyz") == (200, "ready\n")

    docker("kill", "--signal", "USR1", c)

    assert poll(lambda: get(c, "/healthz")[0] == 503, 30), get(c, "/healthz")
    status, body = get(c, "/healthz")
    assert body.startswith("event loop stalled: no progress for "), body
    status, body = get(c, "/metrics")
    assert status == 200, "the metrics thread must keep answering"
    assert "audiosockets_build_info" in body

    assert poll(lambda: health(c) == "unhealthy", 60), last_probe_output(c)
    assert "HTTP 503: event loop stalled" in last_probe_output(c)
    # Docker only reports it: the container is still the same running process.
    state = inspect(c)
    assert state["State"]["Running"]
    assert state["RestartCount"] == 0
