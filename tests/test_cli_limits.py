"""The relay's limits reach ``RelayConfig`` from their flags and env vars (issue 11)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from audiosockets.cli import main
from audiosockets.protocol import Limits
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


def float_options() -> list[tuple[list[str], str]]:
    """(command path with its required options, flag) for every float flag of every command."""
    import click

    def commands(group: click.Group, path: list[str]) -> Iterator[tuple[list[str], click.Command]]:
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from commands(command, [*path, name])
            else:
                yield [*path, name], command

    found = []
    for path, command in commands(main, []):
        required = ["--handler", "level"] if path == ["process"] else []
        for param in command.params:
            if isinstance(param.type, click.FloatRange):
                found.append(([*path, *required], param.opts[0]))
    return found


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize(("command", "flag"), float_options())
def test_no_float_flag_takes_a_value_that_is_not_finite(
    command: list[str], flag: str, value: str
) -> None:
    """nan passes every range check and inf reaches int(): each used to start a
    service that failed later (a traceback, a relay that failed every handshake)."""
    result = CliRunner().invoke(main, [*command, f"{flag}={value}"])
    assert result.exit_code == 2, result.output
    assert "is not a finite number" in result.output or "not in the range" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_every_command_has_float_flags_checked() -> None:
    assert len(float_options()) >= 20  # the walk found the commands' float flags


@pytest.mark.parametrize(
    ("flag", "field"),
    [("--heartbeat-seconds", "heartbeat_interval"), ("--replay-seconds", "replay_seconds")],
)
def test_a_time_too_long_for_welcome_is_a_configuration_error(flag: str, field: str) -> None:
    """WELCOME carries both in u32 milliseconds: a longer one made every handshake fail."""
    result = CliRunner().invoke(main, ["relay", "--metrics-port", "0", flag, "4294968"])
    assert result.exit_code == 2, result.output
    assert f"{field} must be at most 4294967 s" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_relay_config_refuses_times_that_are_not_finite() -> None:
    with pytest.raises(ValueError, match="queue_seconds must be a finite number"):
        RelayConfig(queue_seconds=float("nan"))
    with pytest.raises(ValueError, match="max_chunk_seconds"):
        Limits(max_chunk_seconds=float("nan"))
