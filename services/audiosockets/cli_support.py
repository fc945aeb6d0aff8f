"""What every ``audiosockets`` command shares: error mapping, configuration, the loop.

- ``user_errors``: our errors become one line on stderr and their exit status
  (``ConfigError``: 2); anything else is a bug and shows as one.
- ``configure``: the one path a command's configuration is built and validated.
- ``run_async``: every command's coroutine runs here, on the ``--loop`` asked for.
- ``choice``: ``click.Choice`` from a ``Literal`` alias.
- ``option_group``: several options declared once, handed to the command as one value;
  ``service_options``: the loop and metrics endpoint of a service, as one ``ServiceRuntime``.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar, get_args, runtime_checkable

import click

from . import loops
from .errors import AudiosocketsError, ConfigError
from .loops import LoopName as LoopName
from .metrics_http import MetricsEndpoint
from .urls import parse_url

P = ParamSpec("P")
T = TypeVar("T")
C = TypeVar("C")
V = TypeVar("V")

#: Exit codes (beyond the error classes' own): 130 after Ctrl-C.
EXIT_INTERRUPTED = 130


def fail(message: str, code: int = 1) -> None:
    """One clear line on stderr, then exit ``code``. The message may quote a peer
    (a relay's refusal): control characters are escaped (``untrusted.escape``)."""
    from .untrusted import escape

    click.echo(f"audiosockets: error: {escape(message)}", err=True)
    sys.exit(code)


def user_errors(func: Callable[P, T]) -> Callable[P, T]:
    """Map our errors to one line and a named exit code; no tracebacks.

    Only ``AudiosocketsError`` is a user error (``ConfigError``: exit 2). Any
    other exception is a bug and shows as one, with its traceback.
    """

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return func(*args, **kwargs)
        except AudiosocketsError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            sys.exit(EXIT_INTERRUPTED)
        raise AssertionError("unreachable")

    return wrapper


@runtime_checkable
class Validated(Protocol):
    """A config object that checks its fields as a whole (raises ``ConfigError``)."""

    def validate(self) -> None: ...


def configure(factory: Callable[P, C], /, *args: P.args, **kwargs: P.kwargs) -> C:
    """The one path a command's configuration goes through: build it, validate it.

    Calls ``factory`` (a config class) and then its ``validate()`` if it has one.
    A ``ValueError`` raised there is the config rejecting a value (the relay's
    ``RelayConfig`` and ``Limits`` still raise ``ValueError``) and becomes a
    ``ConfigError`` (exit status 2); a ``ValueError`` anywhere else is a bug.
    """
    try:
        config = factory(*args, **kwargs)
        if isinstance(config, Validated):
            config.validate()
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return config


class FloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses ``nan`` and ``inf``: click parses
    both, ``nan`` passes every bound, and either would reach a service as a
    duration or a size (an ``int(inf)`` traceback, a relay that fails every
    handshake). Every float flag of every command uses this one."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def choice(alias: Any) -> click.Choice[str]:
    """A ``click.Choice`` of the values of a ``Literal`` alias (one list, in the code)."""
    return click.Choice(get_args(alias))


def run_async(coro: Coroutine[Any, Any, T], loop: LoopName = "auto") -> T:
    """Run ``coro`` on uvloop when available (or asked for), else asyncio (see ``loops``)."""
    return loops.run(coro, loop)


def listen_address(value: str) -> tuple[str, int]:
    address = parse_url(value)
    return address.host, address.port


def format_status(report: dict[str, Any]) -> str:
    from .untrusted import quote_blank as q

    def names(values: list[str]) -> str:
        return ", ".join(q(v) for v in values) or "-"

    lines = [
        f"relay {report['server']} {report['version']}, up {report['uptime_s']} s, "
        f"replay {report['replay_seconds']} s, queue {report['queue_seconds']} s",
        "",
        f"{'STREAM':<24} {'FORMAT':<22} {'PUBLISHER':<16} {'RATE/s':>8} {'LAST SEQ':>10} {'WINDOW s':>9}  SUBSCRIBERS",
    ]
    for s in report["streams"]:
        fmt = s["format"]
        fmt_text = f"{fmt['rate']} Hz {fmt['channels']}ch {fmt['sample_type']}"
        publisher = "-" if s["publisher"] is None else q(s["publisher"])
        lines.append(
            f"{q(s['name']):<24} {fmt_text:<22} {publisher:<16} {s['rate_chunks_per_s']:>8} "
            f"{s['last_seq']:>10} {s['window_seconds']:>9}  {names(s['subscribers'])}"
        )
    if not report["streams"]:
        lines.append("(no streams)")
    lines += [
        "",
        f"{'SUBSCRIBER':<24} {'PATTERN':<12} {'GROUP':<12} {'LAG':>6} {'DROPPED':>8}  STREAMS",
    ]
    for sub in report["subscribers"]:
        lines.append(
            f"{q(sub['name']):<24} {q(sub['pattern']):<12} {q(sub['group']) if sub['group'] else '-':<12} "
            f"{sub['lag_chunks']:>6} {sub['dropped']:>8}  {names(sub['streams'])}"
        )
    if not report["subscribers"]:
        lines.append("(no subscribers)")
    for name, group in report["groups"].items():
        lines.append("")
        lines.append(f"group {q(name)}: members {names(group['members'])}")
        for stream, member in group["assignment"].items():
            lines.append(f"  {q(stream)} -> {q(member)}")
    drops = report["drops"]
    lines.append("")
    lines.append(
        "drops: " + (", ".join(f"{k}={int(v)}" for k, v in sorted(drops.items())) or "none")
    )
    return "\n".join(lines)


#: The relay's limits against runaway and hostile clients (README, "Limits"):
#: flag, type, default, help; each becomes the ``RelayConfig`` field of its name.
RELAY_LIMITS: list[tuple[str, click.ParamType[Any], float, str]] = [
    (
        "--max-window-memory",
        click.IntRange(1 << 20),
        256 << 20,
        "Bytes all replay windows may hold together; beyond it the oldest audio of the "
        "largest window goes first (counted window_memory_exceeded).",
    ),
    (
        "--max-input-bytes",
        click.IntRange(64),
        8 << 20,
        "Bytes all connections may hold of frames not yet complete; beyond it the "
        "connection holding the most is cut.",
    ),
    (
        "--frame-timeout",
        FloatRange(0, min_open=True),
        10.0,
        "Seconds a frame may take from its first byte to its last.",
    ),
    (
        "--max-capture-ahead",
        FloatRange(0, min_open=True),
        300.0,
        "Seconds a chunk's capture time may be ahead of the relay's clock.",
    ),
    (
        "--max-capture-age",
        FloatRange(0, min_open=True),
        3650 * 86400.0,
        "Seconds a chunk's capture time may be behind the relay's clock.",
    ),
    ("--max-streams", click.IntRange(1), 1024, "Stream names held at once."),
    ("--max-streams-per-publisher", click.IntRange(1), 64, "Names one publisher may declare."),
    ("--stream-grace-seconds", FloatRange(0), 60.0, "Keep an abandoned empty stream."),
    ("--max-sessions", click.IntRange(1), 1024, "Connections at once (below the fd limit)."),
    ("--max-sessions-per-address", click.IntRange(1), 256, "Connections from one address."),
    ("--idle-timeout", FloatRange(0, min_open=True), 60.0, "Close sessions holding nothing."),
    ("--max-write-buffer-bytes", click.IntRange(1), 4 << 20, "Replies queued to a non-reader."),
    ("--status-interval", FloatRange(0), 1.0, "Least seconds between STATUS replies."),
    (
        "--max-inflight-seconds",
        FloatRange(0, min_open=True),
        1.0,
        "Audio written to a subscriber, not yet acknowledged.",
    ),
]


def relay_limit_options(func: Callable[P, T]) -> Callable[P, T]:
    for flag, kind, default, help in reversed(RELAY_LIMITS):
        func = click.option(flag, type=kind, default=default, show_default=True, help=help)(func)
    return func


# --- options shared by several commands --------------------------------------

F = TypeVar("F", bound=Callable[..., object])


class OptionDecorator(Protocol):
    """What ``click.option(...)`` returns: adds one option to a command function."""

    def __call__(self, func: F, /) -> F: ...


def option_group(
    into: str,
    build: Callable[..., V],
    options: Sequence[OptionDecorator],
    *,
    reads: tuple[str, ...] = (),
) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Declare ``options`` (in help order) and hand the command one value for them.

    When the command runs, the options' values (named as ``build``'s positional
    parameters; keyword-only ones are not options) are taken out of its keyword
    arguments and ``build(**values)`` becomes the keyword argument ``into``. The
    names in ``reads`` (another option's value, e.g. ``relay_url``) are passed to
    ``build`` too and left to the command. A parameter of ``build`` that is not
    in ``options`` is an option the command declares elsewhere in its help.
    ``build`` validates, before the command's body runs; its errors end the
    command as the body's would (``user_errors``: ``ConfigError`` is one line,
    exit 2).
    """
    names = [
        name
        for name, param in inspect.signature(build).parameters.items()
        if param.kind is param.POSITIONAL_OR_KEYWORD and name not in reads
    ]
    checked_build = user_errors(build)

    def decorate(func: Callable[P, T]) -> Callable[P, T]:
        command: Callable[..., T] = func

        @functools.wraps(func)
        def wrapper(*args: object, **kwargs: object) -> T:
            values = {name: kwargs.pop(name) for name in names}
            values.update({name: kwargs[name] for name in reads})
            kwargs[into] = checked_build(**values)
            return command(*args, **kwargs)

        decorated: Callable[..., T] = wrapper
        for option in reversed(options):
            decorated = option(decorated)
        return decorated

    return decorate


def metrics_port_option(default: int) -> OptionDecorator:
    """``--metrics-port`` with the service's own default port."""
    return click.option(
        "--metrics-port",
        type=click.IntRange(0, 65535),
        default=default,
        help="Serve Prometheus metrics on this port (0 disables).",
    )


def relay_option(
    help: str, default: str = "tcp://127.0.0.1:7400"
) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """``--relay URL`` (stored as ``relay_url``): ``tcp://``, ``tls://`` or ``nats://``."""
    return click.option("--relay", "relay_url", default=default, help=help)


loop_option = click.option(
    "--loop",
    "loop_name",
    type=choice(LoopName),
    default="auto",
    help="Event loop implementation.",
)

_FILE = click.Path(dir_okay=False, path_type=Path)


def file_option(flag: str, help: str) -> OptionDecorator:
    """An optional ``FILE`` option: a ``Path`` (not read yet), None when not given."""
    return click.option(flag, type=_FILE, default=None, help=help)


# --- a service's event loop and metrics endpoint -----------------------------------


@dataclass(frozen=True, slots=True)
class ServiceRuntime:
    """How a service command runs: its event loop and where it serves metrics.

    ``metrics_port``: 0 serves none. ``metrics``: ``--metrics-host`` (None: the
    service's default) and the TLS files, read when the command calls
    ``metrics.context()`` (unusable files: ConfigError).
    """

    loop: LoopName
    metrics_port: int
    metrics: MetricsEndpoint


def service_runtime(
    metrics_port: int,
    loop_name: LoopName,
    metrics_host: str | None,
    metrics_tls_cert: Path | None,
    metrics_tls_key: Path | None,
    metrics_tls_client_ca: Path | None,
) -> ServiceRuntime:
    """The ``ServiceRuntime`` of its options, as given (nothing to refuse yet)."""
    endpoint = MetricsEndpoint(
        metrics_host, metrics_tls_cert, metrics_tls_key, metrics_tls_client_ca
    )
    return ServiceRuntime(loop_name, metrics_port, endpoint)


def service_options(
    *, metrics_port: int | None, metrics_host: str
) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """``--metrics-port``, ``--loop``, ``--metrics-host`` and
    ``--metrics-tls-cert/-key/-client-ca``, handed to the command as one
    ``runtime: ServiceRuntime``.

    ``metrics_port``: the service's default port; None when the command declares
    ``--metrics-port`` itself elsewhere in its help (``metrics_port_option``: the
    relay's stands by ``--listen``). ``metrics_host`` is the default the help
    names; the command resolves a missing host (the relay: its ``--listen`` host).
    """
    options: list[OptionDecorator] = [
        loop_option,
        click.option(
            "--metrics-host",
            default=None,
            help=f"Address to serve metrics on (default: {metrics_host}; "
            "0.0.0.0 or :: for every interface).",
        ),
        file_option("--metrics-tls-cert", "Serve metrics over HTTPS."),
        file_option("--metrics-tls-key", "Key of --metrics-tls-cert."),
        file_option(
            "--metrics-tls-client-ca", "Require scrapers' client certificates signed by this CA."
        ),
    ]
    if metrics_port is not None:
        options.insert(0, metrics_port_option(metrics_port))
    return option_group("runtime", service_runtime, options)
