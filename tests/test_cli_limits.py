"""The relay's limits reach ``RelayConfig`` from their flags and env vars (issue 11)."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from audiosockets.cli import main
from audiosockets.relay import Relay, RelayConfig


def relay_config(monkeypatch: pytest.MonkeyPatch, *args: str, **env: str) -> RelayConfig:
    """Run ``audiosockets relay ARGS`` with ``env`` and return the config it built."""
    built: list[RelayConfig] = []

    async def run(self: Relay, **kwargs: Any) -> None:
        built.append(self.config)

    monkeypatch.setattr(Relay, "run", run)
    result = CliRunner().invoke(main, ["relay", "--metrics-port", "0", *args], env=env)
    assert result.exit_code == 0, result.output
    return built[0]


def test_max_window_memory_flag_and_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    assert relay_config(monkeypatch).max_window_memory == 256 << 20
    assert (
        relay_config(monkeypatch, "--max-window-memory", "33554432").max_window_memory == 32 << 20
    )
    env = {"AUDIOSOCKETS_RELAY_MAX_WINDOW_MEMORY": "67108864"}
    assert relay_config(monkeypatch, **env).max_window_memory == 64 << 20


def test_a_window_budget_below_one_mib_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["relay", "--max-window-memory", "1000"])
    assert result.exit_code == 2
