"""``watch_lag``: how far behind each of a subscriber's consumers is, off the hot path.

Every ``interval`` seconds one task asks the server for the consumer info of
each reader's current consumer (``js.consumer_info``: one request per reader,
one reader at a time, each bounded by ``timeout``) and sets
``audiosockets_jetstream_consumer_pending_chunks`` to its ``num_pending``: the
messages JetStream holds for that consumer and has not delivered yet. The cost
is therefore one small request per stream a group member owns (one in all for
a fan-out subscriber) per interval, whatever the audio rate.

The readers' consumers use no acks (reader.py), so JetStream's redelivery and
ack-pending counts are always 0 and are not exported; what a processor holds
after delivery is ``audiosockets_queue_depth_chunks``.

State: the gauge's children, one per reader key still read (a group member's
stream that moved away loses its series; while the link is down there are
none: the lag is unknown, not what it was). A reader whose consumer is being
(re)created, or a failed request, leaves the last value as it was for up to
``STALE_ROUNDS - 1`` rounds; after ``STALE_ROUNDS`` such rounds in a row its
series is removed until a request succeeds again (a server too busy to answer
must not leave a lag frozen on the dashboard). A fault in a round is logged and
the next round runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

import nats.errors
import nats.js.errors

from ..metrics import Metrics
from ..tasks import cancel_and_wait
from .connection import NatsLink
from .reader import Reader

log = logging.getLogger(__name__)

_FAILED = (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError)
#: Rounds in a row without a lag for a reader before its series is removed.
STALE_ROUNDS = 3


async def poll_lag(
    link: NatsLink,
    readers: Mapping[str, Reader],
    label: Callable[[str], str],
    metrics: Metrics,
    *,
    timeout: float = 2.0,
) -> set[str]:
    """One round: every reader's ``num_pending`` into the gauge; returns the
    labels set this round (a reader whose request failed keeps its value)."""
    js = link.js
    seen: set[str] = set()
    if js is None or not link.connected.is_set():
        return seen
    for key, reader in list(readers.items()):
        consumer = reader.consumer
        if consumer is None:
            continue
        try:
            async with asyncio.timeout(timeout):
                info = await js.consumer_info(link.settings.stream, consumer)
        except _FAILED as exc:  # a consumer being replaced, a server restarting
            log.debug("consumer info of %s: %s", consumer, exc)
            continue
        name = label(key)
        metrics.jetstream_pending.labels(name).set(info.num_pending or 0)
        seen.add(name)
    return seen


async def watch_lag(
    link: NatsLink,
    readers: Mapping[str, Reader],
    label: Callable[[str], str],
    metrics: Metrics,
    *,
    interval: float,
) -> None:
    """``poll_lag`` every ``interval`` seconds, forever; series of readers that
    are gone, or without a lag for ``STALE_ROUNDS`` rounds in a row, are removed."""
    exported: set[str] = set()
    missed: dict[str, int] = {}  # rounds in a row without a lag, per exported series
    while True:
        seen: set[str] = set()
        try:
            seen = await poll_lag(link, readers, label, metrics, timeout=min(2.0, interval))
        except Exception:  # a fault of ours must not freeze the gauge silently
            log.exception("polling the consumers' lag failed; trying again in %g s", interval)
        exported |= seen
        for name in exported:
            missed[name] = 0 if name in seen else missed.get(name, 0) + 1
        # Disconnected, the lag is unknown: no series rather than a stale one.
        current = {label(key) for key in list(readers)} if link.connected.is_set() else set()
        for name in exported:
            if name not in current or missed[name] >= STALE_ROUNDS:
                with contextlib.suppress(KeyError):
                    metrics.jetstream_pending.remove(name)
                missed.pop(name, None)
        exported &= set(missed)
        await asyncio.sleep(interval)


def start_watching(
    link: NatsLink, readers: Mapping[str, Reader], pattern: str, metrics: Metrics
) -> asyncio.Task[None] | None:
    """``watch_lag`` for a subscriber's readers (keyed by stream; ``""``: the
    fan-out reader, labelled ``pattern``), or None with ``lag_interval`` 0."""
    interval = link.settings.lag_interval
    if interval <= 0:
        return None
    return asyncio.create_task(
        watch_lag(link, readers, lambda key: key or pattern, metrics, interval=interval),
        name=f"lag {link.name}",
    )


async def stop_watching(task: asyncio.Task[None] | None) -> None:
    await cancel_and_wait(task)
