"""The NATS JetStream binding: ``Publisher``/``Subscriber`` over a JetStream stream.

Same public API and guarantees as ``audiosockets.client`` (ARCHITECTURE.md,
"Client library contract"); the mapping is PROTOCOL.md, "Second binding".
Needs the ``nats`` extra (nats-py). Modules: ``mapping`` (pure: subjects,
headers, settings), ``connection`` (the reconnecting link), ``publisher``,
``reader`` (one disposable pull consumer), ``subscriber``, ``groups``
(membership and assignment in key-value buckets), ``admin`` (init, status),
``lag`` (each consumer's ``num_pending``, polled off the hot path).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import admin
from .mapping import NatsSettings
from .publisher import JetStreamPublisher, JetStreamStream
from .subscriber import JetStreamSubscriber

if TYPE_CHECKING:  # mypy holds the JetStream classes to the client library's seams
    from ..client import ChunkSubscription, SpoolingStream

    def _seams(
        stream: JetStreamStream, sub: JetStreamSubscriber
    ) -> tuple[SpoolingStream, ChunkSubscription]:
        return stream, sub


__all__ = [
    "JetStreamPublisher",
    "JetStreamStream",
    "JetStreamSubscriber",
    "NatsSettings",
    "admin",
]
