"""``serve_metrics``: bound where the service listens, IPv4 and IPv6 (issue 13, item 7)."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest

from _support import require
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
