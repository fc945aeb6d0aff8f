"""Fixtures: nats-server processes on free loopback ports, stopped after each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from nats_harness import NatsServer, nats_server_binary

pytest.importorskip("nats", reason="nats-py is not installed (pip install -e '.[nats,test]')")


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[NatsServer]]:
    """A list the test appends its servers to; every one is stopped at the end."""
    nats_server_binary()
    started: list[NatsServer] = []
    yield started
    for server in started:
        server.kill()


@pytest.fixture
def nats_server(tmp_path: Path, servers: list[NatsServer]) -> NatsServer:
    server = NatsServer("solo", tmp_path)
    server.start()
    servers.append(server)
    return server
