"""The command line's security options (TLS files, token files) and ``certs``.

Kept apart from ``cli.py`` so each command takes the same options through one
decorator and turns them into the same objects:

* ``client_auth_options``: ``--token``, ``--token-file``, ``--tls-ca``,
  ``--tls-cert``, ``--tls-key`` for clients (``record``, ``process``,
  ``status``, ``loadtest``), handed to the command as one ``auth: ClientAuth``:
  the token (``read_token``) and the ``ssl.SSLContext`` for its ``--relay``
  (``client_tls``: None for ``tcp://``; TLS files given for a ``tcp://`` relay
  are refused). A token typed on the command line is visible to every local
  user (``/proc/PID/cmdline``): prefer the file or the variable.
* ``relay_security_options``: the relay's token file, credentials and TLS files.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

import click

from .cli_support import OptionDecorator, file_option, option_group, user_errors
from .errors import ConfigError
from .urls import parse_url

P = ParamSpec("P")
T = TypeVar("T")


token_file_option = file_option(
    "--token-file", "Read the token from this file (first line; keeps it off the command line)."
)


# -- clients: --token, --token-file, --tls-ca, --tls-cert, --tls-key --------------


@dataclass(frozen=True, slots=True)
class ClientAuth:
    """What a client command presents to its relay, built once from its options.

    ``token``: the HELLO token ("" for none). ``tls``: the context for a
    ``tls://`` relay (None for ``tcp://``, NATS, or no relay). ``tls_ca``,
    ``tls_cert``, ``tls_key``: the files as given (None: not given), for a
    config that crosses into child processes and builds its own context there.
    """

    token: str
    tls: ssl.SSLContext | None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None


def client_auth(
    relay_url: str,
    token: str | None,
    token_file: Path | None,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    *,
    own_relay: bool = False,
) -> ClientAuth:
    """The token (``read_token``), then the TLS context for ``relay_url``
    (``client_tls``); their ConfigErrors as they say.

    ``own_relay`` (loadtest): an empty ``relay_url`` means the command starts
    its own open relay; then a token or TLS file is a ConfigError.
    """
    secret = read_token(token, token_file)
    if own_relay and not relay_url:
        if secret or tls_ca or tls_cert or tls_key:
            raise ConfigError("--token and --tls-* need --relay (loadtest's own relay has neither)")
        return ClientAuth(secret, None)
    tls = client_tls(relay_url, tls_ca, tls_cert, tls_key)
    return ClientAuth(secret, tls, tls_ca, tls_cert, tls_key)


CLIENT_AUTH_OPTIONS: list[OptionDecorator] = [
    click.option("--token", default=None, help="Shared secret, if the relay requires one."),
    token_file_option,
    file_option(
        "--tls-ca",
        "CA certificate(s) (PEM) to verify a tls:// relay with "
        "(default: the system's trust store).",
    ),
    file_option(
        "--tls-cert", "Client certificate (PEM) for a relay that requires one (mutual TLS)."
    ),
    file_option("--tls-key", "Key of --tls-cert (PEM; omit when the certificate file holds it)."),
]


def client_auth_options(*, own_relay: bool = False) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """``--token``, ``--token-file``, ``--tls-ca``, ``--tls-cert``, ``--tls-key``,
    handed to the command as one ``auth: ClientAuth`` for its ``relay_url``.

    ``own_relay``: an empty ``--relay`` means the command's own relay (see
    ``client_auth``). Errors (ConfigError, exit 2) come before the command runs.
    """
    build = functools.partial(client_auth, own_relay=own_relay)
    return option_group("auth", build, CLIENT_AUTH_OPTIONS, reads=("relay_url",))


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
        if files:
            raise ConfigError(
                f"{files[0]} needs a tls:// relay URL (got {address}); "
                f"use tls://{str(address).removeprefix('tcp://')}"
            )
        return None
    return client_context(ca=ca, cert=cert, key=key)


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
    options = [
        token_file_option,
        file_option(
            "--credentials",
            "TOML file of [[client]] identities with roles, streams and groups "
            "(instead of --token); reloaded on SIGHUP.",
        ),
        file_option(
            "--tls-cert", "Serve TLS with this certificate (PEM); clients then use tls://."
        ),
        file_option(
            "--tls-key", "Key of --tls-cert (PEM; omit when the certificate file holds it)."
        ),
        file_option(
            "--tls-client-ca", "Require client certificates signed by this CA (PEM): mutual TLS."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


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
