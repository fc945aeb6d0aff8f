"""Live fuzz (issue 11): malformed, truncated, oversized and reordered frames
against a running relay, with a healthy 16 kHz stream beside it.

Each example is one connection: usually a valid HELLO (so frames reach the
session's rules), then a soup of frames drawn with hypothesis: valid ones,
random payloads under real types, damaged frames (a byte changed, cut short,
extended), bare headers with any length and version, random bytes, and a
valid publisher session in shuffled order. Afterwards: the relay is up, no
session is left behind, every connection the relay answered with ERROR is
counted in ``audiosockets_protocol_errors_total``, the healthy stream lost
nothing, and the relay's RSS grew by at most 64 MB.

The suite runs ``HOSTILE_FUZZ_FRAMES`` frames (default 3000); the full run
the issue asks for is

    HOSTILE_FUZZ_FRAMES=100000 python -m pytest tests/hostile/test_live_fuzz.py -s
"""

from __future__ import annotations

import os
import random
import socket
import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from audiosockets.protocol import (
    Hello,
    Role,
    encode,
)
from test_protocol_fuzz import (
    events,
    mutated,
    payloads,
    publisher_sessions,
    raw_frame,
    u32,
)

from .harness import MiB, healthy_stream, relay_process, sample_total

FRAMES = int(os.environ.get("HOSTILE_FUZZ_FRAMES", "3000"))
HEADER_VERSIONS = [1, 0, 2, 255]


@st.composite
def frame_lists(draw: st.DrawFn) -> list[bytes]:
    """The frames of one hostile connection (each element one frame, or what passes for one)."""
    frames: list[bytes] = []
    if draw(st.integers(0, 9)) < 8:
        frames.append(encode(Hello(draw(st.sampled_from(Role)), "fuzz", "")))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["valid", "payload", "mutated", "header", "raw", "reordered"]))
        if kind == "valid":
            frames.append(encode(draw(events)))
        elif kind == "payload":
            frames.append(raw_frame(draw(st.integers(0, 16)), draw(payloads())))
        elif kind == "mutated":
            frames.append(draw(mutated(encode(draw(events)))))
        elif kind == "header":
            version = draw(st.sampled_from(HEADER_VERSIONS))
            frames.append(
                raw_frame(0, b"")[:2]
                + bytes([version, draw(st.integers(0, 255))])
                + draw(u32).to_bytes(4, "big")
            )
        elif kind == "raw":
            frames.append(draw(st.binary(min_size=1, max_size=32)))
        else:
            session = [encode(e) for e in draw(publisher_sessions())]
            random.Random(draw(st.integers(0, 2**32))).shuffle(session)
            frames.extend(session)
    return frames


def _answered_with_error(host: str, port: int, data: bytes) -> bool:
    """Send ``data``, close our side, read to the end: did an ERROR frame come back?
    (Frames are walked by their headers: the relay's replies are well formed.)"""
    with socket.create_connection((host, port), timeout=10) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the relay closed first: it read enough to refuse us
        received = bytearray()
        try:
            while chunk := sock.recv(1 << 16):
                received += chunk
        except OSError:
            pass
    return _has_error_frame(bytes(received))


def _has_error_frame(data: bytes) -> bool:
    pos = 0
    while pos + 8 <= len(data):
        ftype = data[pos + 3]
        length = int.from_bytes(data[pos + 4 : pos + 8], "big")
        if ftype == 0x0E:
            return True
        pos += 8 + length
    return False


@pytest.mark.timeout(max(300, FRAMES // 50))  # about 200 frames a second on 2 loaded cores
def test_a_running_relay_survives_frames_nobody_should_send() -> None:
    with relay_process(frame_timeout=2.0) as relay, healthy_stream(relay.url) as healthy:
        rss0 = relay.rss_bytes()
        stats = {"frames": 0, "connections": 0, "errors_seen": 0}

        @settings(
            max_examples=max(50, FRAMES // 40),
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(frame_lists())
        def fuzz(frames: list[bytes]) -> None:
            stats["frames"] += len(frames)
            stats["connections"] += 1
            if _answered_with_error(relay.host, relay.port, b"".join(frames)):
                stats["errors_seen"] += 1

        while stats["frames"] < FRAMES:
            fuzz()
        deadline = time.monotonic() + 60
        text = relay.scrape()
        while time.monotonic() < deadline:
            text = relay.scrape()
            clients = sample_total(text, "audiosockets_connected_clients")
            if clients == 2:  # only the healthy publisher and subscriber remain
                break
            time.sleep(0.2)
        grown = relay.rss_bytes() - rss0
        report = healthy.stop()
        assert relay.alive()
    assert sample_total(text, "audiosockets_connected_clients") == 2, "sessions left behind"
    refused = sample_total(text, "audiosockets_protocol_errors_total")
    assert stats["errors_seen"] <= refused <= stats["connections"], (stats, refused)
    assert refused > stats["connections"] // 2  # most of the soup is refused
    assert sample_total(text, "audiosockets_protocol_errors_total", reason="internal_error") == 0
    assert grown <= 64 * MiB, f"relay RSS grew {grown / MiB:.1f} MiB"
    report.assert_lossless()
    print(
        f"live fuzz: {stats['frames']} frames on {stats['connections']} connections, "
        f"{refused:g} refused ({stats['errors_seen']} ERROR frames seen); "
        f"RSS +{grown / MiB:.1f} MiB; healthy p99 {report.p99_ms:.1f} ms"
    )
