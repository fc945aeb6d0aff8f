"""``serve_metrics`` and the relay: bound where the service listens, IPv4 and IPv6
(issue 13, item 7). A relay on ``[::1]`` had its metrics on 0.0.0.0 only; one on
``[::]`` refused IPv4 clients (asyncio binds IPv6 sockets IPv6-only)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from _support import require
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.client import Publisher, Subscriber
from audiosockets.errors import AddressInUse, ConfigError
from audiosockets.metrics import Metrics, serve_metrics


def ipv6_loopback() -> bool:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


def scrape(host: str, port: int) -> str:
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with urllib.request.urlopen(f"http://{netloc}/metrics", timeout=5) as response:
        body: str = response.read().decode()
    return body


def refused(host: str, port: int) -> bool:
    try:
        scrape(host, port)
    except (urllib.error.URLError, ConnectionError):
        return True
    return False


def test_metrics_on_ipv6_loopback_answer_there() -> None:
    require(ipv6_loopback(), "this host has no IPv6 loopback (::1)")
    port = serve_metrics(0, Metrics().registry, "::1")
    assert "audiosockets_build_info" in scrape("::1", port)
    assert refused("127.0.0.1", port)


def test_metrics_on_the_ipv6_wildcard_answer_ipv4_too() -> None:
    require(ipv6_loopback(), "this host has no IPv6 loopback (::1)")
    require(socket.has_dualstack_ipv6(), "this OS has no dual-stack IPv6 sockets")
    port = serve_metrics(0, Metrics().registry, "::")
    assert "audiosockets_build_info" in scrape("::1", port)
    assert "audiosockets_build_info" in scrape("127.0.0.1", port)


def test_metrics_on_ipv4_loopback_stay_there() -> None:
    port = serve_metrics(0, Metrics().registry, "127.0.0.1")
    assert "audiosockets_build_info" in scrape("127.0.0.1", port)
    if ipv6_loopback():
        assert refused("::1", port)


def test_a_taken_port_and_an_unusable_address_are_one_sentence_each() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(AddressInUse, match=rf"cannot serve metrics on 127\.0\.0\.1:{port}"):
            serve_metrics(port, Metrics().registry, "127.0.0.1")
    with pytest.raises(ConfigError, match=r"cannot serve metrics on \[2001:db8::1\]:0"):
        serve_metrics(0, Metrics().registry, "2001:db8::1")  # documentation prefix: not ours
    with pytest.raises(ConfigError, match=r"cannot serve metrics on no-such-host\.invalid"):
        serve_metrics(0, Metrics().registry, "no-such-host.invalid")


# --- the relay on IPv6: audio and metrics on the listen address --------------------------


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_relay(listen: str, metrics_port: int) -> tuple[subprocess.Popen[bytes], str]:
    """``audiosockets relay`` as a process; returns it and the URL it announced."""
    command = ["relay", "--loop", "asyncio", "--listen", listen]
    process = subprocess.Popen(
        [sys.executable, "-m", "audiosockets", *command, "--metrics-port", str(metrics_port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the CLI's own line, not the log record's
        line = process.stderr.readline().decode()
        if line.startswith("relay listening on "):
            return process, line.removeprefix("relay listening on ").strip()
        if not line and process.poll() is not None:
            break
    process.kill()
    pytest.fail("the relay did not announce its address")


async def publish_and_receive(url: str, stream: str) -> list[int]:
    fmt = AudioFormat(16000, 1, SampleType.INT16)
    pub = Publisher(url, name=f"rec-{stream}")
    sub = Subscriber(url, stream, name=f"sub-{stream}", start="earliest")
    async with sub:
        await pub.start()
        handle = pub.stream(stream, fmt)
        for i in range(5):
            handle.send(np.full(320, i, np.int16))
        assert await pub.flush(5)
        got = [(await sub.get(timeout=10)).seq for _ in range(5)]
        await pub.close(1.0)
    return got


async def test_a_relay_on_ipv6_loopback_serves_audio_and_metrics_there() -> None:
    require(ipv6_loopback(), "this host has no IPv6 loopback (::1)")
    metrics_port = free_port("::1")
    process, url = await asyncio.to_thread(start_relay, "tcp://[::1]:0", metrics_port)
    try:
        assert url.startswith("tcp://[::1]:")
        assert await publish_and_receive(url, "v6-1") == list(range(5))
        body = await asyncio.to_thread(scrape, "::1", metrics_port)
        assert 'audiosockets_chunks_received_total{stream="v6-1"} 5.0' in body
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 10)


async def test_a_relay_on_the_ipv6_wildcard_takes_ipv4_clients_too() -> None:
    require(ipv6_loopback(), "this host has no IPv6 loopback (::1)")
    require(socket.has_dualstack_ipv6(), "this OS has no dual-stack IPv6 sockets")
    metrics_port = free_port()
    process, url = await asyncio.to_thread(start_relay, "tcp://[::]:0", metrics_port)
    try:
        port = int(url.rsplit(":", 1)[1])
        assert await publish_and_receive(f"tcp://127.0.0.1:{port}", "dual-4") == list(range(5))
        assert await publish_and_receive(f"tcp://[::1]:{port}", "dual-6") == list(range(5))
        for host in ("127.0.0.1", "::1"):
            body = await asyncio.to_thread(scrape, host, metrics_port)
            assert 'audiosockets_chunks_received_total{stream="dual-4"} 5.0' in body
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 10)
