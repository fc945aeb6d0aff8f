"""The NATS JetStream row of the processors dashboard against a real nats-server,
a recorder and a processor on ``nats://`` and Debian's ``prometheus``.

The processor's handler hangs (``gate_handler``) and reads from the earliest
chunk, so the processor stops pulling and the audio waits in JetStream; then
the recorder stops, so the lag holds still. Every query of the row must return
data at some point of the run, and the lag Prometheus scraped must equal, once
it holds still, what the server's own monitoring endpoint (``/jsz``) says the
processor's consumer has pending.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats_harness import NatsServer, free_port

from _support import require_binary, wait_until_sync
from observability.dashboards import NATS_ROW, load_dashboards, panel_queries, substitute
from observability.render import render_dashboard
from observability.stack import Prometheus, Stack, finite, http_get, scrape
from observability.support import OUTPUT_DIR

pytestmark = [pytest.mark.prometheus, pytest.mark.timeout(120)]

HERE = Path(__file__).parent
STREAM = "mic-nats"
ROW_QUERIES = [q for d in load_dashboards().values() for q in panel_queries(d) if q.row == NATS_ROW]
VARIABLES = {"__rate_interval": "5s"}


class NatsStack:
    def __init__(self, tmp: Path, servers: list[NatsServer]) -> None:
        self.monitor_port = free_port()
        self.server = NatsServer("solo", tmp, extra=f"http: 127.0.0.1:{self.monitor_port}")
        self.server.start()
        servers.append(self.server)
        self.gate = tmp / "gate"
        self.gate.touch()  # the handler hangs from its first chunk
        self.stack = Stack(tmp)
        self.stack.relay_url = f"{self.server.url}?lag_interval=1"
        # 100 chunks a second (the last --block-ms wins)
        self.recorder = self.stack.add_recorder(STREAM, "synth:speechlike", "--block-ms", "10")
        # A 1 s backlog: what reaches it as a replay (captured long before) is
        # never dropped; a full backlog stops the pulling instead.
        self.processor = self.stack.add_processor(
            "processor",
            "--stream", STREAM, "--start", "earliest", "--name", "slow",
            "--handler", f"{HERE / 'gate_handler.py'}:handle", "--backlog-seconds", "1",
            env={"AUDIOSOCKETS_TEST_GATE_FILE": str(self.gate)},
        )  # fmt: skip
        self.prometheus = Prometheus(require_binary("prometheus"), tmp, self.stack.targets())

    def start(self) -> None:
        self.prometheus.start()
        self.recorder.start()
        self.recorder.wait_ready()

        def stored() -> float:
            return scrape(self.recorder.metrics_port).get(
                f'audiosockets_jetstream_publish_ack_latency_seconds_count{{stream="{STREAM}"}}', 0
            )

        # More audio stored than the processor takes in before it stops pulling
        # (a pull batch, its subscriber's queue, its backlog), so that all it
        # takes arrives as a replay.
        wait_until_sync(lambda: stored() > 600, timeout=20, what="600 chunks in JetStream")
        self.processor.start()
        self.processor.wait_ready()

    def close(self) -> None:
        self.gate.unlink(missing_ok=True)  # let the processor drain and stop
        self.stack.close()
        self.prometheus.stop()

    def server_pending(self) -> int:
        """``num_pending`` of the processor's consumer, as the server reports it."""
        url = f"http://127.0.0.1:{self.monitor_port}/jsz?accounts=true&streams=true&consumers=true"
        report = json.loads(http_get(url))
        consumers = [
            c
            for account in report.get("account_details", [])
            for stream in account.get("stream_detail", [])
            if stream["name"] == "AUDIOSOCKETS"
            for c in stream.get("consumer_detail", [])
        ]
        assert len(consumers) == 1, consumers
        return int(consumers[0]["num_pending"])

    def prometheus_pending(self) -> float | None:
        rows = self.prometheus.query(
            f'audiosockets_jetstream_consumer_pending_chunks{{job="processor", stream="{STREAM}"}}'
        )
        return float(rows[0]["value"][1]) if rows else None


@pytest.fixture
def nats_stack(tmp_path: Path, servers: list[NatsServer]) -> Iterator[NatsStack]:
    stack = NatsStack(tmp_path, servers)
    try:
        stack.start()
        yield stack
    finally:
        stack.close()


def test_nats_row_has_data_and_the_lag_is_the_servers(nats_stack: NatsStack) -> None:
    assert len(ROW_QUERIES) >= 4
    prom = nats_stack.prometheus
    # The recorder publishes and the processor falls behind: the lag grows.
    wait_until_sync(
        lambda: (nats_stack.prometheus_pending() or 0) > 100,
        timeout=30,
        what="a lag of more than 100 chunks in Prometheus",
    )
    (growth,) = [q for q in ROW_QUERIES if q.panel == "JetStream lag growth"]

    def growing() -> bool:
        return any(v > 0 for v in finite(prom.query(substitute(growth.expr, VARIABLES))))

    wait_until_sync(growing, timeout=20, what="the lag growth panel to read above 0")
    before = scrape(nats_stack.recorder.metrics_port)
    acked = before[f'audiosockets_jetstream_publish_ack_latency_seconds_count{{stream="{STREAM}"}}']
    assert acked > 100
    nats_stack.recorder.stop()  # the lag holds still from here
    held = nats_stack.server_pending()
    assert held > 100

    def same() -> bool:
        return nats_stack.prometheus_pending() == nats_stack.server_pending()

    wait_until_sync(same, timeout=15, what="Prometheus' lag to equal the server's")
    assert nats_stack.server_pending() == held  # it held still: nothing was pulled

    empty = []
    at = time.time()
    for query in ROW_QUERIES:
        expr = substitute(query.expr, VARIABLES)
        rows = prom.query_range(expr, prom.started_at, at, 1)
        if not any(math.isfinite(float(v)) for r in rows for _, v in r["values"]):
            empty.append(f"{query.label()}: {expr}")
    assert empty == []
    draw_row_opened(prom, at)


def draw_row_opened(prom: Prometheus, at: float) -> None:
    """tests/_output/nats-jetstream.png: the row as an operator sees it opened."""
    if importlib.util.find_spec("matplotlib") is None:
        return
    dashboard = load_dashboards()["processors.json"]
    (row,) = [p for p in dashboard["panels"] if p["title"] == NATS_ROW]
    top = min(p["gridPos"]["y"] for p in row["panels"])
    panels = copy.deepcopy(row["panels"])
    for panel in panels:
        panel["gridPos"]["y"] -= top
    opened = {"title": f"{dashboard['title']} / {NATS_ROW}", "panels": panels}
    render_dashboard(
        prom, opened, prom.started_at, at, OUTPUT_DIR / "nats-jetstream.png", VARIABLES
    )
