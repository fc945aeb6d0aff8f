"""The ``loadtest`` and ``demo`` commands: tools beside the three services.

Kept out of ``cli.py`` so that module stays a readable list of the services'
commands; ``cli.py`` registers these on the ``audiosockets`` group.
"""

from __future__ import annotations

import sys

import click

from . import cli_security as security
from .cli_support import (
    FloatRange,
    LoopName,
    choice,
    configure,
    listen_address,
    loop_option,
    relay_option,
    run_async,
    user_errors,
)
from .errors import ConfigError
from .loadtest import ClientName, RateName
from .urls import check_url, is_nats_url


@click.command()
@click.option(
    "--streams", type=click.IntRange(1), default=10, help="Synthetic publishers, one stream each."
)
@click.option(
    "--subscribers", type=click.IntRange(1), default=2, help="Subscribers (all streams each)."
)
@click.option(
    "--group", default="", help="Put the subscribers in this group (each stream to one member)."
)
@click.option(
    "--duration",
    type=FloatRange(0, min_open=True),
    default=10.0,
    help="Seconds of publishing.",
)
@click.option(
    "--rate",
    type=choice(RateName),
    default="realtime",
    help="realtime: one chunk per chunk duration; max: as fast as the relay takes them.",
)
@relay_option("Use this relay instead of starting one.", default="")
@click.option(
    "--sample-rate", type=click.IntRange(1), default=16000, help="Synthetic stream sample rate."
)
@click.option("--chunk-ms", type=FloatRange(0, min_open=True), default=20.0, help="Chunk duration.")
@click.option(
    "--subscriber-processes",
    type=click.IntRange(1),
    default=1,
    help="Spread the subscribers over this many processes.",
)
@click.option(
    "--client",
    type=choice(ClientName),
    default="library",
    help="library: subscribers are audiosockets Subscribers (what processors use); "
    "raw: header-only readers, to measure the relay's own ceiling.",
)
@click.option(
    "--max-loss",
    type=FloatRange(0, 1),
    default=None,
    help="Fail (exit 7) when the lost fraction exceeds this.",
)
@click.option(
    "--max-p99-ms",
    type=FloatRange(0),
    default=None,
    help="Fail (exit 7) when p99 latency exceeds this many ms.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    envvar="AUDIOSOCKETS_LOADTEST_JSON",
    help="Print one JSON object on stdout.",
)
@security.client_auth_options(own_relay=True)
@user_errors
def loadtest(
    streams: int,
    subscribers: int,
    group: str,
    duration: float,
    rate: RateName,
    relay_url: str,
    sample_rate: int,
    chunk_ms: float,
    subscriber_processes: int,
    client: ClientName,
    max_loss: float | None,
    max_p99_ms: float | None,
    as_json: bool,
    auth: security.ClientAuth,
) -> None:
    """Drive synthetic publishers and subscribers; report loss and latency."""
    from .loadtest import LoadTestConfig, check_gates, format_report, run_loadtest

    if relay_url:
        check_url(relay_url)
        if client == "raw" and is_nats_url(relay_url):
            raise ConfigError(
                "--client raw reads the relay protocol; use --client library for NATS"
            )
    cfg = configure(
        LoadTestConfig,
        streams=streams,
        subscribers=subscribers,
        group=group,
        duration=duration,
        rate=rate,
        relay_url=relay_url,
        sample_rate=sample_rate,
        chunk_ms=chunk_ms,
        subscriber_processes=subscriber_processes,
        client=client,
        token=auth.token,
        tls_ca=auth.tls_ca,
        tls_cert=auth.tls_cert,
        tls_key=auth.tls_key,
    )
    show = sys.stderr.isatty()

    def progress(line: str) -> None:
        if show:
            click.echo(f"\r{line}", nl=False, err=True)

    report = run_loadtest(cfg, progress=progress)
    if show:
        click.echo("", err=True)
    click.echo(report.to_json() if as_json else format_report(report))
    check_gates(report, max_loss, max_p99_ms)


@click.command()
@click.option(
    "--listen",
    default="tcp://127.0.0.1:7400",
    help="Where the demo's relay listens (port 0: any free port).",
)
@click.option(
    "--streams",
    type=click.IntRange(1, 16),
    default=2,
    help="Synthetic streams: speech-like, 440 Hz sine, noise, silence, in turn.",
)
@click.option(
    "--seconds",
    type=FloatRange(0),
    default=0.0,
    help="Stop after this many seconds (0: run until Ctrl-C).",
)
@loop_option
@user_errors
def demo(listen: str, streams: int, seconds: float, loop_name: LoopName) -> None:
    """Relay, synthetic recorders and the level and vad processors, with a live table."""
    from .demo import DemoConfig, run_demo

    host, port = listen_address(listen)
    config = configure(DemoConfig, host=host, port=port, streams=streams, seconds=seconds)
    run_async(run_demo(config), loop_name)
