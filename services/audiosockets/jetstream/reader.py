"""``Reader``: one ephemeral JetStream pull consumer that never loses its place.

A reader delivers the messages of one filter subject, in stream order, to a
callback, and remembers the stream sequence of the last one (``last``). Whatever
happens to its consumer (the server holding it killed, a leader change, a
reconnect, the consumer deleted for inactivity), it creates a new one starting
at ``last + 1``: the JetStream stream, not the consumer, holds the position, so
a consumer is disposable (no acks, memory storage, one replica).

Flow control is the pull: one request of ``batch`` messages at a time, the next
only after the callback took the previous ones, so a slow application holds at
most one batch here and the rest stays in JetStream. Idle heartbeats in the
pull request tell a quiet stream from a dead connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ..tasks import cancel_and_wait
from .connection import NatsLink

log = logging.getLogger(__name__)

_TRANSIENT = (
    nats.errors.Error,
    nats.js.errors.Error,
    TimeoutError,
    OSError,
)


class Reader:
    """Deliver ``filter_subject`` from stream sequence ``first`` on, forever.

    ``first`` None: from the stream's next message (live). ``deliver`` gets each
    message and its stream sequence; ``restarted`` is called with the sequence
    the new consumer starts at after each consumer (re)creation.
    """

    def __init__(
        self,
        link: NatsLink,
        filter_subject: str,
        deliver: Callable[[Msg, int, int], Awaitable[bool]],
        *,
        first: int | None,
        refused: Callable[[Exception], None] | None = None,
        batch: int = 64,
        heartbeat: float = 1.0,
        expires: float = 5.0,
    ) -> None:
        self.link = link
        self.filter_subject = filter_subject
        self.deliver = deliver
        self.refused = refused or (lambda exc: None)
        self.first = first
        self.last: int | None = None if first is None else first - 1
        #: The first stream sequence this reader was asked for (0: not known yet).
        self.start_seq = first or 0
        self.batch = batch
        self.heartbeat = heartbeat
        self.expires = expires
        self.consumers_created = 0
        self._consumer: str | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def consumer(self) -> str | None:
        """The name of the consumer reading now (None while one is being created)."""
        return self._consumer

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"read {self.filter_subject}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        with contextlib.suppress(Exception):
            await cancel_and_wait(task)
        await self._delete_consumer()

    async def _delete_consumer(self) -> None:
        name, self._consumer = self._consumer, None
        js = self.link.js
        if name is None or js is None or not self.link.connected.is_set():
            return
        with contextlib.suppress(*_TRANSIENT):
            async with asyncio.timeout(1.0):
                await js.delete_consumer(self.link.settings.stream, name)

    async def _create_consumer(self) -> str:
        js = self.link.js
        assert js is not None
        stream = self.link.settings.stream
        if self.last is None:
            info = await js.stream_info(stream)
            self.last = info.state.last_seq
        if self.start_seq == 0:
            self.start_seq = self.last + 1
        name = f"as_{secrets.token_hex(8)}"
        config = ConsumerConfig(
            name=name,
            filter_subject=self.filter_subject,
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.last + 1,
            inactive_threshold=max(30.0, 10 * self.expires),
            mem_storage=True,
            num_replicas=1,
        )
        await js.add_consumer(stream, config)
        self.consumers_created += 1
        return name

    async def _run(self) -> None:
        client = self.link.client
        assert client is not None
        inbox = client.new_inbox()
        # nats-py's next_msg(timeout) costs a task and a wait_for per message; a
        # callback into a queue of our own is read without either while it has
        # messages. Bounded: a full queue holds the callback, then nats-py's own
        # pending limit; the pull keeps it at about one batch anyway.
        arrived: asyncio.Queue[Msg] = asyncio.Queue(maxsize=4 * self.batch)

        async def on_message(msg: Msg) -> None:
            await arrived.put(msg)

        sub = await client.subscribe(inbox, cb=on_message, pending_msgs_limit=4 * self.batch)
        delay = 0.05
        try:
            while True:
                try:
                    self._consumer = await self._create_consumer()
                except _TRANSIENT as exc:
                    refusal = self.link.api_refusal()
                    if refusal is not None:
                        self.refused(refusal)
                        return
                    log.debug("reader %s: cannot create consumer: %s", self.filter_subject, exc)
                    await asyncio.sleep(delay)
                    delay = min(2.0, delay * 2)
                    continue
                delay = 0.05
                await self._pull(arrived, inbox, self._consumer)
                await self._delete_consumer()
        finally:
            with contextlib.suppress(*_TRANSIENT):
                await sub.unsubscribe()

    async def _pull(self, arrived: asyncio.Queue[Msg], inbox: str, name: str) -> None:
        """Pull until the consumer is lost (then return, to create another)."""
        client = self.link.client
        js = self.link.js
        assert client is not None
        assert js is not None
        api = f"{getattr(js, '_prefix', '$JS.API')}.CONSUMER.MSG.NEXT.{self.link.settings.stream}.{name}"
        request = json.dumps(
            {
                "batch": self.batch,
                "expires": int(self.expires * 1e9),
                "idle_heartbeat": int(self.heartbeat * 1e9),
            }
        ).encode()
        outstanding = 0
        silent = 0
        while True:
            if outstanding <= 0:
                try:
                    await client.publish(api, request, reply=inbox)
                except _TRANSIENT:
                    await asyncio.sleep(0.1)
                    continue
                outstanding = self.batch
            try:
                msg = arrived.get_nowait()
            except asyncio.QueueEmpty:
                msg = None
            try:
                if msg is None:
                    async with asyncio.timeout(3 * self.heartbeat):
                        msg = await arrived.get()
            except TimeoutError:
                # No message and no heartbeat: the request or the consumer is lost.
                silent += 1
                outstanding = 0
                if not self.link.connected.is_set():
                    continue
                try:
                    async with asyncio.timeout(2 * self.heartbeat):
                        await js.consumer_info(self.link.settings.stream, name)
                except nats.js.errors.NotFoundError:
                    return
                except _TRANSIENT:
                    if silent >= 3:
                        return
                continue
            silent = 0
            status = msg.headers.get("Status") if msg.headers else None
            if status is not None:
                if status == "100":
                    continue
                outstanding = 0
                if status in ("404", "408"):  # the request ended: ask again
                    continue
                description = (msg.headers or {}).get("Description", "")
                if status == "503" or "deleted" in description.lower():
                    return  # no consumer answers (the server holding it restarted): a new one
                # 409 leadership change, max waiting, ...: ask again, without spinning
                log.debug("reader %s: %s %s", self.filter_subject, status, description)
                await asyncio.sleep(self.heartbeat / 10)
                continue
            outstanding -= 1
            try:
                seq = msg.metadata.sequence.stream
            except ValueError:
                continue
            if self.last is not None and seq <= self.last:
                continue  # from a request to an earlier consumer
            if not await self.deliver(msg, seq, self.start_seq):
                # The consumer skipped a message before this one: a new consumer
                # reads again from after the last message taken.
                await asyncio.sleep(self.heartbeat / 2)
                return
            self.last = seq
