"""A JetStream ``Reader`` stops when told to, even when a message lands in the same
loop turn as the cancellation (no nats-server: a scripted link).

On Python 3.11 ``asyncio.wait_for`` returns a result that completed in the
cancelled turn and drops the ``CancelledError``; the reader then went on to hand
the message to a hand-off queue nobody read any more, and ``stop()`` (and the
processor's exit after SIGTERM) waited forever. CI saw it as a group member that
SIGTERM did not end within 60 s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest

from audiosockets.jetstream.reader import Reader


class ScriptedLink:
    """What ``Reader`` uses of ``NatsLink``: a client whose inbox the test feeds."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.connected.set()
        self.settings = SimpleNamespace(stream="AUDIO")
        self.inbox_cb: Callable[[Any], Awaitable[None]] | None = None
        self.pulls = asyncio.Event()
        self.client = SimpleNamespace(
            new_inbox=lambda: "_INBOX.test",
            subscribe=self._subscribe,
            publish=self._publish,
        )
        self.js = SimpleNamespace(
            add_consumer=self._ok, delete_consumer=self._ok, consumer_info=self._ok
        )

    async def _subscribe(self, subject: str, *, cb: Any, pending_msgs_limit: int) -> Any:
        self.inbox_cb = cb
        return SimpleNamespace(unsubscribe=self._ok)

    async def _publish(self, subject: str, payload: bytes, *, reply: str) -> None:
        self.pulls.set()

    async def _ok(self, *args: object, **kwargs: object) -> None:
        return None

    def api_refusal(self) -> None:
        return None


def message(stream_seq: int) -> SimpleNamespace:
    return SimpleNamespace(
        headers=None, metadata=SimpleNamespace(sequence=SimpleNamespace(stream=stream_seq))
    )


@pytest.mark.parametrize("turns", range(6))
async def test_stop_ends_the_reader_when_a_message_arrives_with_the_cancellation(
    turns: int,
) -> None:
    link = ScriptedLink()
    delivered: list[int] = []
    never = asyncio.Event()

    async def deliver(msg: Any, stream_seq: int, start: int) -> bool:
        delivered.append(stream_seq)
        await never.wait()  # the application stopped reading: its queue stays full
        return True

    reader = Reader(link, "audio.s.a", deliver, first=1)  # type: ignore[arg-type]
    reader.start()
    await asyncio.wait_for(link.pulls.wait(), 5)
    await asyncio.sleep(0.01)  # the reader waits for its inbox now
    assert link.inbox_cb is not None
    arrival = asyncio.ensure_future(link.inbox_cb(message(1)))
    for _ in range(turns):
        await asyncio.sleep(0)
    task = reader._task
    assert task is not None
    stopping = asyncio.ensure_future(reader.stop())
    done, _ = await asyncio.wait({stopping}, timeout=5)
    assert done, f"Reader.stop() still waiting 5 s later (delivered {delivered})"
    assert task.done()
    await arrival
