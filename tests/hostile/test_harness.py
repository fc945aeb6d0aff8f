"""The harness itself: a relay process, a healthy stream, RSS and metrics readings."""

from __future__ import annotations

from .harness import HEALTHY_STREAM, healthy_stream, relay_process


def test_a_quiet_relay_carries_the_healthy_stream_whole() -> None:
    with relay_process(replay_seconds=5.0) as relay:
        rss = relay.rss_bytes()
        assert 10 << 20 < rss < 500 << 20, rss
        with healthy_stream(relay.url) as healthy:
            report = healthy.stop()
        report.assert_lossless()
        assert report.sent >= 1
        assert report.p99_ms < 1000
        assert relay.alive()
        received = relay.sample("audiosockets_chunks_received_total", stream=HEALTHY_STREAM)
        assert received == report.sent
        assert relay.total("audiosockets_chunks_dropped_total") == 0
