"""`audiosockets nats init` and `audiosockets status` against a real nats-server."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from nats_harness import NatsServer

from audiosockets.audio import AudioFormat, SampleType
from audiosockets.connect import connect_publisher


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "audiosockets", *args],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip


async def test_init_then_status(nats_server: NatsServer) -> None:
    done = cli("nats", "init", "--relay", nats_server.url, "--stream", "AUDIO", "--max-age", "120")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "created JetStream stream AUDIO (subjects audiosockets.>, 1 replica(s), 120 s retention)"
    )
    url = f"{nats_server.url}?stream=AUDIO&create=0"
    async with connect_publisher(url, name="rec") as pub:
        stream = pub.stream("hall.2", AudioFormat(16000, 1, SampleType.INT16))
        for _ in range(3):
            stream.send(np.zeros(320, dtype=np.int16), captured_ns=1_700_000_000_000_000_000)
        assert await pub.flush(10)
    report = json.loads(cli("status", "--relay", url, "--json").stdout)
    assert report["stream"] == "AUDIO"
    assert report["replay_window_seconds"] == 120
    (entry,) = report["streams"]
    assert entry["name"] == "hall.2"
    assert entry["last_seq"] == 2
    table = cli("status", "--relay", url)
    assert table.returncode == 0, table.stderr
    assert "hall.2" in table.stdout
    assert "ended" in table.stdout  # the publisher closed the stream
    again = cli("nats", "init", "--relay", nats_server.url, "--stream", "AUDIO")
    assert again.stdout.startswith("updated JetStream stream AUDIO")


def test_missing_stream_without_create_is_a_configuration_error(nats_server: NatsServer) -> None:
    done = cli("status", "--relay", f"{nats_server.url}?stream=NOPE")
    assert done.returncode == 3, done.stderr
    assert "has no JetStream stream 'NOPE'" in done.stderr.strip().splitlines()[-1]
    bad = cli("status", "--relay", f"{nats_server.url}?replicas=2")
    assert bad.returncode == 2
    assert "replicas must be 1, 3 or 5" in bad.stderr
    flags_only = cli("nats", "init", "--relay", f"{nats_server.url}?replicas=3")
    assert flags_only.returncode == 2
    assert "from its flags" in flags_only.stderr


def test_recorder_without_its_stream_and_create_0_exits_2(nats_server: NatsServer) -> None:
    url = f"{nats_server.url}?stream=NOPE&create=0"
    done = cli("record", "--relay", url, "--stream", "mic-1", "--source", "synth:sine",
               "--metrics-port", "0")  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "JetStream stream 'NOPE' does not exist" in last
