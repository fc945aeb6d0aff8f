"""``audiosockets process`` as a real subprocess: worker processes, events file, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from _support import children_of, end_for_good, wait_gone, wait_until
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.client import Publisher, RetryPolicy
from audiosockets.relay import Relay

HANDLER = """
import os


def handle(chunk):
    return {"pid": os.getpid(), "first": int(chunk.samples[0, 0]), "rate": chunk.format.rate}
"""


async def start_tagger(
    relay: Relay, tmp_path: Path, stderr: int, new_session: bool = False
) -> tuple[asyncio.subprocess.Process, Path]:
    """``audiosockets process`` with the tagging ``HANDLER`` on two workers, reading
    "mic" from the start; returns the process and its events file."""
    handler = tmp_path / "tagger.py"
    handler.write_text(HANDLER)
    events = tmp_path / "events.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "audiosockets", "--log-level", "warning", "process",
        "--relay", relay.url, "--stream", "mic", "--handler", f"{handler}:handle",
        "--workers", "2", "--events", str(events), "--metrics-port", "0", "--start", "earliest",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=stderr,
        start_new_session=new_session,
    )  # fmt: skip
    return proc, events


@pytest.mark.parametrize(
    ("stop", "group"),
    [(signal.SIGTERM, False), (signal.SIGHUP, False), (signal.SIGHUP, True)],
    ids=["SIGTERM", "SIGHUP", "SIGHUP-to-the-group"],
)
async def test_process_command_with_two_workers_stops_cleanly_on_sigterm(
    relay: Relay, tmp_path: Path, stop: signal.Signals, group: bool
) -> None:
    """SIGHUP (``kill -HUP``) drains like SIGTERM and exits 0; its default action
    exited 129 with the chunks in flight unhandled. A closing terminal sends it to
    the whole process group: the workers leave stopping to the processor."""
    proc, events = await start_tagger(relay, tmp_path, asyncio.subprocess.PIPE, group)
    pub = Publisher(relay.url, name="rec", retry=RetryPolicy(initial=0.02, cap=0.2, jitter=0.02))
    try:
        await pub.start()
        stream = pub.stream("mic", AudioFormat(16000, 1, SampleType.INT16))
        n = 40
        for seq in range(n):
            stream.send(np.full((320, 1), seq, np.int16))
        assert await pub.flush(5)

        def lines() -> list[dict[str, int]]:
            return (
                [json.loads(x) for x in events.read_text().splitlines()] if events.exists() else []
            )

        await wait_until(lambda: len(lines()) == n, timeout=60, what="all events written")
        if group:
            os.killpg(proc.pid, stop)
        else:
            proc.send_signal(stop)
        rc = await asyncio.wait_for(proc.wait(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await pub.close(0.5)
    assert proc.stderr is not None
    stderr = (await proc.stderr.read()).decode()
    assert rc == 0, stderr
    got = lines()
    assert sorted(e["first"] for e in got) == list(range(n))
    assert {e["rate"] for e in got} == {16000}
    assert len({e["pid"] for e in got}) == 2  # both worker processes took chunks
    assert "Traceback" not in stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
async def test_a_killed_processor_leaves_no_worker_process_behind(
    relay: Relay, tmp_path: Path
) -> None:
    """SIGKILL gives the processor no chance to stop its workers: the kernel ends
    them (they used to keep running, orphaned, holding the handler's resources)."""
    proc, events = await start_tagger(relay, tmp_path, asyncio.subprocess.DEVNULL)
    pub = Publisher(relay.url, name="rec", retry=RetryPolicy(initial=0.02, cap=0.2, jitter=0.02))
    workers: set[int] = set()
    try:
        await pub.start()
        stream = pub.stream("mic", AudioFormat(16000, 1, SampleType.INT16))
        for seq in range(20):
            stream.send(np.full((320, 1), seq, np.int16))
        assert await pub.flush(5)

        def worker_pids() -> set[int]:
            text = events.read_text() if events.exists() else ""
            return {json.loads(line)["pid"] for line in text.splitlines()}

        await wait_until(lambda: len(worker_pids()) == 2, timeout=60, what="both workers busy")
        workers = worker_pids()
        assert workers <= children_of(proc.pid)
        proc.kill()
        await proc.wait()
        await wait_gone(workers, f"workers {sorted(workers)} to end with the processor")
    finally:
        await end_for_good(proc, workers)
        await pub.close(0.5)
