"""The codebase keeps its own rules: ruff (lint and format) and mypy strict
are part of the suite, so a change that breaks them fails CI."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_lint() -> None:
    result = run(sys.executable, "-m", "ruff", "check", "services", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = run(sys.executable, "-m", "ruff", "format", "--check", "services", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_strict_on_the_package() -> None:
    result = run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout


# --- every import is declared -------------------------------------------------------------


def _top_level_imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports in ``path`` (``import a.b`` -> ``a``),
    including imports inside functions and ``try: ... except ImportError`` blocks: an
    optional import must still be provided by a declared extra."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _local_modules() -> set[str]:
    """Modules that live in this repository: the package and the tests' own helpers."""
    local = {"audiosockets", "conftest"}
    for base in (ROOT / "services", ROOT / "tests"):
        for path in base.rglob("*.py"):
            local.add(path.stem)
        for path in base.rglob("__init__.py"):
            local.add(path.parent.name)
    return local


def _declared_requirements() -> set[str]:
    """Canonical names of every dependency and optional extra in pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements.extend(extra)
    return {canonicalize_name(Requirement(text).name) for text in requirements}


#: Modules that exist for the compiler or type checker only (typeshed's stdlib helpers).
TYPING_ONLY = {"__future__", "_typeshed"}


def test_every_imported_module_is_a_declared_dependency() -> None:
    """A module imported anywhere in services/ or tests/ comes from the standard library,
    from this repository, or from a distribution declared in pyproject.toml (a dependency
    or an extra). A module installed by hand on one machine is not enough: CI's clean
    virtual environment would not have it."""
    declared = _declared_requirements()
    providers = importlib.metadata.packages_distributions()
    local = _local_modules()
    problems: list[str] = []
    for path in sorted([*(ROOT / "services").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]):
        for module in sorted(_top_level_imports(path)):
            if module in sys.stdlib_module_names or module in local or module in TYPING_ONLY:
                continue
            dists = {canonicalize_name(d) for d in providers.get(module, [])}
            if not dists:
                # Not installed here (an extra not in this environment): the module's own
                # name must then be a declared distribution (e.g. uvloop from `speed`).
                dists = {canonicalize_name(module)}
            if not dists & declared:
                where = path.relative_to(ROOT)
                problems.append(f"{where}: imports {module!r}, provided by {sorted(dists)}")
    assert not problems, "imports not declared in pyproject.toml:\n" + "\n".join(problems)


def test_optional_extra_modules_are_typed_as_any_everywhere() -> None:
    """mypy gives the same verdict with and without the optional extras installed: each
    module that only an optional extra provides (and that the package imports) is listed in
    a mypy override with follow_imports = "skip" and ignore_missing_imports, so it is Any
    in every environment and a leak of that Any into a typed signature fails everywhere."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    core = {canonicalize_name(Requirement(t).name) for t in project.get("dependencies", [])}
    optional = {
        canonicalize_name(Requirement(t).name)
        for name, extra in project.get("optional-dependencies", {}).items()
        if name != "test"
        for t in extra
    } - core
    skipped: set[str] = set()
    for override in pyproject["tool"]["mypy"].get("overrides", []):
        if override.get("follow_imports") == "skip" and override.get("ignore_missing_imports"):
            modules = override["module"]
            skipped.update([modules] if isinstance(modules, str) else modules)
    providers = importlib.metadata.packages_distributions()
    unlisted = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        for module in _top_level_imports(path):
            dists = {canonicalize_name(d) for d in providers.get(module, [])} or {
                canonicalize_name(module)
            }
            if dists & optional and module not in skipped:
                unlisted.append(f"{path.relative_to(ROOT)}: {module}")
    assert not unlisted, "optional-extra modules missing from the mypy skip override:\n" + (
        "\n".join(unlisted)
    )


# --- modules small enough to read in one sitting -------------------------------------------

MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 300


def test_no_module_or_class_too_long_to_read() -> None:
    """STYLE.md 12: a module stays readable in one sitting; past that it is split along
    its seams. Limits from issue 10: 600 lines a module, 300 a class."""
    too_long = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_CLASS_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}: class {node.name} {length} lines")
    assert not too_long, "split along the seams:\n" + "\n".join(too_long)


def test_the_package_does_not_use_asyncio_wait_for() -> None:
    """On Python 3.11 ``asyncio.wait_for`` drops a cancellation that arrives in the
    loop turn its awaitable completes in, and the task runs on: a reader that
    then blocked made a processor ignore SIGTERM (tests/nats/test_reader_stop.py).
    ``async with asyncio.timeout(...)`` keeps the cancellation; ``tasks.cancel_and_wait``
    stops a task that swallowed one anyway."""
    found = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = (
                node.attr
                if isinstance(node, ast.Attribute)
                else node.name
                if isinstance(node, ast.alias)
                else None
            )
            if name == "wait_for":
                found.append(f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}")
    assert not found, "use asyncio.timeout instead of wait_for:\n" + "\n".join(found)
