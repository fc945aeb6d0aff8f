"""The Subscriber's hand-off: bounded, in order, one wake-up per batch, backpressure."""

from __future__ import annotations

import asyncio

import pytest

from audiosockets.handoff import Handoff


async def test_a_batch_arrives_in_order_after_one_publish() -> None:
    handoff: Handoff[int] = Handoff(8)
    taken: list[int] = []

    async def consume() -> None:
        for _ in range(5):
            taken.append(await handoff.get())

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0)  # one turn of the loop: the consumer is now parked
    for i in range(5):
        handoff.put(i)
    assert taken == []  # nothing is handed over before the batch is published
    handoff.publish()
    await asyncio.wait_for(consumer, 5)
    assert taken == [0, 1, 2, 3, 4]
    assert len(handoff) == 0


async def test_the_bound_is_never_exceeded() -> None:
    handoff: Handoff[int] = Handoff(2)
    handoff.put(1)
    handoff.put(2)
    assert handoff.full()
    with pytest.raises(OverflowError, match="2 items"):
        handoff.put(3)
    assert len(handoff) == 2


async def test_a_full_hand_off_makes_the_reader_wait_until_the_consumer_takes_one() -> None:
    handoff: Handoff[int] = Handoff(2)
    handoff.put(1)
    handoff.put(2)
    handoff.publish()
    waiting = asyncio.create_task(handoff.wait_for_space())
    await asyncio.sleep(0)  # one turn of the loop: the reader is now parked
    assert not waiting.done()
    assert await handoff.get() == 1
    await asyncio.wait_for(waiting, 5)
    handoff.put(3)
    assert [await handoff.get(), await handoff.get()] == [2, 3]


def test_a_hand_off_holds_at_least_one_item() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Handoff(0)
