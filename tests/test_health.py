"""/healthz and /readyz beside /metrics: liveness means the event loop makes progress.

A wedged loop (a blocking call on the loop's thread) must turn /healthz to 503
while /metrics, served from another thread, keeps answering: that is the case
the old probe, which read /metrics, called healthy. Readiness follows what the
service reports (a live session with the relay), and each service wires both.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from _support import free_port, wait_until_sync
from audiosockets.health import Health, Heartbeat, Verdict, serve_http, session_ready
from audiosockets.metrics import Metrics, serve_metrics

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# Loopback only: never through a proxy the environment may name.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(port: int, path: str) -> tuple[int, str]:
    """Status and body of GET ``path``; an HTTP error status is an answer, not a failure.

    Nothing listening yet is status 0.
    """
    try:
        with _OPENER.open(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


# --- the decision, on a fake clock ---------------------------------------------


def test_liveness_fails_once_the_heartbeat_is_older_than_the_stall_limit() -> None:
    clock = FakeClock()
    loop = asyncio.new_event_loop()
    try:
        heartbeat = Heartbeat(interval=1.0, clock=clock)
        health = Health(heartbeat, stall_seconds=10.0)
        assert not health.liveness().ok  # no beat yet
        assert "not started" in health.liveness().reason
        heartbeat.start(loop)
        assert health.liveness().ok
        clock.now += 10.0
        assert health.liveness().ok  # exactly at the limit is still alive
        clock.now += 0.5
        verdict = health.liveness()
        assert not verdict.ok
        assert verdict.reason == "event loop stalled: no progress for 10.5 s (limit 10 s)"
        assert not health.readiness().ok  # a wedged service is not ready either
        heartbeat.stop()
    finally:
        loop.close()


def test_stall_limit_must_exceed_the_heartbeat_interval() -> None:
    with pytest.raises(ValueError, match="must exceed the heartbeat interval"):
        Health(Heartbeat(interval=2.0), stall_seconds=2.0)
    with pytest.raises(ValueError, match="interval must be > 0"):
        Heartbeat(interval=0)


def test_readiness_follows_the_clients_session_gauge() -> None:
    metrics = Metrics()
    heartbeat = Heartbeat(clock=FakeClock())
    loop = asyncio.new_event_loop()
    try:
        heartbeat.start(loop)
        health = Health(heartbeat, session_ready(metrics.registry, "publisher"))
        assert health.readiness() == Verdict(False, "no live session with the relay (publisher)")
        metrics.connected.labels("publisher").set(1)
        assert health.readiness().ok
        metrics.connected.labels("publisher").set(0)
        assert not health.readiness().ok
        heartbeat.stop()
    finally:
        loop.close()


# --- a real loop wedged on its own thread ---------------------------------------


@pytest.fixture
def loop_in_thread() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="service-loop", daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_a_wedged_loop_fails_healthz_while_metrics_still_answers(
    loop_in_thread: asyncio.AbstractEventLoop,
) -> None:
    loop = loop_in_thread
    metrics = Metrics()
    heartbeat = Heartbeat(interval=0.05)
    loop.call_soon_threadsafe(heartbeat.start, loop)
    health = Health(heartbeat, stall_seconds=0.5)
    port = serve_metrics(0, metrics.registry, "127.0.0.1", health=health)
    wait_until_sync(lambda: get(port, "/healthz")[0] == 200, what="a live heartbeat")
    assert get(port, "/readyz") == (200, "ready\n")

    release = threading.Event()
    loop.call_soon_threadsafe(release.wait, 30)  # blocks the loop's thread
    try:
        wait_until_sync(lambda: get(port, "/healthz")[0] == 503, what="/healthz failing")
        status, body = get(port, "/healthz")
        assert status == 503
        assert body.startswith("event loop stalled: no progress for ")
        assert get(port, "/readyz")[0] == 503
        status, body = get(port, "/metrics")
        assert status == 200
        assert "audiosockets_build_info" in body
        # The images' HEALTHCHECK says so too, with the service's reason.
        probe = container_probe(port)
        assert probe.returncode == 1
        assert "HTTP 503: event loop stalled" in probe.stderr
    finally:
        release.set()
    # Unwedged, the next heartbeat makes it healthy again.
    wait_until_sync(lambda: get(port, "/healthz")[0] == 200, what="/healthz recovering")
    assert container_probe(port).returncode == 0


def container_probe(port: int) -> subprocess.CompletedProcess[str]:
    """docker/healthcheck.py, as the images' HEALTHCHECK runs it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "docker" / "healthcheck.py"), "PROBE_PORT", "1"],
        env={**os.environ, "PROBE_PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_without_health_the_probe_paths_are_not_found() -> None:
    metrics = Metrics()
    port = serve_http(0, metrics.registry, None, "127.0.0.1")
    assert get(port, "/healthz")[0] == 404
    assert get(port, "/readyz")[0] == 404
    assert get(port, "/metrics")[0] == 200


# --- the services wire it -----------------------------------------------------------


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "audiosockets", "--log-level", "warning", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("AUDIOSOCKETS_")},
    )


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.slow
def test_relay_recorder_and_processor_serve_health_beside_metrics() -> None:
    relay_port, relay_metrics, rec_metrics, proc_metrics = (free_port() for _ in range(4))
    relay_url = f"tcp://127.0.0.1:{relay_port}"
    procs = []
    try:
        recorder = start(
            "record", "--relay", relay_url, "--stream", "health-1",
            "--source", "synth:sine:440", "--metrics-port", str(rec_metrics),
        )  # fmt: skip
        procs.append(recorder)
        # The relay is not there yet: alive, but not ready.
        wait_until_sync(lambda: get(rec_metrics, "/healthz")[0] == 200, what="recorder alive")
        assert get(rec_metrics, "/readyz") == (503, "no live session with the relay (publisher)\n")

        relay = start(
            "relay", "--listen", relay_url, "--metrics-port", str(relay_metrics),
            "--heartbeat-seconds", "0.5",
        )  # fmt: skip
        procs.append(relay)
        processor = start(
            "process", "--relay", relay_url, "--handler", "level",
            "--metrics-port", str(proc_metrics),
        )  # fmt: skip
        procs.append(processor)
        for port, what in ((relay_metrics, "relay"), (rec_metrics, "recorder"),
                           (proc_metrics, "processor")):  # fmt: skip
            wait_until_sync(lambda p=port: get(p, "/readyz")[0] == 200, what=f"{what} ready")
            assert get(port, "/healthz")[0] == 200, what
            assert get(port, "/metrics")[0] == 200, what

        stop(relay)
        wait_until_sync(lambda: get(rec_metrics, "/readyz")[0] == 503, what="recorder not ready")
        assert get(rec_metrics, "/healthz")[0] == 200  # spooling is not a reason to restart
    finally:
        for proc in procs:
            stop(proc)


# --- the relay's readiness ------------------------------------------------------------


async def test_relay_is_ready_only_while_it_listens() -> None:
    """/readyz of the relay says "not ready" once its listener is gone: during
    the drain after SIGTERM, or if the listening socket was closed under it. A
    heartbeat alone (the loop runs) is liveness, not readiness."""
    from audiosockets.relay import Relay, RelayConfig

    relay = Relay(RelayConfig(host="127.0.0.1", port=0), metrics=Metrics())
    assert relay.readiness() == "relay has not started listening"
    await relay.start()
    health = Health.watch_running_loop(relay.readiness)
    try:
        assert health.readiness() == Verdict(True, "ready")
        await relay.stop()
        verdict = health.readiness()
        assert not verdict.ok
        assert verdict.reason == f"relay not listening on {relay.url}"
        assert health.liveness().ok  # draining is not a reason to restart
    finally:
        health.heartbeat.stop()
        await relay.stop()
