"""``archive:DIR``: gapless, atomic, sample-exact WAV segments."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import wave
from pathlib import Path

import numpy as np
import pytest
from processor_support import T0_NS, Harness, to_chunks

from audiosockets.audio import Chunk, SampleType
from audiosockets.errors import HandlerError
from audiosockets.handlers import HandlerOptions

RATE = 8000


def random_chunks(
    n: int, frames: int = 800, stream: str = "mic-1", channels: int = 1
) -> list[Chunk]:
    rng = np.random.default_rng(3)
    x = rng.uniform(-0.9, 0.9, size=(n * frames, channels))
    return to_chunks(x, RATE, frames, stream=stream)


def read_pcm(path: Path) -> bytes:
    with wave.open(str(path)) as w:
        assert w.getframerate() == RATE
        return w.readframes(w.getnframes())


def archive(tmp_path: Path, segment_seconds: float = 1.0) -> Harness:
    return Harness(f"archive:{tmp_path}", HandlerOptions(segment_seconds=segment_seconds))


def test_segments_concatenate_to_exactly_what_was_sent(tmp_path: Path) -> None:
    chunks = random_chunks(35)  # 3.5 s in 0.1 s chunks, 1 s segments
    h = archive(tmp_path)
    h.feed(chunks)
    h.close()
    wavs = sorted(tmp_path.glob("*.wav"))
    assert len(wavs) == 4
    assert b"".join(read_pcm(p) for p in wavs) == b"".join(bytes(c.payload) for c in chunks)
    assert [read_pcm(p).__len__() // 2 for p in wavs] == [8000, 8000, 8000, 4000]
    sidecars = [json.loads(p.with_suffix(".json").read_text()) for p in wavs]
    assert [s["ended_by"] for s in sidecars] == ["rotation", "rotation", "rotation", "closed"]
    assert [(s["first_seq"], s["last_seq"]) for s in sidecars] == [
        (0, 9),
        (10, 19),
        (20, 29),
        (30, 34),
    ]
    assert sidecars[1]["captured_ns"] == T0_NS + 1_000_000_000
    assert h.value("audiosockets_archive_segments_total", stream="mic-1") == 4
    assert h.value("audiosockets_archive_bytes_total", stream="mic-1") == 35 * 800 * 2
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_names_carry_stream_and_capture_time_and_sort_in_capture_order(tmp_path: Path) -> None:
    h = archive(tmp_path, segment_seconds=0.5)
    h.feed(random_chunks(30, stream="room/left"))
    h.close()
    names = [p.name for p in tmp_path.glob("*.wav")]
    assert sorted(names) == sorted(
        names,
        key=lambda n: json.loads((tmp_path / n).with_suffix(".json").read_text())["captured_ns"],
    )
    stem = "room_left~" + hashlib.sha256(b"room/left").hexdigest()[:16]
    assert sorted(names)[0] == f"{stem}_20231114T221320.000000Z_0000000000.wav"


def test_a_gap_closes_the_segment_and_is_recorded_not_papered_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    chunks = random_chunks(20)
    kept = chunks[:7] + chunks[12:]
    h = archive(tmp_path, segment_seconds=60)
    h.feed(kept)
    h.close()
    wavs = sorted(tmp_path.glob("*.wav"))
    assert len(wavs) == 2
    assert read_pcm(wavs[0]) == b"".join(bytes(c.payload) for c in chunks[:7])
    assert read_pcm(wavs[1]) == b"".join(bytes(c.payload) for c in chunks[12:])
    first, second = (json.loads(p.with_suffix(".json").read_text()) for p in wavs)
    gap = {"expected_seq": 7, "next_seq": 12, "missing_chunks": 5}
    assert first["ended_by"] == "gap"
    assert first["gap_after"] == gap
    assert second["gap_before"] == gap
    assert second["first_seq"] == 12
    assert "5 chunk(s) missing" in caplog.text


def test_duplicates_are_not_written_twice(tmp_path: Path) -> None:
    chunks = random_chunks(10)
    h = archive(tmp_path, segment_seconds=60)
    h.feed(chunks[:6] + chunks[4:])  # at-least-once redelivery of seq 4 and 5
    h.close()
    (wav,) = tmp_path.glob("*.wav")
    assert read_pcm(wav) == b"".join(bytes(c.payload) for c in chunks)


def test_an_open_segment_is_never_named_as_complete(tmp_path: Path) -> None:
    h = archive(tmp_path, segment_seconds=60)
    h.feed(random_chunks(5))  # no close(): as if the process died here
    assert not list(tmp_path.glob("*.wav"))
    (part,) = tmp_path.glob(".*.part")
    assert part.name.endswith(".part")
    assert ".wav." in part.name
    h.close()
    assert len(list(tmp_path.glob("*.wav"))) == 1


def test_float32_segments_have_an_ieee_float_header(tmp_path: Path) -> None:
    x = np.linspace(-1, 1, 1600)
    chunks = to_chunks(x, RATE, 400, sample_type=SampleType.FLOAT32)
    h = archive(tmp_path)
    h.feed(chunks)
    h.close()
    (wav,) = tmp_path.glob("*.wav")
    data = wav.read_bytes()
    assert data[:4] == b"RIFF"
    assert struct.unpack("<I", data[4:8])[0] == len(data) - 8
    assert struct.unpack("<HHI", data[20:28]) == (3, 1, RATE)
    body = data.index(b"data")
    size = struct.unpack("<I", data[body + 4 : body + 8])[0]
    np.testing.assert_array_equal(
        np.frombuffer(data[body + 8 : body + 8 + size], "<f4"), x.astype("<f4")
    )


def test_archive_without_directory_is_a_clear_error() -> None:
    with pytest.raises(HandlerError, match=r"archive needs an argument: archive:DIR"):
        Harness("archive")


def test_unwritable_archive_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(HandlerError, match="archive directory"):
        Harness(f"archive:{blocker}/sub")


def test_a_directory_we_may_not_write_names_our_uid_its_owner_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The usual mistake: a bind-mounted host directory owned by the host user,
    # not by the image's uid 10001. (Faked: the suite may run as root.)
    directory = tmp_path / "archive"
    directory.mkdir(mode=0o755)
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == directory else real_access(p, mode)
    )
    uid, gid = os.getuid(), os.getgid()
    st = directory.stat()
    with pytest.raises(HandlerError) as caught:
        Harness(f"archive:{directory}")
    assert str(caught.value) == (
        f"archive directory {directory} is not writable by uid {uid} gid {gid} "
        f"(owned by uid {st.st_uid} gid {st.st_gid}, mode 0755): make it theirs, e.g. "
        f"`chown {uid}:{gid} HOST_DIR` for a bind-mounted directory (the images run as uid 10001)"
    )


def test_a_restarted_archive_continues_skips_what_it_has_and_records_a_gap(tmp_path: Path) -> None:
    chunks = random_chunks(30)
    first = archive(tmp_path, segment_seconds=60)
    first.feed(chunks[:10])
    first.close()
    again = archive(tmp_path, segment_seconds=60)  # a new process (or group member) on the same DIR
    again.feed(chunks[8:20])  # seq 8 and 9 are replayed: already archived
    again.close()
    wavs = sorted(tmp_path.glob("*.wav"))
    assert b"".join(read_pcm(p) for p in wavs) == b"".join(bytes(c.payload) for c in chunks[:20])
    assert json.loads(wavs[1].with_suffix(".json").read_text())["gap_before"] is None
    later = archive(tmp_path, segment_seconds=60)
    later.feed(chunks[25:])  # 20..24 never arrived
    later.close()
    newest = json.loads(sorted(tmp_path.glob("*.json"))[-1].read_text())
    assert newest["gap_before"] == {"expected_seq": 20, "next_seq": 25, "missing_chunks": 5}
    assert newest["first_seq"] == 25


def test_other_streams_segments_do_not_count_as_this_streams_past(tmp_path: Path) -> None:
    other = archive(tmp_path, segment_seconds=60)
    other.feed(random_chunks(10, stream="mic_2"))  # file names start "mic_2_", like "mic" + "_"
    other.close()
    h = archive(tmp_path, segment_seconds=60)
    h.feed(random_chunks(3, stream="mic"))
    h.close()
    (mine,) = [p for p in tmp_path.glob("mic_2023*.json")]
    assert json.loads(mine.read_text())["gap_before"] is None


def test_two_writers_of_the_same_segment_never_overwrite_each_other(tmp_path: Path) -> None:
    """An at-least-once handover can have two group replicas archive the same
    first chunk into one DIR; both files survive, neither is truncated."""
    from audiosockets.audio import AudioFormat
    from audiosockets.handlers import HandlerContext, HandlerOptions, MetricSink
    from audiosockets.handlers.archive import Archive

    fmt = AudioFormat(16000, 1, SampleType.INT16)
    chunks = [
        Chunk(
            "mic",
            seq,
            1_700_000_000_000_000_000 + seq * 20_000_000,
            fmt,
            np.full(320, seq, np.int16).tobytes(),
        )
        for seq in range(10)
    ]
    writers = []
    for _ in range(2):
        ctx = HandlerContext(
            stream="mic", arg=str(tmp_path), options=HandlerOptions(), sink=MetricSink()
        )
        archive = Archive(ctx)
        archive.setup(fmt)
        writers.append(archive)
    for chunk in chunks[:6]:
        writers[0].handle(chunk)
    for chunk in chunks:  # the second replica starts from the same chunk, goes further
        writers[1].handle(chunk)
    writers[1].teardown()
    writers[0].teardown()
    wavs = sorted(tmp_path.glob("*.wav"))
    assert len(wavs) == 2
    sizes = sorted(p.stat().st_size - 44 for p in wavs)
    assert sizes == [6 * 640, 10 * 640]
    assert not list(tmp_path.glob(".*.part"))


# --- file names: one stream, one set of files (issue 13, item 5) ----------------------


def test_mic_space_underscore_and_slash_never_share_files_across_a_restart(
    tmp_path: Path,
) -> None:
    """Earlier, ``mic 1`` and ``mic_1`` had the same names: after a restart ``mic_1``
    took ``mic 1``'s newer sidecar as its own past and skipped every chunk."""
    names = ["mic 1", "mic_1", "mic/1"]
    late = {"mic 1": 10_000_000_000, "mic_1": 0, "mic/1": 5_000_000_000}
    first_run = {n: random_chunks(10, stream=n) for n in names}
    for name in names:
        chunks = [
            Chunk(c.stream, c.seq, c.captured_ns + late[name], c.format, c.payload)
            for c in first_run[name]
        ]
        h = archive(tmp_path, segment_seconds=60)
        h.feed(chunks[:5])
        h.close()
        again = archive(tmp_path, segment_seconds=60)  # the restarted processor
        again.feed(chunks[5:])
        again.close()
        assert again.value("audiosockets_archive_bytes_total", stream=name) == 5 * 800 * 2
    sidecars = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert len(sidecars) == 6
    for name in names:
        mine = sorted((s for s in sidecars if s["stream"] == name), key=lambda s: s["first_seq"])
        assert [(s["first_seq"], s["last_seq"]) for s in mine] == [(0, 4), (5, 9)]
        assert all(s["gap_before"] is None for s in mine)
        pcm = b"".join(read_pcm(tmp_path / s["file"]) for s in mine)
        assert pcm == b"".join(bytes(c.payload) for c in first_run[name])
    assert len({s["file"] for s in sidecars}) == 6


@pytest.mark.parametrize(
    "name",
    [
        "m" * 200,  # 200 bytes of ASCII: failed every write with ENAMETOOLONG
        "🎤" * 50,  # 200 bytes of UTF-8, 50 characters
        "Küche/Fenster links " * 9 + "ende",
    ],
)
def test_a_stream_name_up_to_the_wire_limit_is_archived_and_continued(
    tmp_path: Path, name: str
) -> None:
    chunks = random_chunks(10, stream=name)
    h = archive(tmp_path, segment_seconds=60)
    h.feed(chunks[:6])
    h.close()
    assert h.errors == []
    again = archive(tmp_path, segment_seconds=60)
    again.feed(chunks[4:])  # 4 and 5 replayed: skipped, found through the sidecar
    again.close()
    assert again.errors == []
    wavs = sorted(tmp_path.glob("*.wav"))
    assert len(wavs) == 2
    assert all(len(p.name.encode()) <= 255 for p in tmp_path.iterdir())
    assert b"".join(read_pcm(p) for p in wavs) == b"".join(bytes(c.payload) for c in chunks)
    assert {json.loads(p.with_suffix(".json").read_text())["stream"] for p in wavs} == {name}


def test_a_sidecar_from_the_old_name_scheme_still_continues_its_stream(tmp_path: Path) -> None:
    chunks = random_chunks(10, stream="mic 1")
    h = archive(tmp_path, segment_seconds=60)
    h.feed(chunks[:5])
    h.close()
    for p in tmp_path.iterdir():  # rename to what earlier versions wrote: "mic_1_<stamp>..."
        p.rename(p.with_name("mic_1_" + p.name.partition("_")[2].partition("_")[2]))
    assert sorted(p.name[:6] for p in tmp_path.iterdir()) == ["mic_1_", "mic_1_"]
    again = archive(tmp_path, segment_seconds=60)
    again.feed(chunks[3:])
    again.close()
    assert again.value("audiosockets_archive_bytes_total", stream="mic 1") == 5 * 800 * 2


def test_names_fit_a_file_system_with_a_short_name_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from audiosockets.handlers.archive import RESERVED_BYTES

    limit = RESERVED_BYTES + 30
    monkeypatch.setattr(os, "pathconf", lambda _p, _n: limit)
    h = archive(tmp_path, segment_seconds=60)
    h.feed(random_chunks(3, stream="x" * 200))
    h.close()
    (wav,) = tmp_path.glob("*.wav")
    assert wav.name.startswith("x" * (30 - 17) + "~")
    monkeypatch.setattr(os, "pathconf", lambda _p, _n: RESERVED_BYTES + 5)
    with pytest.raises(HandlerError, match="allows names of at most"):
        archive(tmp_path).feed(random_chunks(1))
