"""The on-disk spool: order, bound with counted drops, survival across runs and
crashes; and the recorder using it through a relay outage and a restart."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest
from recorder_fakes import FakeClock, noise_wav

from _support import free_port, wait_until
from audiosockets.audio import AudioFormat, Chunk, SampleType
from audiosockets.client import Subscriber
from audiosockets.errors import ConfigError
from audiosockets.metrics import Metrics
from audiosockets.recorder import Recorder, RecorderConfig
from audiosockets.relay import Relay, RelayConfig
from audiosockets.spool import DiskSpool

FMT = AudioFormat(16000, 1, SampleType.INT16)
FRAMES = 250  # 1/64 s: exact in binary, so bounds are exact


def chunk(i: int) -> np.ndarray:
    return np.full((FRAMES, 1), i, np.int16)


def drain(spool: DiskSpool) -> list[tuple[int, int]]:
    out = []
    while (block := spool.pop()) is not None:
        assert block.samples.shape == (FRAMES, 1)
        out.append((int(block.samples[0, 0]), block.captured_ns))
    return out


def test_chunks_come_back_in_order_across_segments(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, FMT, max_seconds=60, segment_seconds=0.25)  # 16 chunks each
    for i in range(40):
        assert spool.append(chunk(i), 1000 + i) == 0
    assert spool.chunks == 40
    assert spool.seconds == 40 / 64
    assert len(list(tmp_path.glob("*.spool"))) == 3
    first = drain(spool)
    assert first == [(i, 1000 + i) for i in range(40)]
    for i in range(40, 45):  # keeps working after being emptied
        spool.append(chunk(i), 1000 + i)
    assert drain(spool) == [(i, 1000 + i) for i in range(40, 45)]
    # Read segments are deleted; only the one being written stays.
    assert len(list(tmp_path.glob("*.spool"))) == 1


def test_the_bound_drops_whole_oldest_segments_and_counts_them(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, FMT, max_seconds=1.0, segment_seconds=0.25)
    dropped = sum(spool.append(chunk(i), i) for i in range(200))  # 3.125 s into 1 s
    assert dropped == spool.dropped
    assert dropped % 16 == 0  # whole segments
    assert dropped + spool.chunks == 200
    assert spool.seconds <= 1.0 + 0.25
    assert spool.seconds >= 1.0 - 1 / 64
    # What is left is exactly the newest audio, in order.
    assert [i for i, _ in drain(spool)] == list(range(dropped, 200))


def test_what_a_clean_stop_left_is_read_by_the_next_run(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, FMT, max_seconds=60, segment_seconds=0.25)
    for i in range(50):
        spool.append(chunk(i), i)
    assert [i for i, _ in (drain_n(spool, 10))] == list(range(10))
    spool.prepend([(chunk(-2).tobytes(), -2), (chunk(-1).tobytes(), -1)])
    spool.close()
    again = DiskSpool(tmp_path, FMT, max_seconds=60, segment_seconds=0.25)
    assert again.chunks == 42
    again.append(chunk(50), 50)
    assert [i for i, _ in drain(again)] == [-2, -1, *range(10, 51)]


def test_what_a_clean_stop_left_was_fsynced_after_its_last_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut after a clean stop loses nothing: every spool file, and the
    directory (renames, deletions), was fsynced with its final content."""
    synced: set[tuple[int, int, int]] = set()
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        real_fsync(fd)
        st = os.fstat(fd)
        synced.add((st.st_ino, st.st_size, st.st_mtime_ns))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    spool = DiskSpool(tmp_path, FMT, max_seconds=60, segment_seconds=0.25)
    for i in range(70):  # five segments, the last one still being written
        spool.append(chunk(i), i)
    drain_n(spool, 20)  # the first segment read whole, the second in part
    assert not synced, "appends are not fsynced one by one"
    spool.prepend([(chunk(-1).tobytes(), -1)])
    spool.close()
    left = [tmp_path, *tmp_path.iterdir()]
    assert len(left) == 1 + 5  # the prepended segment and four unread ones
    unsynced = [
        p.name for p in left if ((st := p.stat()).st_ino, st.st_size, st.st_mtime_ns) not in synced
    ]
    assert not unsynced, f"not fsynced after their last change: {unsynced}"
    again = DiskSpool(tmp_path, FMT, max_seconds=60, segment_seconds=0.25)
    assert [i for i, _ in drain(again)] == [-1, *range(20, 70)]


def test_a_rewrite_cut_short_is_cleared_and_the_segment_kept(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, FMT, max_seconds=60)
    for i in range(5):
        spool.append(chunk(i), i)
    spool.close()
    (segment,) = tmp_path.glob("*.spool")
    # The process died while close() rewrote this segment: the old file is whole.
    stale = segment.with_name(segment.name + ".tmp")
    stale.write_bytes(segment.read_bytes()[:50])
    again = DiskSpool(tmp_path, FMT, max_seconds=60)
    assert not stale.exists()
    assert [i for i, _ in drain(again)] == list(range(5))


def drain_n(spool: DiskSpool, n: int) -> list[tuple[int, int]]:
    out = []
    for _ in range(n):
        block = spool.pop()
        assert block is not None
        out.append((int(block.samples[0, 0]), block.captured_ns))
    return out


def test_a_record_cut_short_by_a_crash_is_ignored(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, FMT, max_seconds=60)
    for i in range(20):
        spool.append(chunk(i), i)
    # No close(): the process died in the middle of writing chunk 19.
    (newest,) = sorted(tmp_path.glob("*.spool"))
    newest.write_bytes(newest.read_bytes()[:-100])
    again = DiskSpool(tmp_path, FMT, max_seconds=60)
    assert again.chunks == 19
    assert [i for i, _ in drain(again)] == list(range(19))


def test_a_spool_of_another_format_or_kind_is_refused(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, FMT, max_seconds=60)
    spool.append(chunk(1), 1)
    spool.close()
    with pytest.raises(ConfigError, match="holds 16000 Hz, 1 ch, int16 audio but the stream is"):
        DiskSpool(tmp_path, AudioFormat(48000, 2), max_seconds=60)
    (tmp_path / "000000000001.spool").write_bytes(b"not a spool file at all")
    with pytest.raises(ConfigError, match="not an audiosockets spool segment"):
        DiskSpool(tmp_path, FMT, max_seconds=60)


def test_an_unusable_directory_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot use spool directory"):
        DiskSpool(blocker / "spool", FMT, max_seconds=60)


# --- through the recorder and a relay ------------------------------------------------------


def disk_config(url: str, wav: Path, spool_dir: Path, **kw: float) -> RecorderConfig:
    return RecorderConfig(
        relay=url,
        stream="disk-1",
        source=f"file:{wav}",
        block_ms=1000 / 64,
        spool_seconds=60.0,
        spool_dir=spool_dir,
        memory_seconds=0.5,  # the publisher holds 16 chunks unsent at most
        **kw,  # type: ignore[arg-type]
    )


async def collect(sub: Subscriber, into: list[Chunk]) -> None:
    async for c in sub:
        into.append(c)


async def test_an_outage_beyond_memory_goes_to_disk_and_arrives_whole(tmp_path: Path) -> None:
    data = noise_wav(tmp_path / "a.wav", 200 * FRAMES, seed=3)
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    metrics = Metrics()
    recorder = Recorder(
        disk_config(url, tmp_path / "a.wav", tmp_path / "spool"), metrics=metrics, clock=FakeClock()
    )
    relay = Relay(RelayConfig(host="127.0.0.1", port=port, replay_seconds=30.0), metrics=Metrics())
    sub = Subscriber(url, pattern="disk-*", name="disk-sub", start="earliest")
    received: list[Chunk] = []
    reader = None
    get = metrics.registry.get_sample_value
    labels = {"stream": "disk-1"}
    try:
        await recorder.start()
        await asyncio.wait_for(recorder.serve_forever(), 10)  # all 200 captured, relay down
        assert recorder.disk is not None
        assert recorder.disk.chunks == 200 - 16
        assert get("audiosockets_spool_depth_chunks", labels) == 200
        assert get("audiosockets_spool_depth_seconds", labels) == 200 / 64
        await relay.start()
        await sub.start()
        reader = asyncio.create_task(collect(sub, received))
        await wait_until(lambda: len(received) >= 200, timeout=20, what="all 200 chunks")
    finally:
        await recorder.stop()
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        await sub.close()
        await relay.stop()
    assert [c.seq for c in received] == list(range(200))
    assert np.array_equal(np.concatenate([c.samples for c in received]), data)
    assert get("audiosockets_chunks_dropped_total", {**labels, "reason": "spool_full"}) == 0
    assert not list((tmp_path / "spool" / "disk-1").glob("*.spool"))


async def test_audio_left_on_disk_is_sent_first_by_the_next_run(tmp_path: Path) -> None:
    first = noise_wav(tmp_path / "first.wav", 60 * FRAMES, seed=4)
    second = noise_wav(tmp_path / "second.wav", 10 * FRAMES, seed=5)
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    spool_dir = tmp_path / "spool"
    # Run 1: the relay never comes; stop at once. Nothing may be lost: memory and disk
    # both end up on disk.
    run1 = Recorder(
        disk_config(url, tmp_path / "first.wav", spool_dir, flush_timeout=0.0), clock=FakeClock()
    )
    assert await run1.run() is False
    leftover = DiskSpool(spool_dir / "disk-1", FMT, max_seconds=60)
    assert leftover.chunks == 60
    leftover.close()
    # Run 2: the relay is up; the old audio goes first, then the new.
    relay = Relay(RelayConfig(host="127.0.0.1", port=port, replay_seconds=30.0), metrics=Metrics())
    await relay.start()
    received: list[Chunk] = []
    try:
        async with Subscriber(url, pattern="disk-*", name="disk-sub", start="earliest") as sub:
            reader = asyncio.create_task(collect(sub, received))
            run2 = Recorder(disk_config(url, tmp_path / "second.wav", spool_dir), clock=FakeClock())
            assert await run2.run() is True
            await wait_until(lambda: len(received) >= 70, timeout=20, what="both runs")
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    finally:
        await relay.stop()
    assert [c.seq for c in received] == list(range(70))
    got = np.concatenate([c.samples for c in received])
    assert np.array_equal(got, np.concatenate([first, second]))


def test_look_alike_streams_never_share_a_spool_directory(tmp_path: Path) -> None:
    """``mic 1`` and ``mic_1`` used to share ``spool/mic_1``: one recorder would send the
    other's audio as its own. Each stream gets its own directory, within NAME_MAX."""
    wav = tmp_path / "in.wav"
    noise_wav(wav, 2 * FRAMES, seed=1)
    dirs = []
    for stream in ("mic 1", "mic_1", "mic/1", "m" * 190):  # recorder-m…: 199 bytes
        config = RecorderConfig(
            relay="tcp://127.0.0.1:9", stream=stream, source=f"file:{wav}", spool_dir=tmp_path
        )
        recorder = Recorder(config, clock=FakeClock())
        assert recorder.disk is not None
        dirs.append(recorder.disk.directory)
        recorder.disk.close()
    assert len(set(dirs)) == 4
    assert all(d.parent == tmp_path and len(d.name) <= 255 for d in dirs)
    assert dirs[1] == tmp_path / "mic_1"  # plain names keep their directory
