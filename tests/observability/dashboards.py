"""Reading the Grafana dashboards and checking them against Grafana's model.

Grafana itself cannot run here, so a dashboard is checked in two layers:

1. Grafana Labs' own typed model of the dashboard JSON
   (``grafana-foundation-sdk``, generated from Grafana's schema): the file is
   decoded into the model and encoded again, and every key of the file must
   survive the round trip. A key the model does not know (a typo such as
   ``"fieldconfig"``, an option of another panel type) is lost on the way and
   reported. Panel types, units and enum values are checked against the same
   package's lists.
2. The rules Grafana only enforces when a person looks at the screen: unique
   panel ids, panels inside the 24-column grid and not overlapping, every
   datasource reference resolving to the provisioned datasource, every
   ``$variable`` in a query defined by the dashboard.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .support import DASHBOARDS_DIR, PROVISIONING_DIR

#: Grafana's grid is 24 columns wide.
GRID_COLUMNS = 24
#: Oldest schema version we accept; Grafana migrates older ones on load and
#: the file would then differ from what users see after saving.
MIN_SCHEMA_VERSION = 36

#: Variables Grafana defines itself.
BUILTIN_VARIABLES = frozenset(
    {
        "__rate_interval",
        "__interval",
        "__interval_ms",
        "__range",
        "__range_s",
        "__range_ms",
        "__from",
        "__to",
        "__all",
        "__dashboard",
        "__org",
        "__user",
        "timeFilter",
        "__timeFilter",
    }
)

#: The annotation that every Grafana dashboard carries points at Grafana's
#: built-in datasource, not at ours.
GRAFANA_BUILTIN_DATASOURCE = "-- Grafana --"

_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)(?::\w+)?\]\]")

#: What the Prometheus HTTP API and promtool get in place of Grafana's
#: variables: "All" for the template variables, fixed windows for the rest.
DEFAULT_SUBSTITUTIONS: dict[str, str] = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "10m",
}


@dataclass(frozen=True, slots=True)
class PanelQuery:
    dashboard: str
    panel_id: int
    panel: str
    ref_id: str
    expr: str
    legend: str
    row: str = ""  # the title of the collapsed row holding the panel ("": none)

    def label(self) -> str:
        return f"{self.dashboard} / {self.panel} [{self.ref_id}]"


def load_dashboards(directory: Path = DASHBOARDS_DIR) -> dict[str, dict[str, Any]]:
    """All dashboards in ``directory`` by file name."""
    return {
        path.name: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(directory.glob("*.json"))
    }


def provisioned_datasource_uids(directory: Path = PROVISIONING_DIR / "datasources") -> set[str]:
    uids: set[str] = set()
    for path in sorted(directory.glob("*.y*ml")):
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for source in document.get("datasources", []):
            uids.add(str(source["uid"]))
    return uids


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


#: The collapsed row of panels that only a site on NATS JetStream fills.
NATS_ROW = "NATS JetStream"


def _panels_with_rows(dashboard: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in dashboard.get("panels", []):
        yield "", panel
        for inner in panel.get("panels", []):
            yield str(panel.get("title", "?")), inner


def panel_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    return [
        PanelQuery(
            dashboard=str(dashboard.get("title", "?")),
            panel_id=int(panel.get("id", -1)),
            panel=str(panel.get("title", "?")),
            ref_id=str(target.get("refId", "?")),
            expr=str(target.get("expr", "")),
            legend=str(target.get("legendFormat", "")),
            row=row,
        )
        for row, panel in _panels_with_rows(dashboard)
        for target in panel.get("targets", [])
        if not target.get("hide", False)
    ]


def referenced_variables(text: str) -> set[str]:
    return {next(g for g in match.groups() if g) for match in _VARIABLE.finditer(text)}


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana variables the way Grafana would for the given values.

    Template variables not in ``values`` become ``.*`` (the dashboards'
    ``allValue``): every variable here is used with ``=~``.
    """

    def replace(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        return values.get(name, DEFAULT_SUBSTITUTIONS.get(name, ".*"))

    return _VARIABLE.sub(replace, expr)


# --------------------------------------------------------------- the checker


def _sdk() -> Any:
    """Import the model lazily so a missing package is one clear test failure."""
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.cog.runtime import Runtime

    plugins.register_default_plugins()
    return Runtime()


def _lost_keys(original: Any, roundtrip: Any, path: str) -> Iterator[str]:
    if isinstance(original, dict):
        if not isinstance(roundtrip, dict):
            yield f"{path}: became {type(roundtrip).__name__}"
            return
        for key, value in original.items():
            if key not in roundtrip:
                yield f"{path}.{key}: not in Grafana's dashboard model"
            else:
                yield from _lost_keys(value, roundtrip[key], f"{path}.{key}")
    elif isinstance(original, list):
        if not isinstance(roundtrip, list) or len(roundtrip) != len(original):
            yield f"{path}: list changed on the round trip"
            return
        for index, (a, b) in enumerate(zip(original, roundtrip, strict=True)):
            yield from _lost_keys(a, b, f"{path}[{index}]")


def model_roundtrip_problems(dashboard: dict[str, Any]) -> list[str]:
    """Keys of ``dashboard`` that Grafana's typed model does not carry."""
    _sdk()
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    try:
        model = Dashboard.from_json(dashboard)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return [f"does not decode as a Grafana dashboard: {exc!r}"]
    roundtrip = json.loads(json.dumps(model, cls=JSONEncoder))
    return list(_lost_keys(dashboard, roundtrip, "$"))


def grafana_units() -> frozenset[str]:
    from grafana_foundation_sdk.models import units

    return frozenset(
        value
        for name, value in vars(units).items()
        if not name.startswith("_") and isinstance(value, str)
    )


def _enum_values(enum_type: type[enum.Enum]) -> frozenset[object]:
    return frozenset(member.value for member in enum_type)


def check_dashboard(dashboard: dict[str, Any], datasource_uids: set[str]) -> list[str]:
    """Every problem found in one dashboard, as readable lines (empty if none)."""
    runtime = _sdk()
    from grafana_foundation_sdk.models import dashboard as model

    problems = model_roundtrip_problems(dashboard)
    units = grafana_units()

    version = dashboard.get("schemaVersion")
    newest = model.Dashboard().schema_version
    if not isinstance(version, int) or not MIN_SCHEMA_VERSION <= version <= newest:
        problems.append(
            f"schemaVersion {version!r} outside [{MIN_SCHEMA_VERSION}, {newest}] (model's newest)"
        )
    for key in ("uid", "title"):
        if not dashboard.get(key):
            problems.append(f"dashboard has no {key}")
    if len(str(dashboard.get("uid", ""))) > 40:
        problems.append("dashboard uid longer than 40 characters")

    variables = dashboard.get("templating", {}).get("list", [])
    defined = {str(v.get("name")) for v in variables}
    variable_types = _enum_values(model.VariableType)
    for variable in variables:
        if variable.get("type") not in variable_types:
            problems.append(
                f"variable {variable.get('name')!r}: unknown type {variable.get('type')!r}"
            )
        problems += _datasource_problems(
            f"variable {variable.get('name')!r}", variable, datasource_uids
        )

    for annotation in dashboard.get("annotations", {}).get("list", []):
        uid = annotation.get("datasource", {}).get("uid")
        if uid != GRAFANA_BUILTIN_DATASOURCE and uid not in datasource_uids:
            problems.append(
                f"annotation {annotation.get('name')!r}: unknown datasource uid {uid!r}"
            )

    ids: dict[int, str] = {}
    cells: dict[tuple[int, int], str] = {}
    for panel in iter_panels(dashboard):
        title = str(panel.get("title", "?"))
        where = f"panel {panel.get('id')!r} {title!r}"
        panel_id = panel.get("id")
        if not isinstance(panel_id, int):
            problems.append(f"{where}: id is not an integer")
        elif panel_id in ids:
            problems.append(f"{where}: id also used by {ids[panel_id]!r}")
        else:
            ids[panel_id] = title
        if runtime.panelcfg_config(str(panel.get("type"))) is None and panel.get("type") != "row":
            problems.append(f"{where}: unknown panel type {panel.get('type')!r}")
        problems += _grid_problems(where, panel, cells)
        problems += _datasource_problems(where, panel, datasource_uids)
        problems += _field_config_problems(where, panel, units)

        ref_ids = [t.get("refId") for t in panel.get("targets", [])]
        if len(ref_ids) != len(set(ref_ids)):
            problems.append(f"{where}: duplicate refId in {ref_ids}")
        if panel.get("type") != "row" and not panel.get("targets"):
            problems.append(f"{where}: no query")
        for target in panel.get("targets", []):
            problems += _datasource_problems(
                f"{where} [{target.get('refId')}]", target, datasource_uids
            )
            expr = str(target.get("expr", ""))
            if not expr.strip():
                problems.append(f"{where} [{target.get('refId')}]: empty expr")
            for name in sorted(referenced_variables(expr) - defined - BUILTIN_VARIABLES):
                problems.append(
                    f"{where} [{target.get('refId')}]: ${name} is not a dashboard variable"
                )
    return problems


def _grid_problems(
    where: str, panel: dict[str, Any], cells: dict[tuple[int, int], str]
) -> list[str]:
    grid = panel.get("gridPos")
    if not isinstance(grid, dict) or not all(isinstance(grid.get(k), int) for k in "xywh"):
        return [f"{where}: gridPos needs integer x, y, w, h"]
    x, y, w, h = grid["x"], grid["y"], grid["w"], grid["h"]
    if x < 0 or y < 0 or w < 1 or h < 1 or x + w > GRID_COLUMNS:
        return [f"{where}: gridPos {grid} outside the {GRID_COLUMNS}-column grid"]
    problems = []
    for cx in range(x, x + w):
        for cy in range(y, y + h):
            other = cells.setdefault((cx, cy), where)
            if other != where:
                problems.append(f"{where}: overlaps {other}")
                return problems
    return problems


def _datasource_problems(where: str, item: dict[str, Any], uids: set[str]) -> list[str]:
    source = item.get("datasource")
    if source is None:
        return [] if item.get("type") == "row" else [f"{where}: no datasource"]
    if not isinstance(source, dict) or "uid" not in source:
        return [f"{where}: datasource must be referenced by uid, got {source!r}"]
    if source["uid"] not in uids:
        return [f"{where}: datasource uid {source['uid']!r} is not provisioned ({sorted(uids)})"]
    return []


def _field_config_problems(where: str, panel: dict[str, Any], units: frozenset[str]) -> list[str]:
    from grafana_foundation_sdk.models import dashboard as model

    problems: list[str] = []
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    if panel.get("type") != "row":
        unit = defaults.get("unit")
        if unit is None:
            problems.append(f"{where}: no unit set")
        elif unit not in units:
            problems.append(f"{where}: unit {unit!r} is not one of Grafana's units")
    color_mode = defaults.get("color", {}).get("mode")
    if color_mode is not None and color_mode not in _enum_values(model.FieldColorModeId):
        problems.append(f"{where}: unknown color mode {color_mode!r}")
    thresholds = defaults.get("thresholds")
    if thresholds is not None:
        if thresholds.get("mode") not in _enum_values(model.ThresholdsMode):
            problems.append(f"{where}: unknown thresholds mode {thresholds.get('mode')!r}")
        steps = thresholds.get("steps", [])
        if not steps or steps[0].get("value") is not None:
            problems.append(f"{where}: the first threshold step must have value null (the base)")
        values = [s.get("value") for s in steps[1:]]
        if any(not isinstance(v, int | float) for v in values) or values != sorted(values):
            problems.append(f"{where}: threshold steps must be numbers in ascending order")
    for mapping in defaults.get("mappings", []):
        if mapping.get("type") not in _enum_values(model.MappingType):
            problems.append(f"{where}: unknown value mapping type {mapping.get('type')!r}")
    return problems
