"""Draw a dashboard's panels from Prometheus data with matplotlib.

Not Grafana, but the same layout (gridPos), the same queries, units,
thresholds and value mappings, so a person can look at what a user would see.
Supports the panel types our dashboards use: timeseries, stat, bargauge.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .dashboards import substitute
from .stack import Prometheus

GRAFANA_COLORS = {
    "green": "#73BF69",
    "red": "#F2495C",
    "orange": "#FF9830",
    "blue": "#5794F2",
    "yellow": "#FADE2A",
    "purple": "#B877D9",
}
BACKGROUND = "#111217"
PANEL = "#181B1F"
TEXT = "#CCCCDC"
GRID_ROW_INCHES = 0.36
WIDTH_INCHES = 20.0


def legend(fmt: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)
    return " ".join(text.split()) or ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def format_value(value: float, unit: str, decimals: int | None = None) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "-inf" if value < 0 else "inf"
    if unit == "percentunit":
        return f"{value * 100:.{2 if decimals is None else decimals}f}%"
    if unit == "s":
        if value != 0 and abs(value) < 1:
            return f"{value * 1000:.1f} ms"
        return f"{value:.{1 if decimals is None else decimals}f} s"
    suffix = {"cps": "/s", "Bps": " B/s", "dB": " dB", "hertz": " Hz", "bytes": " B"}.get(unit, "")
    if decimals is None:
        decimals = 0 if float(value).is_integer() else 2
    return f"{value:.{decimals}f}{suffix}"


def threshold_color(value: float, thresholds: dict[str, Any]) -> str:
    color = "green"
    for step in thresholds.get("steps", []):
        if step["value"] is None or (not math.isnan(value) and value >= step["value"]):
            color = step["color"]
    return GRAFANA_COLORS.get(color, color)


def mapped(value: float, mappings: list[dict[str, Any]]) -> tuple[str, str] | None:
    for mapping in mappings:
        if mapping.get("type") != "value":
            continue
        for raw, result in mapping["options"].items():
            if not math.isnan(value) and float(raw) == value:
                return result["text"], GRAFANA_COLORS.get(result["color"], result["color"])
    return None


def _style(ax: Any, title: str) -> None:
    ax.set_facecolor(PANEL)
    ax.set_title(title, color=TEXT, fontsize=9, loc="left")
    for spine in ax.spines.values():
        spine.set_color("#2c3235")
    ax.tick_params(colors=TEXT, labelsize=7)


def _timeseries(ax: Any, panel: dict[str, Any], query: Callable[[str], Any], start: float) -> None:
    defaults = panel["fieldConfig"]["defaults"]
    unit = defaults.get("unit", "")
    for target in panel["targets"]:
        for series in query(target["expr"]):
            xs = [float(t) - start for t, _ in series["values"]]
            ys = [float(v) for _, v in series["values"]]
            ax.plot(xs, ys, linewidth=1.2, label=legend(target["legendFormat"], series["metric"]))
    if "min" in defaults:
        ax.set_ylim(bottom=defaults["min"])
    if "max" in defaults:
        ax.set_ylim(top=defaults["max"])
    ax.yaxis.set_major_formatter(lambda v, _pos: format_value(v, unit))
    ax.set_xlabel("seconds since the stack started", color=TEXT, fontsize=7)
    ax.grid(color="#2c3235", linewidth=0.5)
    for step in defaults.get("thresholds", {}).get("steps", [])[1:]:
        if panel["fieldConfig"]["defaults"].get("custom", {}).get("thresholdsStyle"):
            ax.axhline(step["value"], color=GRAFANA_COLORS.get(step["color"]), ls="--", lw=0.8)
    if ax.get_lines():
        ax.legend(fontsize=6, loc="upper left", facecolor=PANEL, labelcolor=TEXT, framealpha=0.8)
    else:
        ax.text(0.5, 0.5, "No data", color=TEXT, ha="center", va="center", transform=ax.transAxes)


def _stat(ax: Any, panel: dict[str, Any], values: list[tuple[str, float]]) -> None:
    defaults = panel["fieldConfig"]["defaults"]
    ax.set_xticks([])
    ax.set_yticks([])
    if not values:
        ax.text(
            0.5,
            0.45,
            defaults.get("noValue", "No data"),
            color=TEXT,
            ha="center",
            va="center",
            fontsize=12,
            transform=ax.transAxes,
        )
        return
    width = 1.0 / len(values)
    for index, (name, value) in enumerate(values):
        hit = mapped(value, defaults.get("mappings", []))
        text, color = hit or (
            format_value(value, defaults.get("unit", ""), defaults.get("decimals")),
            threshold_color(value, defaults.get("thresholds", {})),
        )
        x0 = index * width
        if panel["options"].get("colorMode") == "background":
            ax.add_patch(_rect(x0 + 0.01, 0.05, width - 0.02, 0.8, color, ax))
            fg = "white"
        else:
            fg = color
        ax.text(
            x0 + width / 2,
            0.5,
            text,
            color=fg,
            ha="center",
            va="center",
            fontsize=13,
            weight="bold",
            transform=ax.transAxes,
        )
        ax.text(
            x0 + width / 2,
            0.2,
            name,
            color=fg,
            ha="center",
            va="center",
            fontsize=7,
            transform=ax.transAxes,
        )


def _rect(x: float, y: float, w: float, h: float, color: str, ax: Any) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, color=color, transform=ax.transAxes)


def _bargauge(ax: Any, panel: dict[str, Any], values: list[tuple[str, float]]) -> None:
    defaults = panel["fieldConfig"]["defaults"]
    unit = defaults.get("unit", "")
    if not values:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(
            0.5,
            0.5,
            defaults.get("noValue", "No data"),
            color=TEXT,
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        return
    low = defaults.get("min", 0.0)
    shown = [max(v, low) if math.isfinite(v) else low for _, v in values]
    colors = [threshold_color(v, defaults.get("thresholds", {})) for _, v in values]
    positions = list(range(len(values)))
    ax.barh(positions, [v - low for v in shown], left=low, color=colors, height=0.5)
    high = defaults.get("max", max([*shown, low + 1]) * 1.15)
    ax.set_xlim(low, high)
    ax.set_ylim(len(values) - 0.5, -0.8)
    ax.set_yticks([])
    for y, (name, v) in enumerate(values):
        ax.text(low, y - 0.4, name, color=TEXT, va="bottom", fontsize=7)
        ax.text(
            high, y, format_value(v, unit) + " ", color=TEXT, va="center", ha="right", fontsize=8
        )


def render_dashboard(
    prometheus: Prometheus,
    dashboard: dict[str, Any],
    start: float,
    end: float,
    path: Path,
    variables: dict[str, str],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # What Grafana shows on opening: a collapsed row is its title bar alone.
    panels = list(dashboard["panels"])
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    height = rows * GRID_ROW_INCHES + 0.6
    fig = plt.figure(figsize=(WIDTH_INCHES, height), facecolor=BACKGROUND)
    fig.suptitle(dashboard["title"], color=TEXT, x=0.01, ha="left", fontsize=12)
    top = 1 - 0.5 / height
    step = max(1.0, (end - start) / 200)

    def query_range(expr: str) -> Any:
        return prometheus.query_range(substitute(expr, variables), start, end, step)

    for panel in panels:
        grid = panel["gridPos"]
        pad_x, pad_y = 0.035, 0.6 / height
        left = grid["x"] / 24 + pad_x * (0.9 if panel["type"] == "timeseries" else 0.2)
        width = grid["w"] / 24 - pad_x * (1.1 if panel["type"] == "timeseries" else 0.4)
        bottom = top * (1 - (grid["y"] + grid["h"]) / rows) + pad_y
        ax_height = top * grid["h"] / rows - pad_y * 1.6
        if panel["type"] == "row":  # one grid row: a title bar, no axes
            fig.text(left, bottom + ax_height / 2, f"> {panel['title']}", color=TEXT, fontsize=10)
            continue
        ax = fig.add_axes((left, bottom, width, ax_height))
        _style(ax, panel["title"])
        if panel["type"] == "timeseries":
            _timeseries(ax, panel, query_range, start)
            continue
        values: list[tuple[str, float]] = []
        for target in panel["targets"]:
            for series in prometheus.query(substitute(target["expr"], variables), at=end):
                values.append(
                    (legend(target["legendFormat"], series["metric"]), float(series["value"][1]))
                )
        values.sort()
        (_stat if panel["type"] == "stat" else _bargauge)(ax, panel, values)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, facecolor=BACKGROUND)
    plt.close(fig)
