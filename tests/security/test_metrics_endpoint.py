"""The metrics port: bound where told (IPv4, IPv6, dual-stack), bounded, timed out, HTTPS."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from security_support import Site

from _support import require
from audiosockets.metrics import serve_metrics
from audiosockets.metrics_http import MetricsEndpoint, serve_wsgi
from audiosockets.tls import server_context

#: How urllib reports a connection the server cut (no certificate, not TLS).
REFUSED = (urllib.error.URLError, ssl.SSLError, ConnectionError)


def get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5, context=context) as response:
        return response.status, response.read()


def listeners(port: int) -> set[str]:
    """Local addresses listening on ``port`` (Linux /proc/net/tcp and tcp6)."""
    found = set()
    for table, size in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            if size == 8:
                found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
            else:
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def test_bound_to_loopback_only() -> None:
    port = serve_metrics(0, CollectorRegistry(), "127.0.0.1")
    assert listeners(port) == {"127.0.0.1"}
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    assert b"audiosockets_http_connections_refused_total" in body


def test_ipv6_and_dual_stack() -> None:
    require(socket.has_ipv6, "no IPv6 on this host")
    port = serve_metrics(0, CollectorRegistry(), "::1")
    assert listeners(port) == {"::1"}
    assert get(f"http://[::1]:{port}/metrics")[0] == 200
    port = serve_metrics(0, CollectorRegistry(), "::")
    assert listeners(port) == {"::"}
    assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200  # IPv4 through the dual stack


def app(environ: object, start_response: object) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])  # type: ignore[operator]
    return [b"ok\n"]


def wait_for(predicate: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_connections_are_bounded_and_idle_ones_time_out() -> None:
    server = serve_wsgi(app, 0, host="127.0.0.1", max_connections=4, idle_timeout=0.5)
    port = server.server_address[1]
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    wait_for(lambda: server.active == 4, "4 connections served")
    extra = socket.create_connection(("127.0.0.1", port))
    extra.settimeout(5)
    assert extra.recv(10) == b""  # closed at once, not queued
    wait_for(lambda: server.refused["too_many_connections"] == 1, "the refusal counted")
    # The idle ones are closed after the timeout and their threads given back.
    for conn in idle:
        conn.settimeout(5)
        assert conn.recv(10) == b""
    wait_for(lambda: server.active == 0, "threads given back")
    assert server.refused["idle_timeout"] == 4
    status, body = get(f"http://127.0.0.1:{port}/")
    assert (status, body) == (200, b"ok\n")
    for conn in [*idle, extra]:
        conn.close()


def test_https_metrics_and_plain_http_refused(site: Site) -> None:
    tls = server_context(cert=site.relay.cert, key=site.relay.key)
    server = serve_wsgi(app, 0, host="127.0.0.1", tls=tls, idle_timeout=2)
    port = server.server_address[1]
    client = ssl.create_default_context(cafile=site.ca)
    assert get(f"https://127.0.0.1:{port}/", client) == (200, b"ok\n")
    with pytest.raises(REFUSED):
        get(f"http://127.0.0.1:{port}/")
    wait_for(lambda: server.refused["tls_handshake"] == 1, "the failed handshake counted")


def test_metrics_client_ca_requires_a_scraper_certificate(site: Site) -> None:
    endpoint = MetricsEndpoint(None, site.relay.cert, site.relay.key, site.ca)
    server = serve_wsgi(app, 0, host="127.0.0.1", tls=endpoint.context(), idle_timeout=2)
    port = server.server_address[1]
    scraper = ssl.create_default_context(cafile=site.ca)
    with pytest.raises(REFUSED):
        get(f"https://127.0.0.1:{port}/", scraper)
    scraper.load_cert_chain(site.client.cert, site.client.key)
    assert get(f"https://127.0.0.1:{port}/", scraper)[0] == 200


def test_relay_metrics_follow_the_listen_host(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        relay_port = s.getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    log = tmp_path / "relay.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "audiosockets", "relay",
                "--listen", f"tcp://127.0.0.1:{relay_port}", "--metrics-port", str(metrics_port),
            ],
            stderr=sink,
        )  # fmt: skip
    try:
        wait_for(lambda: listeners(metrics_port), "the metrics port", timeout=15)
        assert listeners(metrics_port) == {"127.0.0.1"}
        assert get(f"http://127.0.0.1:{metrics_port}/metrics")[0] == 200
    finally:
        process.terminate()
        process.wait(10)


def test_unusable_metrics_files_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "audiosockets", "relay", "--listen", "tcp://127.0.0.1:0",
            "--metrics-tls-cert", str(tmp_path / "missing.pem"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "cannot read TLS certificate" in result.stderr
