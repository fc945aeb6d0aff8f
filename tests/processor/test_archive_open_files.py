"""``archive:DIR`` keeps at most ``--max-open-segments`` files open (issue 11,
item 10): the least recently written segment is completed early, counted, and
its stream goes on in a new segment without a gap."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from processor_support import Harness, to_chunks

from audiosockets.audio import Chunk
from audiosockets.handlers import HandlerOptions

RATE = 8000


def interleaved(streams: int, rounds: int) -> list[Chunk]:
    """``rounds`` chunks of each of ``streams`` streams, round-robin (the worst case for an LRU)."""
    per_stream = [
        to_chunks(np.zeros(800 * rounds), RATE, 800, stream=f"mic-{i:02d}") for i in range(streams)
    ]
    return [per_stream[i][r] for r in range(rounds) for i in range(streams)]


def test_open_segments_stay_under_the_cap_and_each_early_close_is_counted(
    tmp_path: Path,
) -> None:
    streams, rounds, cap = 10, 5, 3
    h = Harness(f"archive:{tmp_path}", HandlerOptions(segment_seconds=60, max_open_segments=cap))
    for chunk in interleaved(streams, rounds):
        h.feed([chunk])
        assert len(list(tmp_path.glob(".*.part"))) <= cap  # files open right now
    h.close()
    assert not h.errors
    # Round-robin over 10 streams with 3 slots: every chunk opens a segment,
    # and every open past the first 3 completes the least recently written one.
    evicted = streams * rounds - cap
    total = sum(
        h.value("audiosockets_archive_evictions_total", stream=f"mic-{i:02d}") or 0
        for i in range(streams)
    )
    assert total == evicted
    sidecars = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    assert len(sidecars) == streams * rounds
    assert sum(s["ended_by"] == "open_file_cap" for s in sidecars) == evicted
    for i in range(streams):
        mine = sorted(
            (s for s in sidecars if s["stream"] == f"mic-{i:02d}"), key=lambda s: s["first_seq"]
        )
        # No gap: the stream's segments cover every seq once, in order.
        assert [(s["first_seq"], s["last_seq"]) for s in mine] == [(r, r) for r in range(rounds)]
        assert all(s["gap_before"] is None for s in mine)


def test_more_streams_than_descriptors_are_all_archived(tmp_path: Path) -> None:
    """The issue's case, scaled: 600 streams under a soft nofile of 256 (it
    was 1200 under 1024: EMFILE for the later streams)."""
    script = textwrap.dedent(
        f"""
        import resource, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        from test_archive_open_files import interleaved
        from processor_support import Harness
        from audiosockets.handlers import HandlerOptions
        h = Harness("archive:{tmp_path}", HandlerOptions(segment_seconds=60, max_open_segments=128))
        h.feed(interleaved(600, 2))
        h.close()
        print(len(h.errors))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"
    assert len(list(tmp_path.glob("*.wav"))) == 600 * 2  # round-robin: a segment per chunk
