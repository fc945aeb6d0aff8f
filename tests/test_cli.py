"""The CLI as a user meets it: one clear line and a named exit code for every
error a user can cause, env vars for every flag, status and loadtest reports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import get_args

import click
import pytest
from click.testing import CliRunner

from audiosockets.audio import DTypeName
from audiosockets.cli import LogLevel, LoopName, configure, format_status, main
from audiosockets.cli_support import option_group, user_errors
from audiosockets.client import StartName
from audiosockets.errors import AddressInUse, ConfigError, GateFailed, RelayUnreachable
from audiosockets.loadtest import ClientName, RateName
from audiosockets.processor import ProcessorConfig
from audiosockets.relay import RelayConfig


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "audiosockets", "--log-level", "warning", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("audiosockets: error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["status", "--relay", "http://example"], ConfigError.exit_code, "tcp://"),
        (["status", "--relay", "tcp://127.0.0.1:notaport"], ConfigError.exit_code, "port"),
        (
            ["status", "--relay", "tcp://127.0.0.1:1", "--timeout", "2"],
            RelayUnreachable.exit_code,
            "cannot reach",
        ),
        (["relay", "--listen", "udp://0.0.0.0:1"], ConfigError.exit_code, "tcp://"),
    ],
)
def test_user_errors_are_one_line(args: list[str], code: int, words: str) -> None:
    result = run_cli(*args)
    assert result.returncode == code
    assert words in one_error_line(result.stderr)


def test_port_in_use_is_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("relay", "--listen", f"tcp://127.0.0.1:{port}", "--metrics-port", "0")
    assert result.returncode == AddressInUse.exit_code
    assert "already in use" in one_error_line(result.stderr)


@pytest.mark.parametrize(
    ("listen", "words"),
    [
        ("tcp://nosuchhost.invalid:7400", "cannot listen on nosuchhost.invalid:7400"),
        ("tcp://192.0.2.1:7400", "cannot listen on 192.0.2.1:7400: "),  # not this host's
    ],
)
def test_an_address_this_host_cannot_listen_on_is_a_config_error(listen: str, words: str) -> None:
    """Exit 2 (fix the configuration), not 4 (another program holds the port)."""
    result = run_cli("relay", "--listen", listen, "--metrics-port", "0")
    assert result.returncode == ConfigError.exit_code
    assert words in one_error_line(result.stderr)


def test_every_flag_is_an_env_var() -> None:
    # click's auto_envvar_prefix: AUDIOSOCKETS_<COMMAND>_<OPTION>
    result = run_cli(
        "status",
        env={"AUDIOSOCKETS_STATUS_RELAY": "tcp://127.0.0.1:1", "AUDIOSOCKETS_STATUS_TIMEOUT": "1"},
    )
    assert result.returncode == RelayUnreachable.exit_code
    assert "127.0.0.1:1" in result.stderr


def test_env_var_names_match_the_flags() -> None:
    """AUDIOSOCKETS_<COMMAND>_<FLAG> for every option of every command."""
    assert isinstance(main, click.Group)
    wrong = []
    for name, command in main.commands.items():
        for param in command.params:
            if not isinstance(param, click.Option) or param.hidden:
                continue
            flag = max(param.opts, key=len).lstrip("-").replace("-", "_").upper()
            expected = f"AUDIOSOCKETS_{name.upper()}_{flag}"
            if param.envvar != expected:
                wrong.append(f"{name} {max(param.opts, key=len)}: {param.envvar} != {expected}")
    assert not wrong, wrong


def test_every_option_of_every_command_shows_its_env_var_in_help() -> None:
    """Options declared once and shared (the client's --token/--tls-*, the
    metrics endpoint) still reach each command's --help with that command's
    env var, in the order the command declares them."""
    assert isinstance(main, click.Group)
    for name, command in main.commands.items():
        if isinstance(command, click.Group):
            continue  # certs, nats: subcommands with arguments, not services
        result = CliRunner().invoke(main, [name, "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        text = " ".join(result.output.split())
        declared = []
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                flag = max(param.opts, key=len)
                assert f"env var: {param.envvar}" in text, f"{name} {flag}"
                declared.append(flag)
        shown = [
            line.split()[0]
            for line in result.output.splitlines()
            if line.startswith("  --") and line.split()[0] != "--help"
        ]
        assert shown == declared, name


@pytest.mark.parametrize(
    "command",
    [
        ["status", "--timeout", "1"],
        ["record", "--source", "synth:sine", "--metrics-port", "0"],
        ["process", "--handler", "level", "--metrics-port", "0"],
        ["loadtest"],
    ],
)
def test_every_client_command_reads_its_token_and_tls_files_before_it_starts(
    command: list[str], tmp_path: Path
) -> None:
    """--token, --token-file and --tls-* are one declaration shared by the
    client commands: each refuses the same bad values in the same words."""
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    relay = ["--relay", "tcp://127.0.0.1:1"]
    cases = [
        (["--token-file", str(tmp_path / "missing")], "cannot read token file"),
        (["--token", "x", "--token-file", str(token_file)], "not both"),
        (["--tls-ca", str(token_file)], "--tls-ca needs a tls:// relay URL"),
        (["--relay", "tls://127.0.0.1:1", "--tls-ca", str(tmp_path / "no.pem")], "TLS CA file"),
    ]
    for args, words in cases:
        result = CliRunner().invoke(main, [*command, *relay, *args])
        assert result.exit_code == ConfigError.exit_code, result.output
        assert words in result.output
    if command == ["loadtest"]:  # no --relay: its own open relay takes no token
        result = CliRunner().invoke(main, ["loadtest", "--token-file", str(token_file)])
        assert result.exit_code == ConfigError.exit_code, result.output
        assert "need --relay" in result.output


def test_an_option_group_hands_one_value_built_before_the_command_runs() -> None:
    """option_group: the group's options leave the command's arguments, build()
    gets them (and reads another option without taking it), and a ConfigError
    from build() is one line and exit 2, before the command's body runs."""
    ran: list[tuple[str, str]] = []

    def build(target: str, first: str, second: str) -> str:
        if first == "bad":
            raise ConfigError(f"--first {first} cannot reach {target}")
        return f"{first}+{second}@{target}"

    pair = option_group(
        "pair",
        build,
        [click.option("--first", default="a"), click.option("--second", default="b")],
        reads=("target",),
    )

    @click.command()
    @click.option("--target", default="t")
    @pair
    @user_errors
    def command(target: str, pair: str) -> None:
        ran.append((target, pair))

    assert [p.name for p in command.params] == ["target", "first", "second"]
    assert CliRunner().invoke(command, ["--second", "c"]).exit_code == 0
    assert ran == [("t", "a+c@t")]
    result = CliRunner().invoke(command, ["--first", "bad"])
    assert result.exit_code == ConfigError.exit_code
    assert result.output == "audiosockets: error: --first bad cannot reach t\n"
    assert len(ran) == 1


def test_env_var_reaches_a_renamed_parameter() -> None:
    # --relay is stored as relay_url; the env var still follows the flag.
    result = CliRunner().invoke(main, ["status"], env={"AUDIOSOCKETS_STATUS_RELAY": "bogus://x"})
    assert result.exit_code == ConfigError.exit_code
    assert "bogus://x" in result.output


def test_status_against_a_running_relay() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "audiosockets",
            "relay",
            "--listen",
            "tcp://127.0.0.1:0",
            "--metrics-port",
            "0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = ""
        while "listening on" not in line:
            line = proc.stderr.readline()
            assert line, "relay exited before listening"
        url = line.rsplit(" ", 1)[1].strip()
        result = run_cli("status", "--relay", url, "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["streams"] == []
        assert report["replay_seconds"] == 30.0
        table = run_cli("status", "--relay", url)
        assert "(no streams)" in table.stdout
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_format_status_shows_groups_and_drops() -> None:
    report = {
        "server": "r",
        "version": "0",
        "uptime_s": 1.0,
        "replay_seconds": 30.0,
        "queue_seconds": 2.0,
        "streams": [
            {
                "name": "mic-1",
                "format": {"rate": 16000, "channels": 1, "sample_type": "int16"},
                "publisher": "rec",
                "rate_chunks_per_s": 50.0,
                "last_seq": 99,
                "window_seconds": 2.0,
                "subscribers": ["a"],
            }
        ],
        "subscribers": [
            {
                "name": "a",
                "pattern": "*",
                "group": "g",
                "lag_chunks": 0,
                "dropped": 3,
                "streams": ["mic-1"],
            }
        ],
        "groups": {"g": {"members": ["a"], "assignment": {"mic-1": "a"}}},
        "drops": {"subscriber_slow": 3.0},
    }
    text = format_status(report)
    assert "mic-1 -> a" in text
    assert "subscriber_slow=3" in text
    assert "16000 Hz 1ch int16" in text


def test_loadtest_json_report_and_zero_loss() -> None:
    result = run_cli(
        "loadtest",
        "--streams",
        "4",
        "--subscribers",
        "2",
        "--duration",
        "1.5",
        "--json",
        "--max-loss",
        "0",
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in (
        "chunks_sent",
        "chunks_received",
        "chunks_lost",
        "chunks_duplicated",
        "chunks_out_of_order",
        "latency_ms",
        "throughput_chunks_per_s",
        "relay_cpu_s",
    ):
        assert key in report
    assert set(report["latency_ms"]) >= {"p50", "p95", "p99", "max"}
    assert report["chunks_sent"] > 0
    assert report["chunks_received"] == 2 * report["chunks_sent"]
    assert report["chunks_lost"] == 0
    assert report["relay_cpu_s"] > 0


def test_loadtest_group_mode_delivers_each_chunk_once() -> None:
    result = run_cli(
        "loadtest",
        "--streams",
        "6",
        "--subscribers",
        "3",
        "--group",
        "g",
        "--duration",
        "1",
        "--json",
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["chunks_received"] == report["chunks_sent"]
    assert report["chunks_duplicated"] == 0


def test_loadtest_gate_fails_with_its_exit_code() -> None:
    result = run_cli(
        "loadtest",
        "--streams",
        "1",
        "--subscribers",
        "1",
        "--duration",
        "0.5",
        "--max-p99-ms",
        "0",
        timeout=120,
    )
    assert result.returncode == GateFailed.exit_code
    assert "p99" in one_error_line(result.stderr)


def test_help_lists_every_command() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("relay", "status", "loadtest", "record", "devices", "process"):
        assert command in result.output


def test_loadtest_raw_clients_measure_the_relay() -> None:
    result = run_cli(
        "loadtest",
        "--streams",
        "3",
        "--subscribers",
        "2",
        "--duration",
        "1",
        "--client",
        "raw",
        "--json",
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["chunks_received"] == 2 * report["chunks_sent"]
    assert report["chunks_duplicated"] == 0
    assert report["relay_chunks_sent"] == report["chunks_received"]
    assert report["relay_chunks_per_cpu_s"] > 0


# --- one configuration path, one exit status for configuration errors --------------


@pytest.mark.parametrize(
    ("command", "param", "alias"),
    [
        (None, "log_level", LogLevel),
        ("relay", "loop_name", LoopName),
        ("record", "dtype", DTypeName),
        ("process", "start", StartName),
        ("loadtest", "rate", RateName),
        ("loadtest", "client", ClientName),
    ],
)
def test_choices_are_the_literal_aliases(command: str | None, param: str, alias: object) -> None:
    cmd = main if command is None else main.commands[command]
    (option,) = [p for p in cmd.params if p.name == param]
    assert isinstance(option.type, click.Choice)
    assert tuple(option.type.choices) == get_args(alias)


def test_configure_turns_a_config_objects_value_error_into_config_error() -> None:
    with pytest.raises(ConfigError, match="queue_seconds"):
        configure(RelayConfig, queue_seconds=0)
    with pytest.raises(ConfigError, match="--workers"):
        configure(ProcessorConfig, handler="level", workers=-1)  # validate() ran
    with pytest.raises(ConfigError, match="tcp://"):
        configure(ProcessorConfig, handler="level", relay="http://x")
    assert configure(ProcessorConfig, handler="level").handler == "level"


def test_a_value_error_that_is_a_bug_is_not_reported_as_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import audiosockets.client

    async def broken(*args: object, **kwargs: object) -> dict[str, object]:
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr(audiosockets.client, "fetch_status", broken)
    result = CliRunner().invoke(main, ["status", "--relay", "tcp://127.0.0.1:1"])
    assert result.exit_code != ConfigError.exit_code
    assert isinstance(result.exception, ValueError)  # raised as it is: traceback, not one line


def test_too_large_a_frame_limit_is_a_configuration_error() -> None:
    result = CliRunner().invoke(main, ["relay", "--max-frame-bytes", str(2**32)])
    assert result.exit_code == ConfigError.exit_code
    assert "max-frame-bytes" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--relay", "tcp://127.0.0.1:1", "--json"],
        ["process", "--handler", "level"],
        ["demo", "--seconds", "1"],
        ["record", "--source", "synth:sine"],
        ["relay", "--listen", "tcp://127.0.0.1:0"],
    ],
)
def test_every_service_command_runs_through_run_async_with_its_loop(
    args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import audiosockets.cli
    import audiosockets.cli_tools

    seen: list[str] = []

    def fake_run_async(coro: Coroutine[object, object, object], loop: str = "auto") -> None:
        coro.close()
        seen.append(loop)

    monkeypatch.setattr(audiosockets.cli, "run_async", fake_run_async)
    monkeypatch.setattr(audiosockets.cli_tools, "run_async", fake_run_async)  # demo
    result = CliRunner().invoke(main, [*args, "--loop", "asyncio"])
    assert result.exit_code == 0, result.output
    assert seen == ["asyncio"]


LONG = "x" * 201  # one byte over the protocol's 200-byte name limit (Limits.max_name_length)
WIDE = "é" * 101  # 101 characters, 202 bytes of UTF-8: the limit counts bytes
UNREACHABLE = "tcp://127.0.0.1:1"
RECORD = ["record", "--relay", UNREACHABLE, "--source", "synth:sine"]
BIG_CHUNK = [*RECORD, "--rate", "48000", "--channels", "16", "--dtype", "float32"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["status", "--relay", "tcp://[::1"], "relay URL"),
        (["relay", "--listen", "tcp://[::1", "--metrics-port", "0"], "tcp://[::1"),
        (["record", "--relay", "tcp://[::1", "--source", "synth:sine"], "relay URL"),
        ([*RECORD, "--stream", WIDE], "--stream"),
        ([*RECORD, "--name", LONG], "--name"),
        ([*RECORD, "--token", LONG], "--token"),
        (
            # 48000 frames x 16 channels x 4 bytes = 3,072,000 bytes in one chunk
            [*BIG_CHUNK, "--block-ms", "1000"],
            "--block-ms",
        ),
        (["process", "--relay", UNREACHABLE, "--handler", "level", "--stream", LONG], "--stream"),
        (["process", "--relay", UNREACHABLE, "--handler", "level", "--group", WIDE], "--group"),
        (["process", "--relay", UNREACHABLE, "--handler", "level", "--name", LONG], "--name"),
        (["process", "--relay", UNREACHABLE, "--handler", "level", "--token", LONG], "--token"),
        (["relay", "--listen", "tcp://127.0.0.1:0", "--token", LONG], "--token"),
    ],
)
def test_a_value_the_relay_must_refuse_is_a_configuration_error_before_connecting(
    args: list[str], words: str
) -> None:
    """Names, tokens and chunks the protocol cannot carry (over 200 bytes of
    UTF-8, over the 1 MiB frame) and URLs that do not parse are exit 2 with one
    line at start, not a traceback or a reconnect loop against a refusal."""
    metrics = ["--metrics-port", "0"] if args[0] in ("record", "process") else []
    result = run_cli(*args, *metrics, timeout=30)
    assert result.returncode == ConfigError.exit_code, result.stderr
    assert words in one_error_line(result.stderr)


def test_names_at_the_protocol_limit_are_accepted() -> None:
    from audiosockets.recorder import RecorderConfig

    at_limit = "x" * 200
    configure(RecorderConfig, stream=at_limit, name=at_limit, token=at_limit)
    configure(ProcessorConfig, handler="level", stream=at_limit, group=at_limit, name=at_limit)
    configure(RelayConfig, token=at_limit)


def test_the_default_processor_name_fits_the_protocol_whatever_the_handler_path() -> None:
    from audiosockets.processor.server import default_client_name

    name = default_client_name("/" + "d" * 300 + "/handler.py:handle")
    assert 0 < len(name.encode()) <= 200
    assert name.startswith("process-")
    assert name.endswith(f"/handler.py:handle@{socket.gethostname()}")  # the end says most
    assert default_client_name("level") == f"process-level@{socket.gethostname()}"


def test_the_top_level_options_are_env_vars_too_and_help_says_so() -> None:
    """--log-level is AUDIOSOCKETS_LOG_LEVEL (what compose and k8s set), shown
    in --help like every command's env var."""
    help_text = CliRunner().invoke(main, ["--help"]).output
    assert "AUDIOSOCKETS_LOG_LEVEL" in help_text
    assert "AUDIOSOCKETS_VERSION" not in help_text  # an env var must not print the version
    env = {"AUDIOSOCKETS_LOG_LEVEL": "nonsense"}
    result = CliRunner().invoke(main, ["status", "--relay", "tcp://[::1"], env=env)
    assert result.exit_code == 2
    assert "'nonsense' is not one of" in result.output


def test_an_environment_variable_named_like_the_version_flag_does_not_stop_a_command() -> None:
    """AUDIOSOCKETS_VERSION is a natural name for a release tag in .env or CI;
    click's auto env vars made it mean --version, so every command printed the
    version and exited 0 instead of running."""
    env = {"AUDIOSOCKETS_VERSION": "0.1.0"}
    result = CliRunner().invoke(main, ["status", "--relay", "tcp://[::1"], env=env)
    assert "version" not in result.output
    assert result.exit_code == ConfigError.exit_code
