"""``audiosockets nats ...``: set up the JetStream stream of the NATS binding.

Kept apart from cli.py (which registers the group) so cli.py stays readable;
nothing here imports nats-py until a command runs.
"""

from __future__ import annotations

from typing import Literal

import click

from .cli_support import FloatRange, relay_option, run_async, user_errors
from .errors import ConfigError
from .urls import check_url


@click.group("nats")
def nats_group() -> None:
    """Set up the JetStream stream that nats:// URLs use (see PROTOCOL.md)."""


@nats_group.command("init")
@relay_option("NATS servers (comma-separated).", default="nats://127.0.0.1:4222")
@click.option("--stream", default="AUDIOSOCKETS", help="JetStream stream name.")
@click.option(
    "--subject-prefix", default="audiosockets", help="One subject per audio stream below it."
)
@click.option(
    "--nats-replicas",
    "replicas",
    type=click.Choice(["1", "3", "5"]),
    default="1",
    help="Copies of every chunk (3 on a 3-node cluster survives a node).",
)
@click.option(
    "--max-age",
    type=FloatRange(0, min_open=True),
    default=600.0,
    help="Seconds of audio kept: the replay window.",
)
@click.option("--storage", type=click.Choice(["file", "memory"]), default="file")
@click.option(
    "--source-domain",
    "sources",
    multiple=True,
    help="Central stream: source the same stream from this JetStream domain (one per edge site).",
)
@click.option("--domain", default=None, help="JetStream domain to create the stream in.")
@click.option("--token", default=None, help="NATS auth token, if the servers require one.")
@user_errors
def nats_init(
    relay_url: str,
    stream: str,
    subject_prefix: str,
    replicas: str,
    max_age: float,
    storage: Literal["file", "memory"],
    sources: tuple[str, ...],
    domain: str | None,
    token: str | None,
) -> None:
    """Create (or update) the JetStream stream with explicit settings."""
    from .jetstream.admin import init_stream
    from .jetstream.mapping import NatsSettings

    check_url(relay_url)
    if "?" in relay_url:
        raise ConfigError("nats init takes its settings from its flags, not from URL options")
    settings = NatsSettings(
        stream=stream,
        prefix=subject_prefix,
        replicas=int(replicas),
        max_age=max_age,
        storage=storage,
        domain=domain or None,
    )
    said = run_async(init_stream(relay_url, settings, sources=sources, token=token or ""), "auto")
    click.echo(said)
