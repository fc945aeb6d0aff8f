"""``vad``: segments of speech and of tone bursts against known truth."""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from processor_support import T0_NS, Harness, sine, to_chunks

from _support import require

RATE = 16000


def segments(events: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(start, end) in seconds after T0, from vad_start/vad_end pairs."""
    starts = [e["time_ns"] for e in events if e["event"] == "vad_start"]
    ends = [e for e in events if e["event"] == "vad_end"]
    assert len(starts) == len(ends)
    for start, end in zip(starts, ends, strict=True):
        assert end["start_ns"] == start
        assert end["duration"] == pytest.approx((end["time_ns"] - start) / 1e9)
    return [
        ((s - T0_NS) / 1e9, (e["time_ns"] - T0_NS) / 1e9) for s, e in zip(starts, ends, strict=True)
    ]


def noise(seconds: float, rate: int, dbfs: float, seed: int = 1) -> npt.NDArray[np.float64]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(round(seconds * rate)) * 10 ** (dbfs / 20)


def bursts(truth: list[tuple[float, float]], total: float) -> npt.NDArray[np.float64]:
    x = noise(total, RATE, -70)
    for start, end in truth:
        a, b = round(start * RATE), round(end * RATE)
        x[a:b] += sine(700, (b - a) / RATE, RATE, 0.3)
    return x


TRUTH = [(0.5, 1.25), (2.0, 2.1), (3.003, 4.5)]


def test_tone_bursts_found_within_one_frame() -> None:
    h = Harness("vad")
    h.feed(to_chunks(bursts(TRUTH, 5.0), RATE, 1000))
    h.close()
    found = segments(h.events)
    assert len(found) == len(TRUTH)
    for (s, e), (ts, te) in zip(found, TRUTH, strict=True):
        assert s == pytest.approx(ts, abs=0.011)
        assert e == pytest.approx(te, abs=0.011)
    assert h.value("audiosockets_vad_segments_total", stream="mic-1") == 3
    assert h.value("audiosockets_vad_active", stream="mic-1") == 0


def test_result_does_not_depend_on_chunk_size() -> None:
    x = bursts(TRUTH, 5.0)
    whole = Harness("vad")
    whole.feed(to_chunks(x, RATE, len(x)))
    whole.close()
    rng = np.random.default_rng(7)
    ragged = Harness("vad")
    ragged.feed(to_chunks(x, RATE, (int(n) for n in rng.integers(1, 3000, size=len(x)))))
    ragged.close()
    assert [(e["event"], e["time_ns"]) for e in ragged.events] == [
        (e["event"], e["time_ns"]) for e in whole.events
    ]


def test_sequence_gap_ends_an_open_segment_at_its_last_active_frame() -> None:
    x = bursts([(0.5, 3.0)], 3.5)
    chunks = to_chunks(x, RATE, 1600)  # 0.1 s chunks
    h = Harness("vad")
    h.feed(chunks[:10] + chunks[15:])  # seq 10..14 lost: 1.0 s .. 1.5 s
    h.close()
    found = segments(h.events)
    assert found[0] == pytest.approx((0.5, 1.0), abs=0.011)
    assert found[1] == pytest.approx((1.5, 3.0), abs=0.011)


def test_open_segment_is_closed_at_teardown() -> None:
    h = Harness("vad")
    h.feed(to_chunks(bursts([(0.2, 1.0)], 1.0), RATE, 800))
    assert [e["event"] for e in h.events] == ["vad_start"]
    h.close()
    assert segments(h.events) == [pytest.approx((0.2, 1.0), abs=0.011)]


def _speak(text: str, path: Path) -> tuple[npt.NDArray[np.float64], int]:
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2
        assert w.getnchannels() == 1
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32768
        return pcm, w.getframerate()


def test_speech_segments_within_50_ms_of_truth(tmp_path: Path) -> None:
    require(shutil.which("espeak-ng") is not None, "espeak-ng is not installed")
    parts = []
    for i, text in enumerate(["Hello there, this is a test", "Audio sockets"]):
        speech, rate = _speak(text, tmp_path / f"{i}.wav")
        loud = np.nonzero(np.abs(speech) > 0.01)[0]  # truth: first to last clearly audible sample
        parts.append(speech[loud[0] : loud[-1] + 1])
    gap = noise(1.2, rate, -65)
    x = np.concatenate([gap[: int(0.8 * rate)], parts[0], gap, parts[1], gap[: int(0.8 * rate)]])
    t1 = 0.8
    t2 = t1 + len(parts[0]) / rate + 1.2
    truth = [(t1, t1 + len(parts[0]) / rate), (t2, t2 + len(parts[1]) / rate)]
    h = Harness("vad")
    h.feed(to_chunks(x, rate, 1024))
    h.close()
    found = segments(h.events)
    assert len(found) == 2, found
    for (s, e), (ts, te) in zip(found, truth, strict=True):
        assert abs(s - ts) <= 0.050
        assert abs(e - te) <= 0.050
