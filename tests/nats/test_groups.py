"""(c) A group of three archive processors (child processes) shares six streams,
each stream on exactly one member; one member is SIGKILLed mid-stream and the
archive still holds every chunk of every stream, sample for sample. Plus the
assignment rule itself, as a pure function."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats_harness import NatsServer, ProcessMember, archived_chunks

from _support import wait_until
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.connect import connect_publisher, fetch_status
from audiosockets.jetstream.groups import plan_assignment

FMT = AudioFormat(16000, 1, SampleType.INT16)
BLOCK = 320
STREAMS = [f"g-{i}" for i in range(6)]


def block_of(stream: int, seq: int) -> np.ndarray:
    return np.random.default_rng(stream * 100_000 + seq).integers(
        -30000, 30000, BLOCK, dtype=np.int16
    )


async def assignment(url: str) -> dict[str, list[str]]:
    try:
        report = await fetch_status(url, timeout=2)
    except Exception:
        return {}
    for group in report["groups"]:
        if group["name"] == "archive":
            members: dict[str, list[str]] = group["members"]
            return members
    return {}


@pytest.mark.slow
async def test_group_of_three_survives_a_member_sigkill(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    url = nats_server.url
    members = [ProcessMember(f"m{i}", url, archive, tmp_path, "g-*") for i in range(3)]
    pub = connect_publisher(url, name="rec")
    streams = [pub.stream(name, FMT) for name in STREAMS]
    sent = 0

    async def publish(rounds: int) -> None:
        nonlocal sent
        for _ in range(rounds):
            for i, s in enumerate(streams):
                s.send(block_of(i, sent), captured_ns=1_700_000_000_000_000_000 + sent * 20_000_000)
            sent += 1
            await asyncio.sleep(0.02)  # pacing the producer at real time, not waiting

    try:
        for m in members:
            m.start()
        await pub.start()
        await publish(50)
        current: dict[str, list[str]] = {}

        async def balanced(n_members: int) -> bool:
            nonlocal current
            current = await assignment(url)
            owned = Counter(s for streams_ in current.values() for s in streams_)
            return (
                len(current) == n_members
                and sorted(owned) == STREAMS
                and set(owned.values()) == {1}
                and {len(v) for v in current.values()} == {6 // n_members}
            )

        await _poll(lambda: balanced(3), 30, "three members with two streams each")
        await publish(100)
        members[1].kill()
        await publish(100)
        await _poll(lambda: balanced(2), 30, "the killed member's streams handed over")
        await publish(50)
        assert await pub.flush(10)
        held = await every_chunk_archived(archive, STREAMS, sent)
    finally:
        await pub.close()
        codes = [m.stop() for m in members]
    assert_archive_exact(held, STREAMS, sent)
    # -9 after stop(): SIGTERM did not end the member within 60 s.
    unclean = {
        m.name: (code, m.log.read_text()[-3000:])
        for m, code in zip(members, codes, strict=True)
        if m is not members[1] and code != 0
    }
    assert not unclean, "\n".join(f"{n} exited {c}:\n{log}" for n, (c, log) in unclean.items())


async def _poll(check: object, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.2)


# --- the assignment rule ------------------------------------------------------------

names = st.text("abcdef", min_size=1, max_size=3)


@given(
    members=st.dictionaries(names, st.sampled_from(["*", "a*", "b*", "?"]), max_size=5),
    streams=st.sets(names, max_size=12),
    current=st.dictionaries(names, names, max_size=6),
)
def test_plan_gives_each_stream_to_one_matching_member(
    members: dict[str, str], streams: set[str], current: dict[str, str]
) -> None:
    from fnmatch import fnmatchcase

    plan = plan_assignment(members, streams, current)
    for s in streams:
        matching = [m for m, p in members.items() if fnmatchcase(s, p)]
        if matching:
            assert plan[s] in matching
        else:
            assert s not in plan
    assert set(plan) <= streams
    assert plan_assignment(members, streams, plan) == plan  # stable: nothing moves twice


@given(n_members=st.integers(1, 6), n_streams=st.integers(0, 30), joined=st.integers(0, 3))
def test_plan_is_balanced_and_sticky_with_one_pattern(
    n_members: int, n_streams: int, joined: int
) -> None:
    members = {f"m{i}": "*" for i in range(n_members)}
    streams = [f"s{i}" for i in range(n_streams)]
    plan = plan_assignment(members, streams, {})
    loads = Counter(plan.values())
    assert max(loads.values(), default=0) - min((loads.get(m, 0) for m in members), default=0) <= 1
    grown = dict(members, **{f"n{i}": "*" for i in range(joined)})
    after = plan_assignment(grown, streams, plan)
    moved = [s for s in streams if after[s] != plan[s]]
    # Only what balance requires moves, and only to the newcomers.
    assert all(after[s].startswith("n") for s in moved)
    loads = Counter(after.values())
    assert max(loads.values(), default=0) - min((loads.get(m, 0) for m in grown), default=0) <= 1


async def every_chunk_archived(
    archive: Path, streams: list[str], sent: int
) -> dict[str, dict[int, bytes]]:
    """Wait until the group archive holds chunks 0..``sent``-1 of every stream;
    returns them by stream and seq. On timeout the error names what is missing."""
    held: dict[str, dict[int, bytes]] = {}

    def complete() -> bool:
        nonlocal held
        held = archived_chunks(archive, BLOCK * 2)
        return all(len(held.get(s, {})) >= sent for s in streams)

    try:
        await wait_until(complete, timeout=120, what="every chunk archived")
    except AssertionError as exc:
        missing = {s: sorted(set(range(sent)) - set(held.get(s, {}))) for s in streams}
        summary = ", ".join(f"{s}: {len(m)} ({m[:3]}..{m[-3:]})" for s, m in missing.items() if m)
        raise AssertionError(f"{exc}; missing: {summary}") from None
    return held


def assert_archive_exact(held: dict[str, dict[int, bytes]], streams: list[str], sent: int) -> None:
    """Every stream's archive is chunks 0..``sent``-1, each sample for sample as sent."""
    for i, s in enumerate(streams):
        assert sorted(held[s]) == list(range(sent)), s
        for seq in range(sent):
            assert held[s][seq] == block_of(i, seq).tobytes(), (s, seq)
