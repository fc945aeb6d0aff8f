"""What a SIGKILLed ``audiosockets record --spool-dir`` loses: the memory part
(``--spool-memory-seconds``), never what reached the disk spool. Real processes,
a relay that is away for the first run and up for the second."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import numpy as np
import recorder_fakes
from recorder_fakes import noise_wav

from _support import free_port, wait_until
from audiosockets.audio import AudioFormat, Chunk, SampleType
from audiosockets.client import Subscriber
from audiosockets.metrics import Metrics
from audiosockets.relay import Relay, RelayConfig
from audiosockets.spool import DiskSpool

RATE = 16000
FRAMES = 250  # --block-ms 15.625: 64 chunks a second
FMT = AudioFormat(RATE, 1, SampleType.INT16)
MEMORY_SECONDS = 0.5  # 32 chunks; the recorder diverts to disk at half of it unsent


def spawn_record(url: str, wav: Path, spool_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    return recorder_fakes.spawn_record(
        "--relay", url, "--stream", "kill-1", "--source", f"file:{wav}",
        "--block-ms", str(1000 * FRAMES / RATE), "--spool-dir", str(spool_dir),
        "--spool-memory-seconds", str(MEMORY_SECONDS), *extra,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip


def on_disk(spool_dir: Path) -> int:
    """Complete chunks in the stream's spool, read the way the next run reads them
    (the spool is only scanned, never closed: closing would rewrite it)."""
    return DiskSpool(spool_dir / "kill-1", FMT, max_seconds=60).chunks


async def test_a_sigkill_loses_at_most_the_memory_part_and_nothing_on_disk(
    tmp_path: Path,
) -> None:
    first = noise_wav(tmp_path / "first.wav", 64 * 60 * FRAMES, seed=7)  # a minute: never ends here
    second = noise_wav(tmp_path / "second.wav", 32 * FRAMES, seed=8)
    spool_dir = tmp_path / "spool"
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"

    # Run 1: no relay. Once the disk holds more than the memory part, SIGKILL.
    run1 = spawn_record(url, tmp_path / "first.wav", spool_dir)
    try:
        await wait_until(
            lambda: run1.poll() is not None or on_disk(spool_dir) >= 64,
            timeout=30,
            what="a second of audio on disk",
        )
        assert run1.poll() is None, run1.communicate()[1].decode()
    finally:
        run1.kill()
        await asyncio.to_thread(run1.communicate, timeout=15)
    kept = on_disk(spool_dir)
    assert kept >= 64

    # Run 2: the relay is up; the disk goes out first, then a short file of new audio.
    relay = Relay(RelayConfig(host="127.0.0.1", port=port, replay_seconds=120.0), metrics=Metrics())
    await relay.start()
    received: list[Chunk] = []
    try:
        async with Subscriber(url, pattern="kill-*", name="kill-sub", start="earliest") as sub:

            async def collect() -> None:
                async for chunk in sub:
                    received.append(chunk)

            reader = asyncio.create_task(collect())
            run2 = spawn_record(url, tmp_path / "second.wav", spool_dir, "--flush-seconds", "20")
            try:
                _, err = await asyncio.to_thread(run2.communicate, timeout=60)
            finally:
                if run2.poll() is None:
                    run2.kill()
            assert run2.returncode == 0, err.decode()
            await wait_until(lambda: len(received) >= kept + 32, timeout=20, what="both runs")
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    finally:
        await relay.stop()

    assert [c.seq for c in received] == list(range(kept + 32))
    # The first chunks of run 1 were the memory part: find where its audio resumes.
    head = received[0].samples
    lost = next(
        i for i in range(64 * 60) if np.array_equal(first[i * FRAMES : (i + 1) * FRAMES], head)
    )
    assert 0 < lost * FRAMES / RATE <= MEMORY_SECONDS
    # From there on nothing is missing: every chunk that reached the disk, then run 2.
    got = np.concatenate([c.samples for c in received])
    want = np.concatenate([first[lost * FRAMES : (lost + kept) * FRAMES], second])
    assert np.array_equal(got, want)
    assert not list((spool_dir / "kill-1").glob("*.spool"))
