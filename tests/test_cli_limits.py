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


def test_ingest_limits_flags_and_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    default = relay_config(monkeypatch)
    assert default.max_input_bytes == 8 << 20
    assert default.frame_timeout == 10.0
    assert default.limits.max_chunk_seconds == 2.0
    flags = relay_config(
        monkeypatch,
        "--max-input-bytes",
        "4194304",
        "--frame-timeout",
        "2.5",
        "--max-chunk-seconds",
        "0.5",
    )
    assert flags.max_input_bytes == 4 << 20
    assert flags.frame_timeout == 2.5
    assert flags.limits.max_chunk_seconds == 0.5
    env = relay_config(
        monkeypatch,
        AUDIOSOCKETS_RELAY_MAX_INPUT_BYTES="12582912",
        AUDIOSOCKETS_RELAY_FRAME_TIMEOUT="4",
        AUDIOSOCKETS_RELAY_MAX_CHUNK_SECONDS="1",
    )
    assert (env.max_input_bytes, env.frame_timeout, env.limits.max_chunk_seconds) == (
        12 << 20,
        4.0,
        1.0,
    )


def test_an_input_budget_below_one_frame_is_a_configuration_error() -> None:
    result = CliRunner().invoke(main, ["relay", "--metrics-port", "0", "--max-input-bytes", "1000"])
    assert result.exit_code == 2
    assert "max_input_bytes" in result.output


def test_capture_time_flags_and_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    default = relay_config(monkeypatch)
    assert (default.max_capture_ahead, default.max_capture_age) == (300.0, 3650 * 86400.0)
    flags = relay_config(monkeypatch, "--max-capture-ahead", "5", "--max-capture-age", "3600")
    assert (flags.max_capture_ahead, flags.max_capture_age) == (5.0, 3600.0)
    env = relay_config(
        monkeypatch,
        AUDIOSOCKETS_RELAY_MAX_CAPTURE_AHEAD="10",
        AUDIOSOCKETS_RELAY_MAX_CAPTURE_AGE="86400",
    )
    assert (env.max_capture_ahead, env.max_capture_age) == (10.0, 86400.0)


def test_max_open_segments_reaches_the_processor_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import audiosockets.processor

    built: list[Any] = []

    async def serve(config: Any, **kwargs: Any) -> None:
        built.append(config)

    monkeypatch.setattr(audiosockets.processor, "serve", serve)
    args = ["process", "--handler", "level", "--metrics-port", "0"]
    result = CliRunner().invoke(main, [*args, "--max-open-segments", "64"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, args, env={"AUDIOSOCKETS_PROCESS_MAX_OPEN_SEGMENTS": "32"})
    assert result.exit_code == 0, result.output
    assert [c.max_open_segments for c in built] == [64, 32]
