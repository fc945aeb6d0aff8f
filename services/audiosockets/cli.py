"""The ``audiosockets`` command line: one click group, one command per service.

Thin by design: each command parses flags (every flag is also an
``AUDIOSOCKETS_<COMMAND>_<OPTION>`` environment variable through click's
``auto_envvar_prefix``), builds its service's config, runs it, and maps our
errors to one line on stderr and a named exit code. No tracebacks for errors a
user can cause.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

import click

from . import __version__
from . import cli_security as security
from .audio import DTypeName
from .cli_nats import nats_group
from .cli_security import ClientAuth
from .cli_support import (
    FloatRange,
    LoopName,
    ServiceRuntime,
    choice,
    configure,
    format_status,
    listen_address,
    loop_option,
    metrics_port_option,
    relay_limit_options,
    relay_option,
    run_async,
    service_options,
    user_errors,
)
from .cli_tools import demo, loadtest
from .client import StartName
from .urls import check_url

P = ParamSpec("P")
T = TypeVar("T")
LogLevel = Literal["debug", "info", "warning", "error"]


@click.group(context_settings={"auto_envvar_prefix": "AUDIOSOCKETS", "show_default": True})
# Not from the environment: AUDIOSOCKETS_VERSION (a release tag, say) must not
# turn every command into "print the version and exit 0".
@click.version_option(__version__, prog_name="audiosockets", allow_from_autoenv=False)
@click.option(
    "--log-level",
    type=choice(LogLevel),
    default="info",
    help="How much to log (to stderr).",
)
def main(log_level: LogLevel) -> None:
    """Real-time audio over sockets: record, relay, process."""
    from .untrusted import configure_logging

    # Log messages carry names that came from the network: one escaped line each.
    configure_logging(getattr(logging, log_level.upper()))


# --- relay, status (lead) -----------------------------------------


@main.command()
@click.option("--listen", default="tcp://0.0.0.0:7400", help="Address to accept clients on.")
@metrics_port_option(9400)
@click.option(
    "--replay-seconds",
    type=FloatRange(0),
    default=30.0,
    help="Audio kept per stream for resuming subscribers.",
)
@click.option(
    "--queue-seconds",
    type=FloatRange(0, min_open=True),
    default=2.0,
    help="How far a subscriber may fall behind live audio before its oldest chunks drop.",
)
@click.option(
    "--heartbeat-seconds",
    type=FloatRange(0, min_open=True),
    default=2.0,
    help="PING interval; a peer silent for 3 intervals is dead.",
)
@click.option(
    "--max-frame-bytes",
    type=click.IntRange(64, 2**32 - 1),
    default=1 << 20,
    help="Largest frame accepted.",
)
@click.option(
    "--max-chunk-seconds",
    type=FloatRange(0, min_open=True),
    default=2.0,
    help="Audio one CHUNK may carry, in seconds of its stream's format.",
)
@click.option(
    "--token",
    default=None,
    help="Shared secret every client must present: the simplest mode, one identity "
    "with every role (unset, and no --credentials: no authentication).",
)
@security.relay_security_options
@relay_limit_options
@service_options(metrics_port=None, metrics_host="the --listen host")
@user_errors
def relay(
    listen: str,
    replay_seconds: float,
    queue_seconds: float,
    heartbeat_seconds: float,
    max_frame_bytes: int,
    max_chunk_seconds: float,
    token: str | None,
    token_file: Path | None,
    credentials: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_client_ca: Path | None,
    runtime: ServiceRuntime,
    **limits: Any,
) -> None:
    """Run the relay: publishers in, fan-out and groups out.

    SIGTERM and SIGINT stop it (goodbye to every client, exit 0); SIGHUP reloads
    --credentials and keeps running.
    """
    from .health import Health
    from .metrics import Metrics, serve_metrics
    from .protocol import Limits
    from .relay import Relay, RelayConfig

    host, port = listen_address(listen)
    config = configure(
        RelayConfig,
        host=host,
        port=port,
        replay_seconds=replay_seconds,
        queue_seconds=queue_seconds,
        heartbeat_interval=heartbeat_seconds,
        limits=configure(
            Limits, max_frame_size=max_frame_bytes, max_chunk_seconds=max_chunk_seconds
        ),
        token=security.read_token(token, token_file),
        credentials=credentials,
        tls=security.relay_tls(listen, tls_cert, tls_key, tls_client_ca),
        **limits,
    )
    metrics = Metrics()
    metrics_tls = runtime.metrics.context()  # unusable files: exit 2 before listening

    def ready(server: Relay) -> None:
        if runtime.metrics_port:
            # Called on the loop once the socket is bound: listening is ready.
            health = Health.watch_running_loop(server.readiness)
            where = runtime.metrics.host or host
            port = runtime.metrics_port
            serve_metrics(port, metrics.registry, where, health=health, tls=metrics_tls)
        click.echo(f"relay listening on {server.url}", err=True)

    server = Relay(config, metrics=metrics)  # reads --credentials: a bad file is exit 2
    run_async(server.run(ready=ready), runtime.loop)


@main.command()
@relay_option("Relay to ask.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    envvar="AUDIOSOCKETS_STATUS_JSON",
    help="Print the report as JSON.",
)
@click.option("--timeout", type=FloatRange(0, min_open=True), default=5.0, help="Seconds to wait.")
@security.client_auth_options()
@loop_option
@user_errors
def status(
    relay_url: str, as_json: bool, timeout: float, auth: ClientAuth, loop_name: LoopName
) -> None:
    """Show a relay's streams, clients, groups and drops."""
    from .connect import fetch_status
    from .untrusted import escape_all

    fetch = fetch_status(relay_url, timeout=timeout, token=auth.token, tls=auth.tls)
    report = run_async(fetch, loop_name)
    if as_json:
        click.echo(json.dumps(report, indent=2))  # JSON escapes control characters itself
        return
    if report.get("binding") == "nats":
        from .jetstream.admin import format_status as format_nats_status

        click.echo(format_nats_status(escape_all(report)))
        return
    # Names in the report came from the network: control characters escaped.
    click.echo(format_status(escape_all(report)))


# --- record, devices (recorder) ---------------------------------------------


@main.command()
@relay_option("Relay to publish to.")
@click.option("--stream", default="mic-1", help="Stream name.")
@click.option(
    "--source",
    default="device",
    help="device, device:NAME_OR_INDEX, file:PATH.wav[?loop=1&convert=1], "
    "synth:sine[:HZ], synth:noise, synth:silence or synth:speechlike.",
)
@click.option("--rate", type=click.IntRange(1, 768_000), default=16000, help="Sample rate (Hz).")
@click.option("--channels", type=click.IntRange(1, 64), default=1, help="Channel count.")
@click.option(
    "--dtype",
    type=choice(DTypeName),
    default="int16",
    help="Sample type on the wire.",
)
@click.option("--block-ms", type=FloatRange(1, 1000), default=20.0, help="Chunk length (ms).")
@click.option(
    "--spool-seconds",
    type=FloatRange(0, min_open=True),
    default=60.0,
    help="Audio kept while the relay is unreachable; older unsent audio is dropped.",
)
@click.option(
    "--spool-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the spool on disk here (memory then holds at most --spool-memory-seconds); "
    "audio left at exit is sent first by the next run.",
)
@click.option(
    "--spool-memory-seconds",
    type=FloatRange(0, min_open=True),
    default=None,
    help="With --spool-dir: audio held in memory before the rest goes to disk "
    "[default: 10]. A SIGKILL or power cut loses up to this much; keep it above the "
    "relay's heartbeat timeout (6 s by default) or a half-open connection loses more.",
)
@click.option(
    "--spool-max-mib",
    type=FloatRange(0, min_open=True),
    default=512.0,
    help="Most audio held in memory, in MiB, with the seconds: whichever is reached first "
    "drops the oldest (counted spool_full).",
)
@click.option(
    "--flush-seconds",
    type=FloatRange(0),
    default=2.0,
    help="On SIGTERM/SIGINT/SIGHUP, how long to wait for the relay to take the backlog.",
)
@click.option("--name", default=None, help="Client name the relay shows (default recorder-STREAM).")
@security.client_auth_options()
@service_options(metrics_port=9401, metrics_host="127.0.0.1")
@user_errors
def record(
    relay_url: str,
    stream: str,
    source: str,
    rate: int,
    channels: int,
    dtype: DTypeName,
    block_ms: float,
    spool_seconds: float,
    spool_dir: Path | None,
    spool_memory_seconds: float | None,
    spool_max_mib: float,
    flush_seconds: float,
    name: str | None,
    auth: ClientAuth,
    runtime: ServiceRuntime,
) -> None:
    """Capture audio and publish it; keeps recording whatever the relay does.

    SIGTERM, SIGINT and SIGHUP (the terminal closed, kill -HUP) all stop it cleanly:
    it gives the relay up to --flush-seconds to take the backlog (with --spool-dir the
    rest goes to disk), then exits 0.
    """
    from .recorder import RecorderConfig
    from .recorder import record as run_recorder

    check_url(relay_url)  # a malformed URL is an error before any device is opened
    config = configure(
        RecorderConfig,
        relay=relay_url,
        stream=stream,
        source=source,
        rate=rate,
        channels=channels,
        dtype=dtype,
        block_ms=block_ms,
        spool_seconds=spool_seconds,
        spool_dir=spool_dir,
        memory_seconds=spool_memory_seconds,
        spool_max_mib=spool_max_mib,
        flush_timeout=flush_seconds,
        name=name,
        token=auth.token,
        tls=auth.tls,
    )
    recording = run_recorder(config, metrics_port=runtime.metrics_port, endpoint=runtime.metrics)
    run_async(recording, runtime.loop)


@main.command()
@user_errors
def devices() -> None:
    """List the audio input devices PortAudio sees; * marks the default."""
    from .audio_diagnose import describe_input_devices

    for line in describe_input_devices():
        click.echo(line)


# --- process (processor) ----------------------------------------------


@main.command()
@relay_option("Relay to subscribe to.")
@click.option("--stream", default="*", help="Streams to process (shell pattern, e.g. mic-*).")
@click.option("--group", default=None, help="Share the streams with the other group members.")
@click.option(
    "--handler",
    "handler_spec",
    required=True,
    help="level, vad, archive:DIR, spectrum, package.module:callable or path/file.py:callable.",
)
@click.option(
    "--workers",
    type=click.IntRange(0, 256),
    default=0,
    help="0: run the handler in a thread; N: in N worker processes (CPU-heavy handlers).",
)
@click.option(
    "--backlog-seconds",
    type=FloatRange(0, min_open=True),
    default=10.0,
    help="Audio waiting for the handler; beyond it the oldest chunks are dropped.",
)
@click.option(
    "--events",
    type=click.Path(dir_okay=False),
    default=None,
    help="Append handler events (JSON lines) to this file instead of stdout.",
)
@click.option(
    "--segment-seconds",
    type=FloatRange(0, min_open=True),
    default=60.0,
    help="archive: length of one WAV segment.",
)
@click.option(
    "--max-open-segments",
    type=click.IntRange(1),
    default=256,
    help="archive: segment files open at once; past it the least recently written is "
    "completed early (audiosockets_archive_evictions_total).",
)
@click.option(
    "--max-failures",
    type=click.IntRange(0),
    default=100,
    help="Exit with status 6 after this many handler failures in a row (0: never).",
)
@click.option(
    "--start",
    type=choice(StartName),
    default="live",
    help="live: from now; earliest: from the oldest audio the relay still holds.",
)
@click.option(
    "--name", default=None, help="Client name at the relay (default process-HANDLER@HOSTNAME)."
)
@security.client_auth_options()
@service_options(metrics_port=9402, metrics_host="127.0.0.1")
@user_errors
def process(
    relay_url: str,
    stream: str,
    group: str | None,
    handler_spec: str,
    workers: int,
    backlog_seconds: float,
    events: str | None,
    segment_seconds: float,
    max_open_segments: int,
    max_failures: int,
    start: StartName,
    name: str | None,
    auth: ClientAuth,
    runtime: ServiceRuntime,
) -> None:
    """Run a handler on every chunk of the matching streams.

    SIGTERM, SIGINT and SIGHUP (the terminal closed, kill -HUP) all stop it cleanly:
    it stops receiving, finishes the chunks it holds, then exits 0.
    """
    from .processor import ProcessorConfig, serve

    config = configure(
        ProcessorConfig,
        handler=handler_spec,
        relay=relay_url,
        stream=stream,
        group=group,
        name=name,
        workers=workers,
        metrics_port=runtime.metrics_port,
        metrics_host=runtime.metrics.host or "127.0.0.1",
        metrics_tls=runtime.metrics.context(),
        backlog_seconds=backlog_seconds,
        events=events,
        segment_seconds=segment_seconds,
        max_open_segments=max_open_segments,
        exit_after=max_failures,
        start=start,
        token=auth.token,
        tls=auth.tls,
    )
    run_async(serve(config), runtime.loop)  # checks the handler once, before connecting


# --- loadtest, demo: cli_tools.py ------------------------------------------------

main.add_command(loadtest)
main.add_command(demo)


main.add_command(security.certs)  # audiosockets certs init/issue


# --- nats (the JetStream binding): cli_nats.py ------------------------------------

main.add_command(nats_group)


# --- env vars (keep last: runs after every command is registered) -----------


def name_env_vars_after_flags(group: click.Group, prefix: str = "AUDIOSOCKETS") -> None:
    """Give every option the env var ``PREFIX_COMMAND_FLAG``.

    click's ``auto_envvar_prefix`` derives the name from the Python parameter
    name, so ``--relay`` stored as ``relay_url`` would become ``..._RELAY_URL``;
    users (and compose files) go by the flag. Options with an explicit
    ``envvar`` keep it.
    """
    for param in group.params:  # the group's own: PREFIX_FLAG (--log-level, not --version)
        if isinstance(param, click.Option) and param.expose_value:
            if not param.envvar:
                flag = max(param.opts, key=len).lstrip("-").replace("-", "_").upper()
                param.envvar = f"{prefix}_{flag}"
            param.show_envvar = True
    for name, command in group.commands.items():
        for param in command.params:
            if not isinstance(param, click.Option):
                continue
            if not param.envvar:
                flag = max(param.opts, key=len).lstrip("-").replace("-", "_").upper()
                param.envvar = f"{prefix}_{name.upper().replace('-', '_')}_{flag}"
            param.show_envvar = True


name_env_vars_after_flags(main)
