"""``filenames.stream_stem``: injective, bounded, portable, stable (issue 13, item 5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audiosockets.filenames import (
    HASH_CHARS,
    STEM_MAX_BYTES,
    STEM_MIN_BYTES,
    name_max,
    stem_budget,
    stream_stem,
)
from audiosockets.handlers.archive import (
    RESERVED_BYTES,
    WRITER_ID_MAX,
    WRITER_MAX,
    claimed_name,
    part_name,
    segment_name,
)

#: Legal stream names: any non-empty UTF-8 text of at most 200 bytes (the wire limit).
stream_names = st.text(min_size=1, max_size=200).filter(lambda s: len(s.encode()) <= 200)
#: Names that differ in small ways: spaces, slashes, case, one character.
look_alikes = st.text(alphabet="mM iI cC1_ /.-~é", min_size=1, max_size=12)


def assert_portable(stem: str, max_bytes: int = STEM_MAX_BYTES) -> None:
    assert 0 < len(stem.encode()) <= max_bytes
    assert stem.isascii()
    assert not {"/", "\\", "\0"} & set(stem)
    assert stem not in (".", "..")
    assert not stem.startswith(".")


@given(st.lists(stream_names | look_alikes, min_size=2, max_size=30, unique=True))
@settings(max_examples=300)
def test_distinct_names_get_distinct_stems_even_on_case_folding_file_systems(
    names: list[str],
) -> None:
    stems = [stream_stem(n) for n in names]
    assert len(set(stems)) == len(names)
    assert len({s.casefold() for s in stems}) == len(names)


@given(stream_names | look_alikes, st.integers(STEM_MIN_BYTES, 200))
def test_every_stem_fits_its_budget_and_has_no_separator(name: str, budget: int) -> None:
    assert_portable(stream_stem(name, budget), budget)


@given(stream_names | look_alikes)
def test_every_archive_file_name_fits_255_bytes(name: str) -> None:
    stem = stream_stem(name)
    longest_seq = 2**64 - 1
    final = segment_name(stem, -(2**63), longest_seq)  # widest seq, earliest i64 time
    claimed = claimed_name(final, "w" * WRITER_ID_MAX)
    names = [
        final,
        claimed,
        part_name(final, "w" * WRITER_ID_MAX),
        part_name(claimed.replace(".wav", ".json"), "w" * WRITER_MAX),
    ]
    for file_name in names:
        assert len(file_name.encode()) <= 255, file_name
        assert "/" not in file_name
        assert "\0" not in file_name
    assert RESERVED_BYTES + STEM_MAX_BYTES <= 255


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mic-1", "mic-1"),
        ("mic_1", "mic_1"),
        ("room.left_2", "room.left_2"),
    ],
)
def test_plain_names_keep_their_old_file_names(name: str, expected: str) -> None:
    assert stream_stem(name) == expected


@pytest.mark.parametrize("name", ["mic 1", "mic/1", "Mic_1", ".mic_1", "mic_1~", "x" * 81, "é"])
def test_changed_names_are_readable_and_hashed(name: str) -> None:
    stem = stream_stem(name)
    prefix, sep, digest = stem.rpartition("~")
    assert sep == "~"
    assert len(digest) == HASH_CHARS
    assert int(digest, 16) >= 0
    assert prefix[:3] in ("mic", "Mic", "_mi", "xxx", "_")
    assert stem != stream_stem("mic_1")


def test_mic_space_underscore_and_slash_are_three_stems() -> None:
    assert len({stream_stem("mic 1"), stream_stem("mic_1"), stream_stem("mic/1")}) == 3


def test_stems_are_the_same_in_another_process() -> None:
    """No per-process salt (Python's str hash is salted): a restart finds its files."""
    names = ["mic 1", "Küche/links", "x" * 150, "🎤" * 50]
    code = (
        "import sys, json; from audiosockets.filenames import stream_stem; "
        "print(json.dumps([stream_stem(n) for n in json.loads(sys.argv[1])]))"
    )
    import json

    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(names)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert json.loads(out.stdout) == [stream_stem(n) for n in names]


def test_budget_follows_the_file_systems_name_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert name_max(tmp_path) >= 255 or name_max(tmp_path) > RESERVED_BYTES
    monkeypatch.setattr(os, "pathconf", lambda _path, _name: 143)  # eCryptfs
    assert name_max(tmp_path) == 143
    assert stem_budget(tmp_path, 100) == 43
    with pytest.raises(ValueError, match="at most 143 bytes"):
        stem_budget(tmp_path, 140)


def test_a_stem_budget_below_the_hash_is_refused() -> None:
    with pytest.raises(ValueError, match="at least"):
        stream_stem("mic", STEM_MIN_BYTES - 1)
