"""The dashboards against the real stack and a real Prometheus.

Starts relay, two recorders (a sine and a dead microphone, ``synth:silence``),
a ``level`` processor in a group and a processor whose handler the test
stalls, as processes on loopback; Debian's ``prometheus`` scrapes them every
second and evaluates the repository's rules. Faults injected: the stalled
processor (its backlog overruns), a relay restart, the silent source. Then
every query of every dashboard panel is evaluated through Prometheus' HTTP
API, and the panels that must show the faults are held to the ground truth:
the drop count equals the chunks the stalled handler never saw, the drop
ratio names only that stage and reason, the silence panel flags only the
silent stream. The dashboards are drawn to tests/_output/*.png.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _support import wait_until_sync

from .dashboards import iter_panels, load_dashboards, panel_queries, substitute
from .render import render_dashboard
from .stack import Prometheus, Stack, finite, scrape
from .support import OUTPUT_DIR, require_binary, require_module

pytestmark = [pytest.mark.prometheus, pytest.mark.slow, pytest.mark.timeout(240)]

HERE = Path(__file__).parent
STALL_HANDLER = f"{HERE / 'stall_handler.py'}:handle"
#: Chunks the stalled processor must lose before the stall is lifted.
INJECTED_DROPS_AT_LEAST = 60
#: Seconds of undisturbed audio in Prometheus before the first fault.
STEADY_SECONDS = 30
#: Seconds of audio through the restarted relay before the checks.
AFTER_RESTART_SECONDS = 10
#: The one drop series the faults should produce: (stage, reason, stream).
INJECTED = ("processor", "processor_overrun", "mic-sine")
RATE_INTERVAL = "15s"


class Live:
    """The running stack, Prometheus and what the test injected."""

    def __init__(self, tmp: Path, prometheus_binary: str) -> None:
        self.tmp = tmp
        self.stall_file = tmp / "stall"
        self.events = tmp / "stalled-events.jsonl"
        self.stack = Stack(tmp)
        self.relay = self.stack.add_relay()
        self.sine = self.stack.add_recorder("mic-sine", "synth:sine:440")
        self.silent = self.stack.add_recorder("mic-silent", "synth:silence")
        self.level = self.stack.add_processor("level", "--handler", "level", "--group", "level")
        self.stalled = self.stack.add_processor(
            "stalled",
            "--handler",
            STALL_HANDLER,
            "--stream",
            "mic-sine",
            "--backlog-seconds",
            "3",
            "--name",
            "process-stalled",
            "--events",
            str(self.events),
            env={"AUDIOSOCKETS_TEST_STALL_FILE": str(self.stall_file)},
        )
        self.drops_before_restart = -1.0
        self.stall_ended_at = 0.0
        self.stack.start()
        self.prometheus = Prometheus(prometheus_binary, tmp, self.stack.targets())
        self.prometheus.start()

    def close(self) -> None:
        self.stack.close()
        self.prometheus.stop()

    # --- reading the services directly (not through Prometheus) ---------------

    def overrun_drops(self) -> float:
        key = 'audiosockets_chunks_dropped_total{reason="processor_overrun",stream="mic-sine"}'
        return scrape(self.stalled.metrics_port).get(key, 0.0)

    def backlog(self) -> float:
        key = 'audiosockets_queue_depth_chunks{stream="mic-sine"}'
        return scrape(self.stalled.metrics_port).get(key, math.inf)

    def injected_loss(self) -> int:
        """Chunks of mic-sine the stalled handler never saw: the ground truth."""
        seqs = self.handled_seqs()
        assert len(seqs) == len(set(seqs)), "the handler saw a chunk twice"
        return (max(seqs) - min(seqs) + 1) - len(seqs)

    def handled_seqs(self) -> list[int]:
        seqs = []
        for line in self.events.read_text(encoding="utf-8").splitlines():
            event = json.loads(line)
            if event.get("stream") == "mic-sine" and "seq" in event:
                seqs.append(int(event["seq"]))
        return seqs

    def publishing(self, service: Any) -> bool:
        samples = scrape(service.metrics_port)
        return samples.get('audiosockets_connected{role="publisher"}') == 1.0

    def subscribed(self, service: Any) -> bool:
        samples = scrape(service.metrics_port)
        return samples.get('audiosockets_connected{role="subscriber"}') == 1.0

    def connections(self) -> dict[str, float | None]:
        """Each client's ``audiosockets_connected`` (for failure messages)."""
        state: dict[str, float | None] = {}
        for service in self.stack.services.values():
            if service.job != "relay":
                samples = scrape(service.metrics_port)
                state[service.name] = next(
                    (v for k, v in samples.items() if k.startswith("audiosockets_connected{")), None
                )
        return state

    # --- through Prometheus ----------------------------------------------------

    def prom_has(self, expr: str) -> bool:
        return bool(self.prometheus.query(expr))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    prometheus_binary = require_binary("prometheus")
    require_module("matplotlib", "matplotlib")
    stack = Live(tmp_path_factory.mktemp("live"), prometheus_binary)
    try:
        inject_faults(stack)
        yield stack
    finally:
        stack.close()


def inject_faults(live: Live) -> None:
    prom = live.prometheus
    stalled = live.stalled.instance
    wait_until_sync(prom.targets_up, timeout=20, what="every target up in Prometheus")
    # Prometheus must hold a zero for the overrun counter before anything is
    # dropped: then increase() over the test is exact (no extrapolation).
    wait_until_sync(
        lambda: live.prom_has(
            f'audiosockets_chunks_dropped_total{{instance="{stalled}", '
            f'reason="processor_overrun", stream="mic-sine"}} == 0'
        ),
        timeout=20,
        what="the stalled processor's zero overrun count in Prometheus",
    )
    # A steady stretch first, so rates and the pictures have a baseline.
    wait_until_sync(
        lambda: live.prom_has(f'count_over_time(up{{job="relay"}}[1m]) >= {STEADY_SECONDS}'),
        timeout=STEADY_SECONDS + 20,
        what=f"{STEADY_SECONDS} s of steady state in Prometheus",
    )

    # Fault 1: a stalled processor.
    live.stall_file.touch()
    wait_until_sync(
        lambda: live.overrun_drops() >= INJECTED_DROPS_AT_LEAST,
        timeout=30,
        what=f"{INJECTED_DROPS_AT_LEAST} overrun drops",
    )
    live.stall_file.unlink()
    wait_until_sync(lambda: live.backlog() == 0, timeout=20, what="the backlog to drain")
    live.drops_before_restart = live.overrun_drops()
    live.stall_ended_at = time.time()

    # Fault 2: a relay restart. Recorders spool and resend, processors resume.
    live.relay.stop()
    wait_until_sync(
        lambda: not live.publishing(live.sine) and not live.publishing(live.silent),
        timeout=20,
        what="recorders to notice the relay is gone",
    )
    live.relay.start()
    live.relay.wait_ready()
    try:
        wait_until_sync(
            lambda: (
                all(live.publishing(r) for r in (live.sine, live.silent))
                and all(live.subscribed(p) for p in (live.level, live.stalled))
            ),
            timeout=30,
            what="every client back on the restarted relay",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}: connected = {live.connections()}") from None
    # Let Prometheus scrape the restarted relay a number of times.
    restarted_at = time.time()

    def scraped_since_restart() -> bool:
        window = max(1, math.ceil(time.time() - restarted_at))
        return live.prom_has(
            f'sum_over_time(up{{job="relay"}}[{window}s]) >= {AFTER_RESTART_SECONDS}'
        ) and live.prom_has('sum(rate(audiosockets_chunks_sent_total{job="relay"}[5s])) > 0')

    wait_until_sync(
        scraped_since_restart,
        timeout=AFTER_RESTART_SECONDS + 20,
        what="audio through the restarted relay in Prometheus",
    )
    # Fault 3, the silent source, runs from the start.


def variables(live: Live, at: float) -> dict[str, str]:
    elapsed = math.ceil(at - live.prometheus.started_at) + 5
    return {"__rate_interval": RATE_INTERVAL, "__range": f"{elapsed}s"}


ALL_QUERIES = [
    query for dashboard in load_dashboards().values() for query in panel_queries(dashboard)
]


def test_every_panel_query_returns_data(live: Live) -> None:
    now = time.time()
    values = variables(live, now)
    empty = {}
    assert len(ALL_QUERIES) >= 30
    for query in ALL_QUERIES:
        result = live.prometheus.query(substitute(query.expr, values), at=now)
        if not finite(result):
            empty[query.label()] = substitute(query.expr, values)
    assert empty == {}


def test_every_template_variable_lists_the_streams_and_instances(live: Live) -> None:
    streams = {"mic-sine", "mic-silent"}
    for name, dashboard in load_dashboards().items():
        for variable in dashboard["templating"]["list"]:
            query = variable["query"]["query"]
            selector, label = query.removeprefix("label_values(").removesuffix(")").rsplit(",", 1)
            found = set(
                live.prometheus.api(f"label/{label.strip()}/values", **{"match[]": selector})
            )
            if variable["name"] == "stream":
                assert found == streams, (name, query)
            else:
                job = {
                    "overview.json": None,
                    "recorder.json": "recorder",
                    "processors.json": "processor",
                }[name]
                expected_instances = {
                    s.instance for s in live.stack.services.values() if job in (None, s.job)
                }
                assert found == expected_instances, (name, query)


def _panel(dashboard: str, title: str) -> dict[str, Any]:
    (panel,) = [p for p in iter_panels(load_dashboards()[dashboard]) if p["title"] == title]
    return panel


def test_drop_count_panel_equals_what_the_stalled_processor_lost(live: Live) -> None:
    prom = live.prometheus
    lost = live.injected_loss()
    assert lost >= INJECTED_DROPS_AT_LEAST
    assert live.overrun_drops() == lost
    # The relay restart came after the stall and cost nothing more.
    assert live.drops_before_restart == lost

    series = (
        f'audiosockets_chunks_dropped_total{{instance="{live.stalled.instance}", '
        f'reason="processor_overrun", stream="mic-sine"}}'
    )
    wait_until_sync(lambda: prom.value(series) == lost, timeout=10, what="the final count scraped")
    shown = drop_count_panel(live, series)
    assert shown[INJECTED] == pytest.approx(lost, abs=1e-6)
    # Processors and recorders lost nothing else (the relay: see below).
    assert {k for k in shown if k[0] != "relay"} == {INJECTED}


def drop_count_panel(live: Live, series: str) -> dict[tuple[str, str, str], float]:
    """The "Chunks dropped in range" panel at the last scrape of ``series``.

    There the window ends on a sample and starts on the counter's zero, so
    increase() is exact (no extrapolation).
    """
    prom = live.prometheus
    at = prom.value(f"timestamp({series})")
    (target,) = _panel("overview.json", "Chunks dropped in range")["targets"]
    result = prom.query(substitute(target["expr"], variables(live, at)), at=at)
    return {
        (s["metric"]["job"], s["metric"]["reason"], s["metric"]["stream"]): float(s["value"][1])
        for s in result
    }


def drop_ratio_peaks(live: Live) -> dict[tuple[str, str, str], float]:
    """The highest value each series of the drop-ratio panel reached."""
    prom = live.prometheus
    (target,) = _panel("overview.json", "Drop ratio by stage and reason")["targets"]
    rows = prom.query_range(substitute(target["expr"], {}), prom.started_at, time.time(), 1)
    return {
        (r["metric"]["job"], r["metric"]["reason"], r["metric"]["stream"]): max(
            (float(v) for _, v in r["values"] if math.isfinite(float(v))), default=0.0
        )
        for r in rows
    }


def test_drop_ratio_panel_shows_the_stalled_stage(live: Live) -> None:
    peaks = drop_ratio_peaks(live)
    # Two processors share mic-sine and only one lost chunks, so the stage's
    # ratio is at most half of what the stalled one lost out of what it got.
    assert 0 < peaks[INJECTED] < 0.5
    # The panel draws only series above zero: no other processor or recorder.
    assert {k for k in peaks if k[0] != "relay"} == {INJECTED}

    # Shortly after the stall the 1 m window holds every injected drop: the
    # ratio times the chunks the stage handled in that window is the loss.
    prom = live.prometheus
    at = live.stall_ended_at + 5
    (target,) = _panel("overview.json", "Drop ratio by stage and reason")["targets"]
    ratios = {
        (r["metric"]["job"], r["metric"]["reason"], r["metric"]["stream"]): float(r["value"][1])
        for r in prom.query(substitute(target["expr"], {}), at=at)
    }
    handled = prom.value(
        'sum(increase({__name__=~"audiosockets_chunks_(sent|processed|dropped)_total", '
        'job="processor", stream="mic-sine"}[1m]))',
        at=at,
    )
    assert ratios[INJECTED] * handled == pytest.approx(live.injected_loss(), rel=0.05)


# Remove this marker once the relay is fixed. Not strict: the bug is a race
# (a subscriber that reattaches before the publisher has resent its history
# gets a cursor at the window's start; trimming the resent history then
# counts replay_window_exceeded for chunks it already had, seq <= after_seq),
# so the test passes on some runs and fails on others.
def test_relay_restart_shows_no_drops(live: Live) -> None:
    """Both drop panels show exactly the injected fault and nothing for the restart."""
    series = (
        f'audiosockets_chunks_dropped_total{{instance="{live.stalled.instance}", '
        f'reason="processor_overrun", stream="mic-sine"}}'
    )
    assert set(drop_count_panel(live, series)) == {INJECTED}
    assert set(drop_ratio_peaks(live)) == {INJECTED}


def test_silence_panel_flags_exactly_the_silent_stream(live: Live) -> None:
    panel = _panel("recorder.json", "Seconds since last sound")
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    warn_at = min(s["value"] for s in steps if s["value"] is not None)
    (target,) = panel["targets"]
    now = time.time()
    result = live.prometheus.query(substitute(target["expr"], variables(live, now)), at=now)
    values = {s["metric"]["stream"]: float(s["value"][1]) for s in result}
    assert set(values) == {"mic-sine", "mic-silent"}
    assert {stream for stream, v in values.items() if v >= warn_at} == {"mic-silent"}


def test_overview_shows_the_relay_restart(live: Live) -> None:
    prom = live.prometheus
    now = time.time()
    (target,) = _panel("overview.json", "Reconnects")["targets"]
    rows = prom.query_range(
        substitute(target["expr"], variables(live, now)), prom.started_at, now, 1
    )
    peaks = {
        (r["metric"]["job"], r["metric"]["role"]): max(float(v) for _, v in r["values"])
        for r in rows
    }
    assert peaks[("recorder", "publisher")] >= 2  # both recorders reconnected
    assert peaks[("processor", "subscriber")] >= 2
    live_panel = _panel("overview.json", "Stream live")
    (target,) = live_panel["targets"]
    result = prom.query(substitute(target["expr"], variables(live, now)), at=now)
    assert {s["metric"]["stream"]: s["value"][1] for s in result} == {
        "mic-sine": "1",
        "mic-silent": "1",
    }
    # Nothing lost to the restart: no processor saw a gap in the sequence.
    assert prom.value('sum(audiosockets_sequence_gaps_total{job="processor"})') == 0


def test_render_dashboards(live: Live) -> None:
    prom = live.prometheus
    now = time.time()
    for name, dashboard in load_dashboards().items():
        path = OUTPUT_DIR / f"dashboard-{name.removesuffix('.json')}.png"
        render_dashboard(prom, dashboard, prom.started_at, now, path, variables(live, now))
        assert path.stat().st_size > 20_000
