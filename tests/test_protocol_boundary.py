"""``FrameBoundary``: what lies after the last complete frame, whatever the split
(whole frames, byte by byte, headers cut anywhere), without sockets."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from audiosockets.protocol import HEADER_SIZE, FrameBoundary, Ping, encode, encode_chunk


def _expected(lengths: list[int], received: int) -> tuple[int, int]:
    """(incomplete, announced) after ``received`` bytes of frames of these payload lengths."""
    complete = 0
    for length in lengths:
        end = complete + HEADER_SIZE + length
        if end > received:
            announced = length if received - complete >= HEADER_SIZE else 0
            return received - complete, announced
        complete = end
    return received - complete, 0


@given(
    lengths=st.lists(st.integers(0, 3000), min_size=1, max_size=12),
    cuts=st.lists(st.integers(0, 40_000), max_size=30),
)
def test_any_split_gives_the_boundary_of_the_last_complete_frame(
    lengths: list[int], cuts: list[int]
) -> None:
    stream = b"".join(_frame(n) for n in lengths)
    points = sorted({c for c in cuts if c < len(stream)} | {len(stream)})
    frames = FrameBoundary()
    start = 0
    for point in points:
        incomplete = frames.feed(stream[start:point])
        start = point
        assert (incomplete, frames.announced) == _expected(lengths, point)
        assert frames.incomplete == incomplete
    assert frames.incomplete == 0


def _frame(payload: int) -> bytes:
    """A frame whose header announces ``payload`` bytes (the helper reads only lengths)."""
    return encode(Ping(1))[:4] + payload.to_bytes(4, "big") + b"\xaa" * payload


def test_byte_by_byte_and_a_frame_in_flight_after_whole_ones() -> None:
    chunk = encode_chunk(1, 0, 0, b"\x00\x01" * 320)
    ping = encode(Ping(7))
    stream = chunk + ping + chunk[:100]
    frames = FrameBoundary()
    for i, byte in enumerate(stream):
        frames.feed(bytes([byte]))
        received = i + 1
        if received <= len(chunk):
            assert frames.incomplete == received % len(chunk)
    assert (frames.incomplete, frames.announced) == (100, len(chunk) - HEADER_SIZE)
    # The rest of that frame, and two more whole ones, in one piece.
    assert frames.feed(chunk[100:] + ping + ping) == 0
    assert frames.announced == 0


def test_a_hoarders_announced_length_is_known_from_its_header_alone() -> None:
    frames = FrameBoundary()
    assert frames.feed(_frame(1 << 20)[: HEADER_SIZE - 1]) == HEADER_SIZE - 1
    assert frames.announced == 0
    assert frames.feed(_frame(1 << 20)[HEADER_SIZE - 1 : 5000]) == 5000
    assert frames.announced == 1 << 20
