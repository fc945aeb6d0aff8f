"""``audiosockets demo``: the whole pipeline in one process, and its table."""

from __future__ import annotations

import asyncio
import io
import math
import signal
import sys

import pytest
from click.testing import CliRunner

from audiosockets.cli import main
from audiosockets.demo import DemoConfig, run_demo


async def test_demo_streams_levels_and_vad_with_no_drops() -> None:
    out = io.StringIO()
    rows = await run_demo(DemoConfig(port=0, streams=2, seconds=2.0, refresh=0.25), out)
    by_stream = {r.stream: r for r in rows}
    assert set(by_stream) == {"mic-1", "mic-2"}
    speech, sine = by_stream["mic-1"], by_stream["mic-2"]
    assert all(r.drops == 0 for r in rows)
    assert all(r.chunks_per_s > 0 for r in rows)
    assert sine.rms_dbfs == pytest.approx(
        20 * math.log10(0.5 / math.sqrt(2)), abs=0.2
    )  # synth amplitude 0.5
    assert sine.peak_dbfs == pytest.approx(20 * math.log10(0.5), abs=0.1)
    assert speech.vad_segments >= 1
    assert speech.last_event.startswith("vad_")
    table = out.getvalue()
    assert "STREAM" in table
    assert "synth:speechlike" in table


def test_demo_command_runs_for_the_given_seconds() -> None:
    result = CliRunner().invoke(
        main,
        ["--log-level", "warning", "demo", "--listen", "tcp://127.0.0.1:0", "--seconds", "0.6"],
    )
    assert result.exit_code == 0, result.output
    assert "audiosockets demo: relay tcp://127.0.0.1:" in result.output
    assert "mic-2" in result.output


async def test_demo_stops_on_ctrl_c_with_status_zero() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "audiosockets", "--log-level", "warning", "demo", "--listen", "tcp://127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(30):
            while b"mic-2" not in await proc.stdout.readline():  # the first table is out
                pass
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            await proc.stdout.read()
            rc = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stderr = (await proc.stderr.read()).decode()
    assert rc == 0, stderr
    assert "Traceback" not in stderr
