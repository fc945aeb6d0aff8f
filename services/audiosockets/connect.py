"""One place that turns a ``--relay`` URL into a publisher, subscriber or status.

``tcp://`` goes to the relay binding (``client.Publisher``/``Subscriber``),
``nats://`` and ``nats+tls://`` to the JetStream binding (``jetstream``), which needs
the ``nats`` extra. The recorder, the processor, ``status`` and ``loadtest``
construct their clients here, so both bindings serve every command unchanged.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .urls import is_nats_url

if TYPE_CHECKING:
    from .client import Publisher, Subscriber
    from .jetstream import JetStreamPublisher, JetStreamSubscriber

#: Keyword arguments only the relay binding has (socket and frame tuning).
_RELAY_ONLY = ("limits", "max_batch_bytes", "socket_buffer_bytes", "tls")


def _jetstream() -> Any:
    try:
        from . import jetstream
    except ImportError as exc:  # nats-py missing
        raise ConfigError(
            f"nats:// URLs need the nats extra (pip install 'audiosockets[nats]'): {exc}"
        ) from exc
    return jetstream


def connect_publisher(url: str, **kwargs: Any) -> Publisher | JetStreamPublisher:
    """A publisher for ``url`` (not started); keyword arguments as ``client.Publisher``."""
    if is_nats_url(url):
        for key in _RELAY_ONLY:
            kwargs.pop(key, None)
        publisher: JetStreamPublisher = _jetstream().JetStreamPublisher(url, **kwargs)
        return publisher
    from .client import Publisher

    return Publisher(url, **kwargs)


def connect_subscriber(
    url: str, pattern: str = "*", **kwargs: Any
) -> Subscriber | JetStreamSubscriber:
    """A subscriber for ``url`` (not started); keyword arguments as ``client.Subscriber``."""
    if is_nats_url(url):
        for key in _RELAY_ONLY:
            kwargs.pop(key, None)
        subscriber: JetStreamSubscriber = _jetstream().JetStreamSubscriber(url, pattern, **kwargs)
        return subscriber
    from .client import Subscriber

    return Subscriber(url, pattern, **kwargs)


async def fetch_status(
    url: str, *, timeout: float = 5.0, token: str = "", tls: ssl.SSLContext | None = None
) -> dict[str, Any]:
    """The status report of a relay, or of a JetStream stream and its groups.
    ``tls``: the relay binding's context for ``tls://`` (``tls.client_context``)."""
    if is_nats_url(url):
        report: dict[str, Any] = await _jetstream().admin.fetch_status(
            url, timeout=timeout, token=token
        )
        return report
    from .client import fetch_status as relay_status

    return await relay_status(url, timeout=timeout, token=token, tls=tls)
