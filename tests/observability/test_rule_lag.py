"""A loss scraped at the last moment reaches the loss panels' recording rules.

The loss panels read recording rules, which Prometheus evaluates on its own
clock, after the scrapes they read. The live-stack fixture once checked the
panels as soon as the recorders' losses were scraped: when that scrape was
the first to carry any loss, "Lost at source" had never been above zero yet.
Here a fake recorder loses 50 chunks at once; the check waits, as the
fixture does, until every rule group has been evaluated after the scrape.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from _support import wait_until_sync

from .dashboards import substitute
from .stack import Prometheus, finite
from .support import require_binary

pytestmark = [pytest.mark.prometheus, pytest.mark.slow, pytest.mark.timeout(120)]

LOST_AT_SOURCE = (
    'instance_stream:audiosockets_chunks_dropped:ratio_rate1m{instance=~"$instance"} > 0'
)


class FakeRecorder:
    """A /metrics endpoint with a recorder's sent and dropped counters."""

    def __init__(self) -> None:
        self.sent = 0
        self.dropped = 0
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                recorder.sent += 50  # audio keeps flowing
                body = (
                    "# TYPE audiosockets_chunks_sent_total counter\n"
                    f'audiosockets_chunks_sent_total{{stream="s"}} {recorder.sent}\n'
                    "# TYPE audiosockets_chunks_dropped_total counter\n"
                    "audiosockets_chunks_dropped_total"
                    f'{{reason="spool_full",stream="s"}} {recorder.dropped}\n'
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.instance = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder() -> Iterator[FakeRecorder]:
    fake = FakeRecorder()
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def prometheus(tmp_path: Path, recorder: FakeRecorder) -> Iterator[Prometheus]:
    prom = Prometheus(require_binary("prometheus"), tmp_path, {"recorder": [recorder.instance]})
    prom.start()
    try:
        yield prom
    finally:
        prom.stop()


def test_a_loss_in_the_last_scrape_shows_once_the_rules_ran_after_it(
    recorder: FakeRecorder, prometheus: Prometheus
) -> None:
    prom = prometheus
    ratio = "instance_stream:audiosockets_chunks_dropped:ratio_rate1m"
    wait_until_sync(lambda: bool(prom.query(ratio)), timeout=30, what="the ratio recorded (0)")
    recorder.dropped = 50  # a burst of loss between two scrapes
    counter = 'audiosockets_chunks_dropped_total{reason="spool_full"}'
    wait_until_sync(
        lambda: finite(prom.query(counter)) == [50], timeout=30, what="the loss scraped"
    )
    scraped_at = time.time()
    wait_until_sync(
        lambda: prom.rules_evaluated_after(scraped_at),
        timeout=30,
        what="every rule group evaluated after the scrape",
    )
    at = time.time()
    expr = substitute(LOST_AT_SOURCE, {"instance": recorder.instance})
    assert finite(prom.query(expr, at=at)), "Lost at source is empty"
