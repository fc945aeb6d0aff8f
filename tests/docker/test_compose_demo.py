"""The demo profile of compose.yaml, as a user without a microphone runs it.

Brings up exactly the services of compose.yaml (no override) except
Prometheus and Grafana, whose images come from a registry: the relay, the
synthetic ``recorder-demo`` and the ``level``, ``vad`` and ``archive``
processors, ``processor`` scaled to two. Asserts from the relay's status and
the processors' metrics that every built-in handler works on the demo stream,
that the scaled service still handles the stream once, and that the demo
recorder answers to the name Prometheus scrapes (``recorder``).
"""

from __future__ import annotations

import os
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from docker_harness import (
    ROOT,
    Compose,
    Scrape,
    container_ip,
    health,
    poll,
    scrape,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]

STREAM = "demo-1"  # DEMO_STREAM's default in .env
PROCESSORS = ("processor", "processor-vad", "processor-archive")
PORT = 9402


@dataclass
class Demo:
    status: dict[str, object] = field(default_factory=dict)
    level_replicas: list[Scrape] = field(default_factory=list)
    vad: Scrape | None = None
    archive: Scrape | None = None
    recorder_alias_resolves: bool = False
    relay_metrics: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def demo(service_images: str) -> Iterator[Demo]:
    tag = service_images
    compose = Compose(
        f"audiosockets-demo-{os.getpid()}",
        [ROOT / "compose.yaml"],
        {"AUDIOSOCKETS_IMAGE_TAG": tag, "RELAY_PUBLISH": "127.0.0.1:"},
        profiles=["demo"],
    )
    result = Demo()
    try:
        compose.up(["relay", "recorder-demo", *PROCESSORS], scale={"processor": 2})
        containers = {name: compose.containers(name) for name in PROCESSORS}
        everything = [c for cs in containers.values() for c in cs]

        def ready() -> bool:
            archive = scrape(containers["processor-archive"][0], PORT)
            return (
                all(health(c) == "healthy" for c in everything)
                and archive.value("audiosockets_archive_bytes_total", stream=STREAM) > 0
            )

        if not poll(ready, 90):
            raise AssertionError(f"the demo pipeline did not come up:\n{compose.logs()}")
        result.status = compose.relay_status()
        result.level_replicas = [scrape(c, PORT) for c in containers["processor"]]
        result.vad = scrape(containers["processor-vad"][0], PORT)
        result.archive = scrape(containers["processor-archive"][0], PORT)
        resolve = "import socket; socket.gethostbyname('recorder')"
        done = compose.run(
            "exec", "-T", "relay", "python", "-c", f"{resolve}; print('ok')", check=False
        )
        result.recorder_alias_resolves = done.strip() == "ok"
        with urllib.request.urlopen(
            f"http://{container_ip(compose.containers('relay')[0])}:9400/metrics", timeout=5
        ) as response:
            result.relay_metrics = response.read().decode().splitlines()
        yield result
    finally:
        compose.down()


def test_demo_stream_reaches_every_processor_group(demo: Demo) -> None:
    groups = demo.status["groups"]
    assert isinstance(groups, dict)
    for group in ("level", "vad", "archive"):
        assert list(groups[group]["assignment"]) == [STREAM], group


def test_scaled_level_service_handles_the_stream_once(demo: Demo) -> None:
    assert len(demo.level_replicas) == 2
    handling = [
        m for m in demo.level_replicas if m.value("audiosockets_chunks_processed_total") > 0
    ]
    assert len(handling) == 1
    # speechlike has pauses: the level may sit at the silence floor when scraped.
    level = ("audiosockets_level_dbfs", frozenset({("stream", STREAM), ("channel", "0")}))
    rms = [v for (n, ls), v in handling[0].samples.items() if n == level[0] and level[1] <= ls]
    assert rms, "no audiosockets_level_dbfs for the demo stream"
    assert all(-120 <= v <= 0 for v in rms)


def test_vad_and_archive_run_on_the_demo_stream(demo: Demo) -> None:
    assert demo.vad is not None
    assert demo.archive is not None
    assert demo.vad.value("audiosockets_chunks_processed_total", stream=STREAM) > 0
    assert ("audiosockets_vad_active", frozenset({("stream", STREAM)})) in demo.vad.samples
    assert demo.archive.value("audiosockets_archive_bytes_total", stream=STREAM) > 0


def test_demo_recorder_answers_to_the_name_prometheus_scrapes(demo: Demo) -> None:
    assert demo.recorder_alias_resolves


def test_relay_metrics_have_one_series_per_label_set_when_scaled(demo: Demo) -> None:
    series = [line.rsplit(" ", 1)[0] for line in demo.relay_metrics if not line.startswith("#")]
    duplicates = [s for s, n in Counter(series).items() if n > 1]
    assert series
    assert duplicates == []
