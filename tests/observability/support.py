"""Paths and helpers shared by the observability tests.

``require``/``require_binary`` come from ``tests/_support.py`` (skip on a
developer machine, fail under ``CI=true``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from _support import require, require_binary

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "grafana"
PROMETHEUS_DIR = GRAFANA / "prometheus"
DASHBOARDS_DIR = GRAFANA / "dashboards"
PROVISIONING_DIR = GRAFANA / "provisioning"
ARCHITECTURE = REPO / "services" / "ARCHITECTURE.md"
OUTPUT_DIR = REPO / "tests" / "_output"


def require_promtool() -> str:
    return require_binary("promtool")


def require_module(name: str, pip_name: str) -> None:
    require(
        importlib.util.find_spec(name) is not None,
        f"{pip_name} is not installed (pip install {pip_name})",
    )


__all__ = [
    "ARCHITECTURE",
    "DASHBOARDS_DIR",
    "GRAFANA",
    "OUTPUT_DIR",
    "PROMETHEUS_DIR",
    "PROVISIONING_DIR",
    "REPO",
    "require",
    "require_binary",
    "require_module",
    "require_promtool",
]
