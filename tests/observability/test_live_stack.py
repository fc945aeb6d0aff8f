"""The dashboards and alerts against the real stack and a real Prometheus.

Starts a relay (2 s replay window), two recorders (``synth:speechlike`` and a
dead microphone, ``synth:silence``; 4 s spools) and five processors on both
streams: ``level`` in a group, three that record every chunk they handle and
one that does the same but takes 50 ms per 20 ms chunk while the test stalls
it. All run as processes on loopback; Debian's ``prometheus`` scrapes them
every second and evaluates the repository's rules.

Faults, in order, with what each must show (the ground truth is each
processor's own record of the chunks it handled, never the metrics):

1. The stalled processor among five, for over a minute: the drop alert names
   that processor (instance, handler) and carries its own ratio, within 10 %
   of the share of chunks it really missed; no other processor is named. Its
   processing-time p95 reads within 20 % of 50 ms.
2. The relay hangs (SIGSTOP) for longer than the recorders' spool: every
   "is audio flowing?" panel reads down/0/STOPPED, none is empty, and the
   level panels stop showing the last level as if it were current.
3. The relay comes back; the stall ends. For every recording processor and
   both streams, the chunks it missed equal, exactly, the chunks lost at the
   source (the recorder's counters) plus those lost in the relay for that
   subscriber plus those lost in that processor.

Then every query of every dashboard panel is evaluated through Prometheus'
HTTP API and the dashboards are drawn to tests/_output/*.png.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from _support import wait_until_sync

from .dashboards import NATS_ROW, iter_panels, load_dashboards, panel_queries, substitute
from .render import render_dashboard
from .stack import Prometheus, Service, Stack, finite, scrape
from .support import OUTPUT_DIR, require_binary, require_module

pytestmark = [pytest.mark.prometheus, pytest.mark.slow, pytest.mark.timeout(360)]

HERE = Path(__file__).parent
RECORD_HANDLER = f"{HERE / 'stall_handler.py'}:handle"
HANDLER_LABEL = "stall_handler.py:handle"
STREAMS = ("mic-speech", "mic-silent")
SPOOL_SECONDS = 4
REPLAY_SECONDS = 2
#: The stalled handler's time per chunk (stall_handler.STALLED_SECONDS_PER_CHUNK).
HANDLER_SECONDS = 0.05
#: The rules' rate window plus a margin: the alert's ratio must come from a
#: window that lies wholly inside the stall.
STALL_WINDOW_SECONDS = 62
#: Seconds without a chunk after which a stream reads STOPPED (the panels' threshold).
STOPPED_AFTER = 10
RATE_INTERVAL = "15s"
#: How often the fixture polls a condition: every poll scrapes a service or
#: queries Prometheus, so polling fast loads the stack it measures.
POLL_SECONDS = 0.2
RECORDING = ("rec-1", "rec-2", "rec-3", "slow")


@dataclass
class Recording:
    """A processor that writes an event line for every chunk it handles."""

    name: str
    service: Service
    events: Path

    @property
    def subscriber(self) -> str:
        return f"process-{self.name}"

    def handled(self) -> dict[str, list[tuple[int, int]]]:
        """(seq, capture time ns) of every handled chunk, per stream, in order."""
        out: dict[str, list[tuple[int, int]]] = {s: [] for s in STREAMS}
        for event in self.event_lines():
            out[event["stream"]].append((int(event["seq"]), int(event["captured_ns"])))
        return out

    def event_lines(self) -> list[dict[str, Any]]:
        text = self.events.read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines()]

    def took_p95(self, start: float, end: float) -> float:
        """The 95th percentile of what the handler took for chunks captured in [start, end]."""
        took = sorted(
            float(e["took"]) for e in self.event_lines() if start <= e["captured_ns"] / 1e9 <= end
        )
        return took[math.ceil(0.95 * len(took)) - 1]

    def missed(self) -> dict[str, int]:
        """Chunks between the first and the last one handled that were not handled."""
        result = {}
        for stream, chunks in self.handled().items():
            seqs = [seq for seq, _ in chunks]
            assert len(seqs) == len(set(seqs)), f"{self.name} handled a chunk of {stream} twice"
            result[stream] = max(seqs) - min(seqs) + 1 - len(seqs)
        return result


@dataclass
class Observed:
    """What the fixture saw at each stage, for the tests to judge."""

    steady_at: float = 0.0  # the stall has run a whole rate window
    alerts: list[dict[str, Any]] = field(default_factory=list)
    real_loss: dict[str, dict[str, float]] = field(default_factory=dict)  # processor -> stream
    took_p95: float = 0.0  # what the stalled handler really took, p95
    state_at: float = 0.0  # Stream state tells sound from silence
    down_at: float = 0.0  # the relay hangs and streams read STOPPED
    spool_full_while_down: dict[str, float] = field(default_factory=dict)
    settled_at: float = 0.0  # everything caught up, nothing lost since
    counters: dict[str, dict[str, float]] = field(default_factory=dict)  # scrape per service
    status: dict[str, Any] = field(default_factory=dict)  # `audiosockets status --json`
    missed: dict[str, dict[str, int]] = field(default_factory=dict)  # processor -> stream -> n
    checked_at: float = 0.0  # every target scraped after settled_at


class Live:
    """The running stack, Prometheus and what the test injected."""

    def __init__(self, tmp: Path, prometheus_binary: str) -> None:
        self.tmp = tmp
        self.stall_file = tmp / "stall"
        self.stack = Stack(tmp)
        # Heartbeats every 2 s (6 s to declare a peer dead): a relay starved
        # for a few seconds on a loaded machine is not an outage.
        self.relay = self.stack.add_relay(
            "--replay-seconds", str(REPLAY_SECONDS), "--heartbeat-seconds", "2"
        )
        spool = ("--spool-seconds", str(SPOOL_SECONDS))
        self.recorders = {
            "mic-speech": self.stack.add_recorder("mic-speech", "synth:speechlike", *spool),
            "mic-silent": self.stack.add_recorder("mic-silent", "synth:silence", *spool),
        }
        self.level = self.stack.add_processor("level", "--handler", "level", "--group", "level")
        self.recording: dict[str, Recording] = {}
        for name in RECORDING:
            events = tmp / f"{name}-events.jsonl"
            args = ["--handler", RECORD_HANDLER, "--name", f"process-{name}"]
            args += ["--events", str(events)]
            env = None
            if name == "slow":
                args += ["--backlog-seconds", "2"]
                env = {"AUDIOSOCKETS_TEST_STALL_FILE": str(self.stall_file)}
            service = self.stack.add_processor(name, *args, env=env)
            self.recording[name] = Recording(name, service, events)
        self.slow = self.recording["slow"]
        self.seen = Observed()
        self.stall_file.touch()  # the slow processor is slow from its first chunk
        self.stack.start()
        self.prometheus = Prometheus(prometheus_binary, tmp, self.stack.targets())
        self.prometheus.start()

    def close(self) -> None:
        self.stack.close()
        self.prometheus.stop()

    # --- reading the services directly (not through Prometheus) ---------------

    def connected(self, service: Service, role: str) -> bool:
        return scrape(service.metrics_port).get(f'audiosockets_connected{{role="{role}"}}') == 1.0

    def processors(self) -> list[Service]:
        return [s for s in self.stack.services.values() if s.job == "processor"]

    def everyone_connected(self) -> bool:
        return all(self.connected(r, "publisher") for r in self.recorders.values()) and all(
            self.connected(p, "subscriber") for p in self.processors()
        )

    def spool_full(self, stream: str) -> float:
        key = f'audiosockets_chunks_dropped_total{{reason="spool_full",stream="{stream}"}}'
        return scrape(self.recorders[stream].metrics_port).get(key, 0.0)

    def counters(self) -> dict[str, dict[str, float]]:
        return {name: scrape(s.metrics_port) for name, s in self.stack.services.items()}

    def relay_status(self) -> dict[str, Any]:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "audiosockets",
                "status",
                "--json",
                "--relay",
                self.stack.relay_url,
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        report: dict[str, Any] = json.loads(result.stdout)
        return report

    def real_loss(self, recording: Recording, start: float, end: float) -> dict[str, float]:
        """Share of the chunks captured in [start, end] that ``recording`` never handled."""
        loss = {}
        for stream, chunks in recording.handled().items():
            inside = [seq for seq, ns in chunks if start <= ns / 1e9 <= end]
            span = max(inside) - min(inside) + 1
            loss[stream] = 1 - len(inside) / span
        return loss

    def caught_up(self) -> bool:
        """Every recording processor handled chunks captured in the last 2 s."""
        recent = time.time_ns() - 2_000_000_000
        for recording in self.recording.values():
            for chunks in recording.handled().values():
                if not chunks or chunks[-1][1] < recent:
                    return False
        return True

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
    seen = live.seen
    slow = live.slow.service.instance
    wait_until_sync(
        prom.targets_up, timeout=30, what="every target up in Prometheus", every=POLL_SECONDS
    )

    # Fault 1: a stalled processor among five. Wait until the drops started a
    # whole rate window ago, so the alert's ratio is the stall's alone.
    overrun = f'audiosockets_chunks_dropped_total{{instance="{slow}", reason="processor_overrun"}}'
    wait_until_sync(
        lambda: live.prom_has(f"sum({overrun} offset {STALL_WINDOW_SECONDS}s) > 0"),
        timeout=STALL_WINDOW_SECONDS + 45,
        what=f"{STALL_WINDOW_SECONDS} s of overruns in Prometheus",
        every=POLL_SECONDS,
    )
    seen.steady_at = time.time()
    seen.alerts = [
        a
        for a in prom.api("alerts")["alerts"]
        if a["labels"]["alertname"] == "AudiosocketsDropRatioHigh"
    ]
    # Chunks captured over the rule's window, minus a margin for the 2 s
    # backlog (a chunk's fate is decided within it).
    window = (seen.steady_at - 60, seen.steady_at - 5)
    seen.real_loss = {name: live.real_loss(r, *window) for name, r in live.recording.items()}
    seen.took_p95 = live.slow.took_p95(*window)
    state = _target("recorder.json", "Stream state")
    wait_until_sync(
        lambda: (
            {r["metric"]["stream"]: r["value"][1] for r in prom.query(state)}
            == {"mic-speech": "2", "mic-silent": "1"}
        ),
        timeout=30,
        what="Stream state to read SOUND for speech and SILENT for silence",
        every=POLL_SECONDS,
    )
    seen.state_at = time.time()

    # Fault 2: the relay hangs for longer than the recorders' spool.
    live.relay.freeze()
    try:
        wait_until_sync(
            lambda: not any(live.connected(r, "publisher") for r in live.recorders.values()),
            timeout=20,
            what="recorders to notice the relay hangs",
            every=POLL_SECONDS,
        )
        wait_until_sync(
            lambda: all(live.spool_full(s) > 0 for s in STREAMS),
            timeout=SPOOL_SECONDS + 20,
            what="both recorders' spools to overflow",
            every=POLL_SECONDS,
        )
        stream_live = _target("overview.json", "Stream live")
        wait_until_sync(
            lambda: [float(r["value"][1]) for r in prom.query(stream_live)] == [0.0, 0.0],
            timeout=STOPPED_AFTER + 20,
            what="Stream live to read STOPPED for both streams",
            every=POLL_SECONDS,
        )
        seen.down_at = time.time()
        seen.spool_full_while_down = {s: live.spool_full(s) for s in STREAMS}
    finally:
        live.relay.thaw()
    live.stall_file.unlink()
    wait_until_sync(
        live.everyone_connected,
        timeout=30,
        what="every client back on the relay",
        every=POLL_SECONDS,
    )

    # Fault 3's books: once every processor has caught up with live audio,
    # nothing is lost any more; each processor's gaps are final.
    wait_until_sync(
        live.caught_up, timeout=40, what="every processor to catch up", every=POLL_SECONDS
    )
    seen.settled_at = time.time()
    seen.counters = live.counters()
    seen.status = live.relay_status()
    seen.missed = {name: r.missed() for name, r in live.recording.items()}

    # Prometheus holds the final counters before the checks read them, from a
    # scrape of every target (a starved service can miss one).
    def all_scraped_since_settled() -> bool:
        fresh = prom.query(f"timestamp(up == 1) > {seen.settled_at}")
        return len(fresh) == len(live.stack.services)

    wait_until_sync(
        all_scraped_since_settled, timeout=30, what="every target scraped", every=POLL_SECONDS
    )
    # A scrape that reaches the relay in the instant it thaws can still carry
    # its state from before the hang (last chunk 10 s old): wait until
    # Prometheus holds a relay scrape with both streams live again.
    stream_live = _target("overview.json", "Stream live")
    wait_until_sync(
        lambda: [float(r["value"][1]) for r in prom.query(stream_live)] == [1.0, 1.0],
        timeout=30,
        what="Stream live to read LIVE for both streams again",
        every=POLL_SECONDS,
    )

    # Likewise for the recorders: their spool_full counters, as Prometheus holds
    # them, include everything lost while the relay was down.
    def spool_losses_scraped() -> bool:
        rows = panel_values(live, "overview.json", "Chunks lost since start", time.time())
        got = {
            r["metric"]["stream"]: float(r["value"][1])
            for r in rows
            if r["metric"].get("reason") == "spool_full" and not r["metric"].get("subscriber")
        }
        return all(got.get(s, -1.0) >= seen.spool_full_while_down[s] for s in STREAMS)

    wait_until_sync(
        spool_losses_scraped, timeout=30, what="the recorders' losses scraped", every=POLL_SECONDS
    )
    # The loss panels read recording rules, evaluated on their own 1 s clock:
    # a scrape that lands just before this point reaches them up to an
    # interval later (more when Prometheus runs late). When the recorders'
    # first scrape with spool losses is that late one (missed scrapes while
    # the relay hung, or losses that ended between two scrapes), "Lost at
    # source" had never been above zero at checked_at. Wait for an
    # evaluation after everything above was in Prometheus.
    scraped_at = time.time()
    wait_until_sync(
        lambda: prom.rules_evaluated_after(scraped_at),
        timeout=30,
        what="every rule group evaluated after the final scrapes",
        every=POLL_SECONDS,
    )
    seen.checked_at = time.time()
    write_summary(live)


def write_summary(live: Live) -> None:
    """What the faults produced, for a person to read next to the pictures."""
    seen = live.seen
    slow = live.slow.service.instance
    p95 = live.prometheus.query(
        f'instance_handler:audiosockets_processing_time_seconds:p95_rate1m{{instance="{slow}"}}',
        at=seen.steady_at,
    )
    summary = {
        "alerts": [
            {"labels": a["labels"], "value": a["value"], "state": a["state"]} for a in seen.alerts
        ],
        "real_loss": seen.real_loss,
        "handler_p95_seconds": {"prometheus": finite(p95), "measured": seen.took_p95},
        "missed": seen.missed,
        "books": {
            name: {stream: books(live, name, stream) for stream in STREAMS} for name in RECORDING
        },
    }
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUTPUT_DIR / "live-stack-summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def variables(live: Live, at: float) -> dict[str, str]:
    elapsed = math.ceil(at - live.prometheus.started_at) + 5
    return {"__rate_interval": RATE_INTERVAL, "__range": f"{elapsed}s"}


def _panel(dashboard: str, title: str) -> dict[str, Any]:
    (panel,) = [p for p in iter_panels(load_dashboards()[dashboard]) if p["title"] == title]
    return panel


def _target(dashboard: str, title: str, values: dict[str, str] | None = None) -> str:
    (target,) = _panel(dashboard, title)["targets"]
    return substitute(target["expr"], values or {"__rate_interval": RATE_INTERVAL})


def panel_values(live: Live, dashboard: str, title: str, at: float) -> list[dict[str, Any]]:
    """Every series every query of a panel returns at ``at``."""
    rows = []
    for target in _panel(dashboard, title)["targets"]:
        expr = substitute(target["expr"], variables(live, at))
        rows += live.prometheus.query(expr, at=at)
    return rows


# The NATS JetStream row stays empty on the relay binding; test_nats_stack.py fills it.
ALL_QUERIES = [
    query
    for dashboard in load_dashboards().values()
    for query in panel_queries(dashboard)
    if query.row != NATS_ROW
]


# --- 1. a stalled processor among five ---------------------------------------------


def test_drop_alert_names_the_stalled_processor_with_its_own_ratio(live: Live) -> None:
    seen = live.seen
    slow = live.slow.service.instance
    ratios = {
        a["labels"]["stream"]: float(a["value"])
        for a in seen.alerts
        if (a["labels"]["place"], a["labels"].get("instance"), a["labels"].get("handler"))
        == ("processor", slow, HANDLER_LABEL)
    }
    assert set(ratios) == set(STREAMS), seen.alerts
    # Four of five processors lose nothing: per stage it would read about a fifth.
    for stream, real in seen.real_loss["slow"].items():
        assert real > 0.5, "the stall should cost most of the audio"
        assert ratios[stream] == pytest.approx(real, rel=0.10), stream
    for alert in seen.alerts:
        if alert["labels"].get("instance") == slow:
            assert slow in alert["annotations"]["summary"]
    # The healthy recording processors are named only if they really lost
    # audio (a starved machine can make them); never for the stalled one's loss.
    by_instance = {r.service.instance: name for name, r in live.recording.items()}
    for alert in seen.alerts:
        name = by_instance.get(alert["labels"].get("instance", ""))
        if alert["labels"]["place"] == "processor" and name not in (None, "slow"):
            assert seen.real_loss[name][alert["labels"]["stream"]] > 0.005, alert
    for name, loss in seen.real_loss.items():
        for stream, real in loss.items():
            if name != "slow" and real > 0.02:
                instance = live.recording[name].service.instance
                assert any(a["labels"].get("instance") == instance for a in seen.alerts), (
                    name,
                    stream,
                    real,
                )


def test_a_50_ms_handler_reads_50_ms_at_p95(live: Live) -> None:
    slow = live.slow.service.instance
    p95 = live.prometheus.value(
        f'instance_handler:audiosockets_processing_time_seconds:p95_rate1m{{instance="{slow}"}}',
        at=live.seen.steady_at,
    )
    # What the handler took: 50 ms on an idle machine, more on a starved one.
    assert live.seen.took_p95 >= HANDLER_SECONDS
    assert p95 == pytest.approx(live.seen.took_p95, rel=0.20)
    # the panel that shows it draws the same series
    panel = panel_values(live, "processors.json", "Processing time p95", live.seen.steady_at)
    assert p95 in [float(r["value"][1]) for r in panel if r["metric"]["instance"] == slow]


# --- 2. the relay hangs ---------------------------------------------------------------

#: Panels that answer "is audio flowing?" and what each must read while the
#: relay hangs: "zero" (DOWN, 0, STOPPED), "down" (SPOOLING 0, or DOWN -1 for a
#: recorder too starved to be scraped) or "late" (>= STOPPED_AFTER s).
FLOWING_PANELS = {
    ("overview.json", "Stream live"): "zero",
    ("overview.json", "Relay"): "zero",
    ("overview.json", "Connected recorders"): "zero",
    ("overview.json", "Connected processors"): "zero",
    ("overview.json", "Streams"): "zero",
    ("overview.json", "Input rate"): "zero",
    ("overview.json", "Throughput (chunks)"): "zero",
    ("overview.json", "Throughput (bytes)"): "zero",
    ("overview.json", "Connected clients"): "zero",
    ("overview.json", "Relay queue depth"): "zero",
    ("recorder.json", "Stream state"): "zero",
    ("recorder.json", "Connected to relay"): "down",
    ("recorder.json", "Seconds since last sound"): "late",
}


@pytest.mark.parametrize(("dashboard", "title"), sorted(FLOWING_PANELS))
def test_with_the_relay_down_flowing_panels_read_down_not_empty(
    live: Live, dashboard: str, title: str
) -> None:
    rows = panel_values(live, dashboard, title, live.seen.down_at)
    values = [float(r["value"][1]) for r in rows]
    assert values, "the panel is empty: it would show No data, not a down state"
    assert all(math.isfinite(v) for v in values)
    expected = FLOWING_PANELS[(dashboard, title)]
    if expected == "zero":
        assert values == [0.0] * len(values)
    elif expected == "down":
        assert max(values) <= 0
    else:
        assert min(values) >= STOPPED_AFTER


def test_with_the_relay_down_streams_read_stopped_not_silent_and_levels_are_not_frozen(
    live: Live,
) -> None:
    at = live.seen.down_at
    state = {
        r["metric"]["stream"]: float(r["value"][1])
        for r in panel_values(live, "recorder.json", "Stream state", at)
    }
    assert state == {"mic-speech": 0.0, "mic-silent": 0.0}  # STOPPED
    assert panel_values(live, "recorder.json", "Level (RMS)", at) == []
    assert panel_values(live, "recorder.json", "Levels", at) == []
    # before the outage the same panel told sound from silence
    state = {
        r["metric"]["stream"]: float(r["value"][1])
        for r in panel_values(live, "recorder.json", "Stream state", live.seen.state_at)
    }
    assert state == {"mic-speech": 2.0, "mic-silent": 1.0}  # SOUND, SILENT


# --- 3. one count per lost chunk per place ---------------------------------------------


def books(live: Live, name: str, stream: str) -> dict[str, float]:
    """Where ``name``'s missing chunks of ``stream`` were counted lost, by place."""
    c = live.seen.counters
    recorder = f"recorder-{stream}"
    sources = ("spool_full", "input_overflow", "capture_queue_full", "closed_unsent")
    subscriber = live.recording[name].subscriber
    return {
        "source": sum(
            c[recorder].get(
                f'audiosockets_chunks_dropped_total{{reason="{r}",stream="{stream}"}}', 0
            )
            for r in sources
        ),
        "relay": sum(
            c["relay"].get(
                "audiosockets_subscriber_chunks_dropped_total"
                f'{{reason="{r}",stream="{stream}",subscriber="{subscriber}"}}',
                0,
            )
            for r in ("subscriber_slow", "replay_window_exceeded")
        ),
        "processor": c[name].get(
            f'audiosockets_chunks_dropped_total{{reason="processor_overrun",stream="{stream}"}}', 0
        ),
    }


@pytest.mark.parametrize("stream", STREAMS)
@pytest.mark.parametrize("name", RECORDING)
def test_lost_chunks_add_up_by_place_to_what_each_processor_missed(
    live: Live, name: str, stream: str
) -> None:
    by_place = books(live, name, stream)
    assert by_place["source"] > 0, "the outage outlasted the spool"
    counters = live.seen.counters
    seen_by = {k: v for k, v in counters[name].items() if stream in k and "bucket" not in k}
    at_relay = {
        k: v
        for k, v in counters["relay"].items()
        if stream in k and live.recording[name].subscriber in k
    }
    assert sum(by_place.values()) == live.seen.missed[name][stream], (by_place, seen_by, at_relay)


def test_chunk_count_panel_shows_the_counters_and_status_integers(live: Live) -> None:
    at = live.seen.checked_at
    rows = panel_values(live, "overview.json", "Chunks lost since start", at)
    shown: dict[tuple[str, str, str], float] = {}
    for r in rows:
        who = r["metric"].get("subscriber") or r["metric"]["instance"]
        shown[(who, r["metric"]["reason"], r["metric"]["stream"])] = float(r["value"][1])
    assert all(v == int(v) for v in shown.values()), "chunks are whole"
    for stream in STREAMS:
        recorder = live.recorders[stream].instance
        spool = shown[(recorder, "spool_full", stream)]
        assert spool >= live.seen.spool_full_while_down[stream]
        assert spool == books(live, "rec-1", stream)["source"]
    # the relay's part reconciles with `audiosockets status`
    relay_total: dict[str, float] = {}
    for (who, reason, _stream), value in shown.items():
        if who.startswith("process-"):
            relay_total[reason] = relay_total.get(reason, 0) + value
    assert relay_total == {k: v for k, v in live.seen.status["drops"].items() if v}


# --- every panel, the variables, the silence panel, pictures --------------------------


def test_every_panel_query_returns_data(live: Live) -> None:
    """At the end, or (for panels that only draw losses, which are over by
    then) at some point of the run."""
    prom = live.prometheus
    at = live.seen.checked_at
    values = variables(live, at)
    empty = {}
    # Whether the relay loses chunks for a subscriber in this scenario is a
    # race (did the subscribers resubscribe before or after the publishers
    # flushed their spools into the 2 s window?), so a panel drawing only the
    # relay's losses may rightly stay empty: then the relay's own status must
    # say it dropped nothing, and the series behind the panel must exist.
    assert len(ALL_QUERIES) >= 30
    for query in ALL_QUERIES:
        expr = substitute(query.expr, values)
        if finite(prom.query(expr, at=at)):
            continue
        rows = prom.query_range(expr, prom.started_at, at, 1)
        if any(math.isfinite(float(v)) for r in rows for _, v in r["values"]):
            continue
        relay_losses = "subscriber" in expr and expr.endswith(" > 0")
        relay_series = 'audiosockets_subscriber_chunks_dropped_total{job="relay"}'
        if relay_losses and finite(prom.query(relay_series, at=at)):
            # The per-subscriber loss series exist; their totals are reconciled
            # with the relay's status in test_chunk_count_panel_shows_the_counters...
            # (whether a 1 m ratio window catches a short burst of relay loss is
            # a race of this scenario; see the closing note of issue 17).
            continue
        empty[query.label()] = f"{expr}\n    why: {why_empty(prom, expr, at)}"
    assert empty == {}, "\n".join(f"{k}: {v}" for k, v in empty.items())


def why_empty(prom: Prometheus, expr: str, at: float) -> dict[str, Any]:
    """What an empty panel's recording rules did over the run: each rule's health,
    last error and evaluation time, the largest value its series ever held, and
    for how many seconds each target could not be scraped."""
    found: dict[str, Any] = {}
    for group in prom.api("rules")["groups"]:
        for rule in group["rules"]:
            name = rule["name"]
            if rule.get("type") != "recording" or name.split(":")[1:2] != expr.split(":")[1:2]:
                continue
            rows = prom.query_range(f"max({name})", prom.started_at, at, 1)
            peak = max((float(v) for r in rows for _, v in r["values"]), default=None)
            found[name] = {
                "health": rule.get("health"),
                "lastError": rule.get("lastError"),
                "evaluationTime": rule.get("evaluationTime"),
                "peak": peak,
            }
    # Scrapes that failed over the run, per target (a loss that happened while
    # its counter could not be scraped shows no rate).
    down = prom.query_range("up == 0", prom.started_at, at, 1)
    found["failed_scrape_seconds"] = {r["metric"]["instance"]: len(r["values"]) for r in down}
    return found


def test_every_template_variable_lists_the_streams_and_instances(live: Live) -> None:
    for name, dashboard in load_dashboards().items():
        for variable in dashboard["templating"]["list"]:
            query = variable["query"]["query"]
            selector, label = query.removeprefix("label_values(").removesuffix(")").rsplit(",", 1)
            found = set(
                live.prometheus.api(f"label/{label.strip()}/values", **{"match[]": selector})
            )
            if variable["name"] == "stream":
                assert found == set(STREAMS), (name, query)
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


def test_silence_panel_flags_exactly_the_silent_stream(live: Live) -> None:
    panel = _panel("recorder.json", "Seconds since last sound")
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    warn_at = min(s["value"] for s in steps if s["value"] is not None)
    at = live.seen.checked_at
    values = {
        r["metric"]["stream"]: float(r["value"][1])
        for r in panel_values(live, "recorder.json", "Seconds since last sound", at)
    }
    assert set(values) == set(STREAMS)
    assert {stream for stream, v in values.items() if v >= warn_at} == {"mic-silent"}


def test_overview_shows_the_outage(live: Live) -> None:
    prom = live.prometheus
    at = live.seen.checked_at
    peaks: dict[tuple[str, str], float] = {}
    for r in panel_values(live, "overview.json", "Reconnects", at):
        peaks[(r["metric"]["job"], r["metric"]["role"])] = float(r["value"][1])
    assert peaks[("recorder", "publisher")] >= 2  # both recorders reconnected
    assert peaks[("processor", "subscriber")] >= 5  # and all five processors
    rows = panel_values(live, "overview.json", "Stream live", at)
    assert {r["metric"]["stream"]: r["value"][1] for r in rows} == {s: "1" for s in STREAMS}
    assert prom.value('max(up{job="relay"})', at=at) == 1


def test_render_dashboards(live: Live) -> None:
    prom = live.prometheus
    now = time.time()
    for name, dashboard in load_dashboards().items():
        path = OUTPUT_DIR / f"dashboard-{name.removesuffix('.json')}.png"
        render_dashboard(prom, dashboard, prom.started_at, now, path, variables(live, now))
        assert path.stat().st_size > 20_000
