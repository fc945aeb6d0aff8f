"""Prometheus configuration and rules: promtool checks and unit tests.

The unit tests in grafana/prometheus/tests/ prove each alert fires on a series
that should trigger it and stays quiet on a neighbour that should not; the
tests here also prove those unit tests can fail (an alert that never fires is
caught) and that no alert is left without one.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .promql import architecture_metrics, recorded_metrics, rule_expressions, unknown_metric_names
from .support import PROMETHEUS_DIR, REPO, require_promtool

pytestmark = pytest.mark.prometheus

RULES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
UNIT_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_promtool(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def alert_names() -> set[str]:
    names: set[str] = set()
    for path in RULES:
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            names.update(rule["alert"] for rule in group["rules"] if "alert" in rule)
    return names


def test_config_is_valid() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    # The rule files the config loads are the ones in the repository.
    assert f"{len(RULES)} rule files found" in result.stdout


def test_config_discovers_replicas_through_docker_dns() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for job, port in (("relay", 9400), ("recorder", 9401), ("processor", 9402)):
        sd = jobs[job]["dns_sd_configs"]
        assert sd, job
        assert all(entry["type"] == "A" and entry["port"] == port for entry in sd), job
        assert "static_configs" not in jobs[job], f"{job} must not be a fixed list"


def test_rules_are_valid() -> None:
    result = promtool("check", "rules", *map(str, RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_use_only_documented_metric_names() -> None:
    known = architecture_metrics() | recorded_metrics()
    unknown = {key: unknown_metric_names(expr, known) for key, expr in rule_expressions().items()}
    assert {k: v for k, v in unknown.items() if v} == {}


def test_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", *map(str, UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in UNIT_TESTS:
        for case in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alert_names() <= firing, "alerts never shown to fire"
    assert alert_names() <= quiet, "alerts never shown to stay quiet"


@pytest.mark.parametrize("alert", sorted(alert_names()))
def test_unit_tests_catch_an_alert_that_never_fires(alert: str, tmp_path: Path) -> None:
    """Replace one alert's expression by one that is never true: promtool must fail."""
    require_promtool()
    shutil.copytree(PROMETHEUS_DIR, tmp_path / "prometheus")
    for path in (tmp_path / "prometheus" / "rules").glob("*.yml"):
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        for group in document["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == alert:
                    rule["expr"] = "vector(1) == 0"
        path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    tests = sorted(str(p) for p in (tmp_path / "prometheus" / "tests").glob("*.yml"))
    result = promtool("test", "rules", *tests, cwd=tmp_path / "prometheus")
    assert result.returncode != 0
    assert f"alertname: {alert}" in result.stdout + result.stderr


def test_config_scrapes_every_compose_service_that_serves_metrics() -> None:
    """DNS names are compose service names or aliases, on the services' metrics ports."""
    compose = yaml.safe_load((REPO / "compose.yaml").read_text(encoding="utf-8"))
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    scraped = {
        dns_name: entry["port"]
        for job in config["scrape_configs"]
        for entry in job.get("dns_sd_configs", [])
        for dns_name in entry["names"]
    }
    reachable: dict[str, int] = {}
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        ports = {int(v) for k, v in env.items() if k.endswith("_METRICS_PORT")}
        if not ports:
            continue
        (port,) = ports
        network = (service.get("networks") or {}).get("default") or {}
        names = [name, *network.get("aliases", [])]
        assert any(scraped.get(n) == port for n in names), f"{name} is not scraped"
        reachable.update(dict.fromkeys(names, port))
    assert {n: p for n, p in scraped.items() if reachable.get(n) != p} == {}
