"""PromQL helpers: which metric names a query uses, and parsing with promtool.

promtool 2.42 (Debian bookworm) has no ``promql`` sub-command, but
``promtool check rules`` parses every rule's expression with Prometheus' own
parser. So each query to check becomes a recording rule in a throw-away rules
file; one promtool run checks them all.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

import yaml

from .support import ARCHITECTURE, PROMETHEUS_DIR

#: Series Prometheus itself adds to every target.
PROMETHEUS_BUILTINS = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

_NAME_REGEX_MATCHER = re.compile(r'__name__\s*=~\s*"([^"]*)"')
_OUR_NAME = re.compile(r"\baudiosockets_\w+")
_RECORDED_NAME = re.compile(r"\b[a-z_]+:[a-z_]+:[a-z0-9_]+\b")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def architecture_metrics(path: Path = ARCHITECTURE) -> frozenset[str]:
    """The metric names ARCHITECTURE.md fixes for all services."""
    text = path.read_text(encoding="utf-8")
    section = text.split("## Metric names", 1)[1].split("\n## ", 1)[0]
    return frozenset(_OUR_NAME.findall(section))


def recorded_metrics(rules_dir: Path = PROMETHEUS_DIR / "rules") -> frozenset[str]:
    names: set[str] = set()
    for path in sorted(rules_dir.glob("*.yml")):
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            names.update(rule["record"] for rule in group["rules"] if "record" in rule)
    return frozenset(names)


def rule_expressions(rules_dir: Path = PROMETHEUS_DIR / "rules") -> dict[str, str]:
    """Every rule's expression, keyed by its record or alert name."""
    exprs: dict[str, str] = {}
    for path in sorted(rules_dir.glob("*.yml")):
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for index, rule in enumerate(group["rules"]):
                key = rule.get("alert") or f"{rule['record']}#{index}"
                exprs[key] = rule["expr"]
    return exprs


def _expand_alternation(pattern: str) -> list[str]:
    """``a_(b|c)_d`` -> ``[a_b_d, a_c_d]`` (one group, as our rules write it)."""
    match = re.search(r"\(([^()]*)\)", pattern)
    if match is None:
        return [pattern]
    return [
        pattern[: match.start()] + alt + pattern[match.end() :] for alt in match.group(1).split("|")
    ]


def metric_names_in(expr: str) -> set[str]:
    """Metric names an expression reads: ours, recorded ones and Prometheus' own."""
    names: set[str] = set()
    for pattern in _NAME_REGEX_MATCHER.findall(expr):
        names.update(_expand_alternation(pattern))
    stripped = _NAME_REGEX_MATCHER.sub("", expr)
    # Label values are quoted; metric names never are.
    unquoted = re.sub(r'"[^"]*"', '""', stripped)
    names.update(_RECORDED_NAME.findall(unquoted))
    unquoted = _RECORDED_NAME.sub(" ", unquoted)
    names.update(_OUR_NAME.findall(unquoted))
    names.update(n for n in PROMETHEUS_BUILTINS if re.search(rf"\b{n}\b(?!\s*\()", unquoted))
    return names


def unknown_metric_names(expr: str, known: Iterable[str]) -> set[str]:
    known_set = set(known)
    unknown = set()
    for name in metric_names_in(expr):
        base = name
        for suffix in _HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] in known_set:
                base = name[: -len(suffix)]
        if base not in known_set and base not in PROMETHEUS_BUILTINS:
            unknown.add(name)
    return unknown


def parse_errors(promtool: str, exprs: dict[str, str]) -> dict[str, str]:
    """promtool's parse error per expression (absent key: it parsed)."""
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="promql-") as tmp:
        files: dict[str, str] = {}
        for index, (key, expr) in enumerate(exprs.items()):
            path = Path(tmp) / f"q{index}.yml"
            rule = {"groups": [{"name": "q", "rules": [{"record": "q:check:expr", "expr": expr}]}]}
            path.write_text(yaml.safe_dump(rule), encoding="utf-8")
            files[str(path)] = key
        result = subprocess.run(
            [promtool, "check", "rules", *files],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        output = result.stdout + result.stderr
        # promtool prints "Checking FILE" then either SUCCESS or FAILED lines.
        for block in re.split(r"(?m)^Checking ", output)[1:]:
            path_text, _, body = block.partition("\n")
            failed = files.get(path_text.strip())
            if failed is not None and "SUCCESS" not in body:
                errors[failed] = " ".join(body.split())
        if result.returncode != 0 and not errors:
            errors["<promtool>"] = output.strip()
    return errors
