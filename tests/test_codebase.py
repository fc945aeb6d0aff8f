"""The codebase keeps its own rules: ruff (lint and format) and mypy strict
are part of the suite, so a change that breaks them fails CI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _support import require

ROOT = Path(__file__).parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_lint() -> None:
    require(shutil.which("ruff") is not None, "ruff is not installed (pip install -e '.[test]')")
    result = run("ruff", "check", "services", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    require(shutil.which("ruff") is not None, "ruff is not installed (pip install -e '.[test]')")
    result = run("ruff", "format", "--check", "services", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_strict_on_the_package() -> None:
    result = run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout
