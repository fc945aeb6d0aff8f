"""The command line's security options (TLS files, token files) and ``certs``.

Kept apart from ``cli.py`` so each command takes the same options through one
decorator and turns them into the same objects:

* ``client_tls_options``: ``--tls-ca``, ``--tls-cert``, ``--tls-key`` for
  clients (``record``, ``process``, ``status``, ``loadtest``);
  ``client_tls(relay_url, ...)`` builds the ``ssl.SSLContext`` (None for
  ``tcp://``) and refuses TLS files given for a ``tcp://`` relay.
* ``token_file_option``: ``--token-file FILE``; ``read_token`` picks the
  token from ``--token``, ``--token-file`` or their environment variables.
  A token typed on the command line is visible to every local user
  (``/proc/PID/cmdline``): prefer the file or the variable.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click

from .cli_support import user_errors
from .errors import ConfigError
from .urls import parse_url

P = ParamSpec("P")
T = TypeVar("T")


_FILE = click.Path(dir_okay=False, path_type=Path)


def client_tls_options(func: Callable[P, T]) -> Callable[P, T]:
    """``--tls-ca``, ``--tls-cert``, ``--tls-key`` (PEM files) for a client command."""
    func = click.option(
        "--tls-key",
        type=_FILE,
        default=None,
        help="Key of --tls-cert (PEM; omit when the certificate file holds it).",
    )(func)
    func = click.option(
        "--tls-cert",
        type=_FILE,
        default=None,
        help="Client certificate (PEM) for a relay that requires one (mutual TLS).",
    )(func)
    return click.option(
        "--tls-ca",
        type=_FILE,
        default=None,
        help="CA certificate(s) (PEM) to verify a tls:// relay with "
        "(default: the system's trust store).",
    )(func)


def client_tls(
    relay_url: str, ca: Path | None, cert: Path | None, key: Path | None
) -> ssl.SSLContext | None:
    """The TLS context for ``relay_url``: None for ``tcp://``; ConfigError for a
    ``tcp://`` relay given TLS files, or files that cannot be used."""
    from .tls import client_context
    from .urls import is_nats_url

    files = [flag for flag, v in (("--tls-ca", ca), ("--tls-cert", cert), ("--tls-key", key)) if v]
    if is_nats_url(relay_url):
        if files:
            raise ConfigError(f"{files[0]} is for a tls:// relay; NATS takes ?ca= in its URL")
        return None
    address = parse_url(relay_url)
    if not address.tls:
        given = [
            flag for flag, v in (("--tls-ca", ca), ("--tls-cert", cert), ("--tls-key", key)) if v
        ]
        if given:
            raise ConfigError(
                f"{given[0]} needs a tls:// relay URL (got {address}); "
                f"use tls://{str(address).removeprefix('tcp://')}"
            )
        return None
    return client_context(ca=ca, cert=cert, key=key)


token_file_option = click.option(
    "--token-file",
    type=_FILE,
    default=None,
    help="Read the token from this file (first line; keeps it off the command line).",
)


def read_token(token: str | None, token_file: Path | None) -> str:
    """The token from ``--token`` or ``--token-file`` ("" for none).

    The file's first line, without its line ending; both flags together, an
    unreadable file or an empty one are ConfigErrors.
    """
    if token_file is not None:
        if token:
            raise ConfigError("give --token or --token-file, not both")
        try:
            text = token_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"cannot read token file {token_file}: {reason}") from exc
        lines = text.splitlines()
        first = lines[0].strip() if lines else ""
        if not first:
            raise ConfigError(f"token file {token_file} is empty")
        return first
    return token or ""


def relay_security_options(func: Callable[P, T]) -> Callable[P, T]:
    """The relay's ``--token-file``, ``--credentials``, ``--tls-cert``, ``--tls-key``,
    ``--tls-client-ca``."""
    func = click.option(
        "--tls-client-ca",
        type=_FILE,
        default=None,
        help="Require client certificates signed by this CA (PEM): mutual TLS.",
    )(func)
    func = click.option(
        "--tls-key",
        type=_FILE,
        default=None,
        help="Key of --tls-cert (PEM; omit when the certificate file holds it).",
    )(func)
    func = click.option(
        "--tls-cert",
        type=_FILE,
        default=None,
        help="Serve TLS with this certificate (PEM); clients then use tls://.",
    )(func)
    func = click.option(
        "--credentials",
        type=_FILE,
        default=None,
        help="TOML file of [[client]] identities with roles, streams and groups "
        "(instead of --token); reloaded on SIGHUP.",
    )(func)
    return token_file_option(func)


def relay_tls(
    listen: str, cert: Path | None, key: Path | None, client_ca: Path | None
) -> ssl.SSLContext | None:
    """The relay's TLS context (None: plain TCP). ConfigError for ``tls://``
    without a certificate, a key or client CA without one, or unusable files."""
    from .tls import server_context

    if cert is None:
        if parse_url(listen).tls:
            raise ConfigError(f"--listen {listen} needs --tls-cert and --tls-key")
        if key is not None or client_ca is not None:
            flag = "--tls-key" if key is not None else "--tls-client-ca"
            raise ConfigError(f"{flag} needs --tls-cert (the relay's certificate)")
        return None
    return server_context(cert=cert, key=key, client_ca=client_ca)


def loadtest_security(
    relay_url: str,
    token: str | None,
    token_file: Path | None,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
) -> str:
    """``loadtest``'s token, after checking its TLS files now (exit 2 before any
    process starts). Without ``--relay`` it starts its own open relay: then
    token and TLS options are a ConfigError."""
    secret = read_token(token, token_file)
    if relay_url:
        client_tls(relay_url, ca, cert, key)
    elif secret or ca or cert or key:
        raise ConfigError("--token and --tls-* need --relay (loadtest's own relay has neither)")
    return secret


def metrics_endpoint_options(default_host: str) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """``--metrics-host`` and ``--metrics-tls-cert/-key/-client-ca``, handed to the
    command as one ``metrics_endpoint: MetricsEndpoint`` argument.

    ``default_host`` is said in the help; the command resolves a missing host
    (the relay: its ``--listen`` host). Files are checked when the command
    calls ``context()``.
    """
    from .metrics_http import MetricsEndpoint

    def decorate(func: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            kwargs["metrics_endpoint"] = MetricsEndpoint(
                kwargs.pop("metrics_host"),
                kwargs.pop("metrics_tls_cert"),
                kwargs.pop("metrics_tls_key"),
                kwargs.pop("metrics_tls_client_ca"),
            )
            return func(*args, **kwargs)

        options = [
            click.option(
                "--metrics-host",
                default=None,
                help=f"Address to serve metrics on (default: {default_host}; "
                "0.0.0.0 or :: for every interface).",
            ),
            click.option(
                "--metrics-tls-cert", type=_FILE, default=None, help="Serve metrics over HTTPS."
            ),
            click.option(
                "--metrics-tls-key", type=_FILE, default=None, help="Key of --metrics-tls-cert."
            ),
            click.option(
                "--metrics-tls-client-ca",
                type=_FILE,
                default=None,
                help="Require scrapers' client certificates signed by this CA.",
            ),
        ]
        decorated: Callable[..., T] = wrapper
        for option in reversed(options):
            decorated = option(decorated)
        return decorated

    return decorate


# -- audiosockets certs ---------------------------------------------------------


@click.group()
def certs() -> None:
    """Make a site's TLS certificates (needs the `certs` extra: cryptography)."""


@certs.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@user_errors
def certs_init(directory: Path) -> None:
    """Create DIRECTORY holding a new site CA: ca.pem, and ca.key (mode 0600)."""
    from .certs import init_site

    issued = init_site(directory)
    click.echo(f"site CA: {issued.cert} (key {issued.key}: keep it secret)")


@certs.command("issue")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("name")
@click.option("--ip", "ips", multiple=True, help="IP address the certificate is for (repeatable).")
@click.option(
    "--dns", multiple=True, help="Host name the certificate is for (repeatable; default NAME)."
)
@user_errors
def certs_issue(directory: Path, name: str, ips: tuple[str, ...], dns: tuple[str, ...]) -> None:
    """Issue DIRECTORY/NAME.pem and NAME.key (mode 0600), signed by the site CA.

    One certificate serves a relay (give the --dns/--ip clients connect to)
    or a client (mutual TLS).
    """
    from .certs import issue

    issued = issue(directory, name, ips=ips, dns=dns)
    click.echo(f"certificate: {issued.cert} (key {issued.key})")
