"""The recorder against a real relay: a relay crash loses nothing inside the spool,
an outage longer than the spool drops exactly the oldest audio, and counts it."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from recorder_fakes import FakeClock, noise_wav

from _support import free_port, wait_until
from audiosockets.audio import Chunk
from audiosockets.client import Subscriber
from audiosockets.metrics import Metrics
from audiosockets.recorder import Recorder, RecorderConfig
from audiosockets.relay import Relay, RelayConfig


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class RelayProcess:
    """``audiosockets relay`` as a child process, so it can be SIGKILLed."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: ASYNC220 - Popen returns at once
                [
                    sys.executable, "-m", "audiosockets", "relay",
                    "--listen", f"tcp://127.0.0.1:{self.port}", "--metrics-port", "0",
                    "--heartbeat-seconds", "0.5", "--loop", "asyncio",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )  # fmt: skip
        process = self.process
        await wait_until(
            lambda: process.poll() is not None or listening(self.port),
            timeout=20,
            what="the relay to listen",
        )
        assert process.poll() is None, self.log.read_text()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)  # no goodbye, no flush: a crash
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def relay_process(tmp_path: Path) -> Iterator[RelayProcess]:
    relay = RelayProcess(free_port(), tmp_path / "relay.log")
    try:
        yield relay
    finally:
        relay.stop()


async def collect(sub: Subscriber, into: list[Chunk]) -> None:
    async for chunk in sub:
        into.append(chunk)


@pytest.mark.slow
async def test_relay_sigkill_loses_no_sample(relay_process: RelayProcess, tmp_path: Path) -> None:
    data = noise_wav(tmp_path / "noise.wav", 16000 * 5)  # 5 s, 250 chunks of 20 ms
    await relay_process.start()
    url = f"tcp://127.0.0.1:{relay_process.port}"
    metrics = Metrics()
    recorder = Recorder(
        RecorderConfig(relay=url, stream="crash-1", source=f"file:{tmp_path / 'noise.wav'}"),
        metrics=metrics,
    )
    received: list[Chunk] = []
    sub = Subscriber(url, pattern="crash-*", name="crash-sub", start="earliest")
    await sub.start()
    reader = asyncio.create_task(collect(sub, received))
    try:
        await recorder.start()
        await wait_until(lambda: len(received) >= 40, timeout=15, what="the first chunks")
        relay_process.kill()
        stream = recorder.publisher.streams["crash-1"]  # type: ignore[attr-defined]
        # An outage of at least a second and a half of audio, measured by the spool.
        await wait_until(lambda: stream.unsent >= 75, timeout=15, what="1.5 s spooled")
        await relay_process.start()
        await asyncio.wait_for(recorder.serve_forever(), 15)  # the file has been captured
        await wait_until(lambda: len(received) >= 250, timeout=20, what="every chunk")
    finally:
        await recorder.stop()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await sub.close()
    assert [c.seq for c in received] == list(range(250))
    assert np.array_equal(np.concatenate([c.samples for c in received]), data)
    dropped = metrics.registry.get_sample_value(
        "audiosockets_chunks_dropped_total", {"stream": "crash-1", "reason": "spool_full"}
    )
    assert dropped == 0
    assert metrics.registry.get_sample_value(
        "audiosockets_reconnects_total", {"role": "publisher"}
    ), "the recorder never had to reconnect: the relay was not really down"


async def test_an_outage_longer_than_the_spool_drops_exactly_the_oldest(tmp_path: Path) -> None:
    # 100 chunks of 250 frames (1/64 s, exact in binary) against a 0.5 s spool
    # (32 chunks): with no relay at all, the oldest 68 must go, and be counted.
    data = noise_wav(tmp_path / "noise.wav", 100 * 250)
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    metrics = Metrics()
    recorder = Recorder(
        RecorderConfig(
            relay=url,
            stream="outage-1",
            source=f"file:{tmp_path / 'noise.wav'}",
            block_ms=1000 / 64,
            spool_seconds=0.5,
        ),
        metrics=metrics,
        clock=FakeClock(),  # the whole file is "captured" at once, while the relay is down
    )
    relay = Relay(RelayConfig(host="127.0.0.1", port=port, replay_seconds=30.0), metrics=Metrics())
    sub = Subscriber(url, pattern="outage-*", name="outage-sub", start="earliest")
    received: list[Chunk] = []
    reader: asyncio.Task[None] | None = None
    get = metrics.registry.get_sample_value
    try:
        await recorder.start()
        await asyncio.wait_for(recorder.serve_forever(), 10)
        labels = {"stream": "outage-1"}
        assert get("audiosockets_chunks_dropped_total", {**labels, "reason": "spool_full"}) == 68
        assert get("audiosockets_spool_depth_chunks", labels) == 32
        assert get("audiosockets_spool_depth_seconds", labels) == 0.5
        await relay.start()
        await sub.start()
        reader = asyncio.create_task(collect(sub, received))
        await wait_until(lambda: len(received) >= 32, timeout=15, what="the spooled chunks")
        assert await recorder.publisher.flush(timeout=5)
        assert get("audiosockets_spool_depth_chunks", labels) == 0
    finally:
        await recorder.stop()
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        await sub.close()
        await relay.stop()
    assert [c.seq for c in received] == list(range(68, 100))
    assert np.array_equal(np.concatenate([c.samples for c in received]), data[68 * 250 :])
    assert get("audiosockets_chunks_dropped_total", {**labels, "reason": "spool_full"}) == 68


async def test_a_restarted_recorder_continues_the_stream(relay: Relay, tmp_path: Path) -> None:
    # A recorder that restarts (crash, new pod) while the relay keeps running must not
    # lose its first chunks to the previous run's sequence numbers.
    first = noise_wav(tmp_path / "first.wav", 20 * 320, seed=1)
    second = noise_wav(tmp_path / "second.wav", 5 * 320, seed=2)
    received: list[Chunk] = []
    async with Subscriber(relay.url, pattern="again-*", name="again", start="earliest") as sub:
        reader = asyncio.create_task(collect(sub, received))
        try:
            for wav in ("first.wav", "second.wav"):
                recorder = Recorder(
                    RecorderConfig(
                        relay=relay.url, stream="again-1", source=f"file:{tmp_path / wav}"
                    ),
                    clock=FakeClock(),
                )
                assert await recorder.run()
            await wait_until(lambda: len(received) >= 25, timeout=5, what="both runs' chunks")
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    assert [c.seq for c in received] == list(range(25))
    assert np.array_equal(
        np.concatenate([c.samples for c in received]), np.concatenate([first, second])
    )
