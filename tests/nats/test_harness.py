"""The NATS tests' own harness: reading a group archive while its members write."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats_harness import archived_chunks

from audiosockets.handlers.archive import part_name, segment_name

CHUNK = bytes(range(16))


def test_archived_chunks_skips_a_segment_published_between_listing_and_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member closes a segment (renames its ``.part`` away) right after the
    helper listed the ``.part`` files: that poll misses those chunks (the next
    finds them under the final name) instead of failing with FileNotFoundError."""
    name = segment_name("s-0", 1_700_000_000_000_000_000, 0)
    part = tmp_path / part_name(name, "m1")
    part.write_bytes(b"\0" * 44 + CHUNK * 3)
    real_glob = Path.glob

    def glob_then_publish(self: Path, pattern: str) -> Iterator[Path]:
        found = list(real_glob(self, pattern))
        if pattern.endswith(".part") and part.exists():  # the writer closes the segment now
            os.replace(part, tmp_path / name)
            sidecar = {"stream": "s-0", "first_seq": 0}
            (tmp_path / name).with_suffix(".json").write_text(json.dumps(sidecar))
        return iter(found)

    monkeypatch.setattr(Path, "glob", glob_then_publish)
    assert archived_chunks(tmp_path, len(CHUNK)) == {}
    monkeypatch.undo()
    assert archived_chunks(tmp_path, len(CHUNK)) == {"s-0": {0: CHUNK, 1: CHUNK, 2: CHUNK}}
