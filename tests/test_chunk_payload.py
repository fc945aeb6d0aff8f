"""What a publisher accepts as one chunk, the same over the relay and over NATS:
``AudioFormat.payload`` is the one check both publishers make before a chunk takes
a sequence number and a place in the spool."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from audiosockets.audio import AudioFormat, SampleType
from audiosockets.client import Publisher

STEREO16 = AudioFormat(16000, 2, SampleType.INT16)
MONO_F32 = AudioFormat(48000, 1, SampleType.FLOAT32)


@pytest.mark.parametrize(
    ("fmt", "samples", "expected"),
    [
        (STEREO16, np.zeros((10, 2), np.int16), 40),
        (STEREO16, b"\x00" * 4, 4),
        (MONO_F32, memoryview(np.ones(3, np.float32).tobytes()), 12),
        (MONO_F32, np.ones(7, np.float32), 28),
    ],
    ids=["array-2d", "bytes", "memoryview", "array-1d"],
)
def test_whole_frames_of_the_right_type_pass_as_little_endian_bytes(
    fmt: AudioFormat, samples: Any, expected: int
) -> None:
    assert len(fmt.payload(samples, 1 << 20)) == expected


@pytest.mark.parametrize(
    ("fmt", "samples", "match"),
    [
        (STEREO16, b"", "at least one frame"),
        (STEREO16, np.zeros((0, 2), np.int16), "at least one frame"),
        (STEREO16, b"\x00" * 6, "whole number of 4-byte frames"),
        (STEREO16, np.zeros((10, 3), np.int16), "3 channels"),
        (STEREO16, np.zeros((10, 2), np.float32), "float32"),
        (MONO_F32, np.zeros(10, np.float64), "float64"),
        (MONO_F32, b"\x00" * 4100, "4100 bytes is larger than the 4096-byte frame limit"),
    ],
    ids=["empty", "no-frames", "partial-frame", "channels", "dtype", "float64", "too-large"],
)
def test_a_chunk_that_cannot_be_one_is_refused_with_the_reason(
    fmt: AudioFormat, samples: Any, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        fmt.payload(samples, 4096)


def _relay_stream(fmt: AudioFormat) -> Any:
    return Publisher("tcp://127.0.0.1:9").stream("mic", fmt)


def _nats_stream(fmt: AudioFormat) -> Any:
    jetstream = pytest.importorskip("audiosockets.jetstream", reason="the nats extra")
    return jetstream.JetStreamPublisher("nats://127.0.0.1:9").stream("mic", fmt)


@pytest.mark.parametrize("make", [_relay_stream, _nats_stream], ids=["relay", "nats"])
@pytest.mark.parametrize(
    ("bad", "match"),
    [(b"", "empty"), (b"\x00" * 3, "whole number"), (np.zeros((4, 1), np.int16), "1 channels")],
    ids=["empty", "partial-frame", "channels"],
)
def test_both_publishers_refuse_a_bad_chunk_before_it_takes_a_seq(
    make: Any, bad: Any, match: str
) -> None:
    stream = make(STEREO16)
    with pytest.raises(ValueError, match=match):
        stream.send(bad)
    assert stream.next_seq == 0
    assert stream.send(np.zeros((160, 2), np.int16)) == 0
