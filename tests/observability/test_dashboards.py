"""Grafana provisioning and dashboards, checked without Grafana.

Each dashboard is decoded with Grafana Labs' typed dashboard model
(grafana-foundation-sdk) and checked for what Grafana would show wrong
(see ``dashboards.py``); each panel query must parse with Prometheus' own
parser (through promtool) and read only metric names fixed in
ARCHITECTURE.md or recorded by our rules.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from .dashboards import (
    check_dashboard,
    iter_panels,
    load_dashboards,
    panel_queries,
    provisioned_datasource_uids,
    substitute,
)
from .promql import architecture_metrics, parse_errors, recorded_metrics, unknown_metric_names
from .support import (
    DASHBOARDS_DIR,
    PROMETHEUS_DIR,
    PROVISIONING_DIR,
    require_module,
    require_promtool,
)

DASHBOARDS = load_dashboards()
EXPECTED = {"overview.json", "recorder.json", "processors.json"}


@pytest.fixture(autouse=True)
def _grafana_model() -> None:
    require_module("grafana_foundation_sdk", "grafana-foundation-sdk")


def test_the_three_dashboards_exist() -> None:
    assert set(DASHBOARDS) == EXPECTED


def test_datasource_is_provisioned_with_a_fixed_uid() -> None:
    assert provisioned_datasource_uids() == {"audiosockets-prometheus"}


def test_dashboard_provider_loads_the_dashboards_folder() -> None:
    document = yaml.safe_load((PROVISIONING_DIR / "dashboards" / "audiosockets.yml").read_text())
    (provider,) = document["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/audiosockets"


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_matches_grafanas_model(name: str) -> None:
    assert check_dashboard(DASHBOARDS[name], provisioned_datasource_uids()) == []


def test_dashboard_uids_are_unique() -> None:
    uids = [d["uid"] for d in DASHBOARDS.values()]
    assert len(uids) == len(set(uids))


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_has_stream_and_instance_variables(name: str) -> None:
    variables = {v["name"]: v for v in DASHBOARDS[name]["templating"]["list"]}
    assert {"stream", "instance"} <= set(variables)
    for variable in variables.values():
        # Queries use =~ "$var": "All" must be a regex that matches everything.
        assert variable["includeAll"]
        assert variable["allValue"] == ".*"
    used = " ".join(q.expr for q in panel_queries(DASHBOARDS[name]))
    assert "$stream" in used
    assert "$instance" in used


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_fits_one_screen(name: str) -> None:
    # What shows on opening: a collapsed row's panels only appear once it is opened.
    shown = DASHBOARDS[name]["panels"]
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in shown)
    assert bottom <= 32, "about 32 grid rows fit a 1080p screen"
    for row in (p for p in shown if p["type"] == "row" and p.get("panels")):
        assert row["collapsed"], f"row {row['title']!r} holds panels but is open"
    assert all(p["gridPos"]["w"] >= 4 for p in iter_panels(DASHBOARDS[name])), "too narrow to read"


def test_queries_use_only_documented_metric_names() -> None:
    known = architecture_metrics() | recorded_metrics()
    unknown = {
        q.label(): unknown_metric_names(q.expr, known)
        for dashboard in DASHBOARDS.values()
        for q in panel_queries(dashboard)
    }
    assert {k: v for k, v in unknown.items() if v} == {}


@pytest.mark.prometheus
def test_every_panel_query_parses() -> None:
    promtool = require_promtool()
    exprs = {
        q.label(): substitute(q.expr, {})
        for dashboard in DASHBOARDS.values()
        for q in panel_queries(dashboard)
    }
    assert len(exprs) >= 30
    assert parse_errors(promtool, exprs) == {}


@pytest.mark.prometheus
def test_parse_check_reports_a_broken_query() -> None:
    errors = parse_errors(require_promtool(), {"ok": "up", "broken": "sum(rate(up[1m])"})
    assert set(errors) == {"broken"}
    assert "unclosed left parenthesis" in errors["broken"]


# --- the checker must be able to fail ------------------------------------------------


def _overview() -> dict[str, Any]:
    return copy.deepcopy(DASHBOARDS["overview.json"])


def _break_unknown_key(d: dict[str, Any]) -> None:
    d["panels"][5]["fieldConfig"]["defaults"]["custom"]["lineWidht"] = 2


def _break_target_key(d: dict[str, Any]) -> None:
    d["panels"][5]["targets"][0]["legend"] = "{{stream}}"


def _break_duplicate_id(d: dict[str, Any]) -> None:
    d["panels"][3]["id"] = d["panels"][2]["id"]


def _break_overlap(d: dict[str, Any]) -> None:
    d["panels"][1]["gridPos"]["x"] = 4


def _break_grid(d: dict[str, Any]) -> None:
    d["panels"][4]["gridPos"]["w"] = 6  # x=20: ends at column 26


def _break_unit(d: dict[str, Any]) -> None:
    d["panels"][5]["fieldConfig"]["defaults"]["unit"] = "chunks/s"


def _break_missing_unit(d: dict[str, Any]) -> None:
    del d["panels"][5]["fieldConfig"]["defaults"]["unit"]


def _break_datasource(d: dict[str, Any]) -> None:
    d["panels"][6]["targets"][0]["datasource"] = {"type": "prometheus", "uid": "prometheus"}


def _break_datasource_by_name(d: dict[str, Any]) -> None:
    d["panels"][6]["datasource"] = "Prometheus"


def _break_variable(d: dict[str, Any]) -> None:
    d["panels"][6]["targets"][0]["expr"] += ' or up{job="$job"}'


def _break_schema_version(d: dict[str, Any]) -> None:
    d["schemaVersion"] = 16


def _break_panel_type(d: dict[str, Any]) -> None:
    d["panels"][5]["type"] = "graph2"


def _break_thresholds(d: dict[str, Any]) -> None:
    d["panels"][0]["fieldConfig"]["defaults"]["thresholds"]["steps"].reverse()


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (_break_unknown_key, "lineWidht: not in Grafana's dashboard model"),
        (_break_target_key, "legend: not in Grafana's dashboard model"),
        (_break_duplicate_id, "id also used by"),
        (_break_overlap, "overlaps"),
        (_break_grid, "outside the 24-column grid"),
        (_break_unit, "'chunks/s' is not one of Grafana's units"),
        (_break_missing_unit, "no unit set"),
        (_break_datasource, "'prometheus' is not provisioned"),
        (_break_datasource_by_name, "must be referenced by uid"),
        (_break_variable, "$job is not a dashboard variable"),
        (_break_schema_version, "schemaVersion 16"),
        (_break_panel_type, "unknown panel type 'graph2'"),
        (_break_thresholds, "first threshold step must have value null"),
    ],
)
def test_checker_reports(breakage: Any, expected: str) -> None:
    dashboard = _overview()
    breakage(dashboard)
    problems = check_dashboard(dashboard, provisioned_datasource_uids())
    assert any(expected in p for p in problems), problems


def test_dashboards_dir_holds_only_dashboards() -> None:
    assert {p.name for p in DASHBOARDS_DIR.iterdir()} == EXPECTED


@pytest.mark.parametrize(
    ("alert", "dashboard", "panel"),
    [
        ("AudiosocketsStreamSilent", "recorder.json", "Seconds since last sound"),
        ("AudiosocketsDropRatioHigh", "overview.json", "Lost at source"),
        ("AudiosocketsDropRatioHigh", "overview.json", "Lost in delivery"),
        ("AudiosocketsDropRatioHigh", "processors.json", "Lost in processor"),
        ("AudiosocketsLatencyP99High", "overview.json", "End-to-end latency"),
        ("AudiosocketsJetStreamLagGrowing", "processors.json", "JetStream consumer lag"),
    ],
)
def test_panel_turns_red_where_the_alert_fires(alert: str, dashboard: str, panel: str) -> None:
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules" / "alerts.yml").read_text(encoding="utf-8"))
    (expr,) = [r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("alert") == alert]
    threshold = float(expr.strip().rsplit(">", 1)[1])
    (found,) = [p for p in iter_panels(DASHBOARDS[dashboard]) if p["title"] == panel]
    steps = found["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps if s["color"] == "red"] == [threshold]
