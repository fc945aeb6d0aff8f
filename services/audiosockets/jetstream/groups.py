"""Groups over JetStream: each stream on exactly one live member, sticky, balanced.

NATS has no partitioned consumer of its own (a queue group spreads *messages*
over members, which would split a stream's chunks between processors), so the
group is kept in two JetStream key-value buckets (PROTOCOL.md, "Groups over
JetStream", says why):

- ``<STREAM>_members`` (entries expire after ``member_ttl``): key
  ``<group>.<member>`` = ``{"name", "pattern"}``, re-put every ``member_ttl/4``.
  A member that stops heart-beating (SIGKILL, partition) vanishes by itself.
- ``<STREAM>_groups``: key ``<group>`` = ``{"start_seq", "assignment": {stream:
  member}}``, written only by the leader (the live member with the smallest id)
  with compare-and-set on the revision; keys ``<group>.<stream>`` = the group's
  acknowledged point ``{"seq", "stream_seq", "member", "released"}``, written by
  the stream's owner every ``ack_interval`` and when it lets the stream go.

Each member applies the assignment: it stops reading streams it lost (flushes
their acked point, marked released) and starts streams it gained after the
acked point; while the previous owner is alive and has not released, it waits
(up to ``release_timeout``) so a planned handover does not process twice. The
decision itself is ``plan_assignment``, a pure function.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from ..errors import RemoteProtocolError
from ..tasks import cancel_and_wait
from .mapping import stream_name_of, subject_token

if TYPE_CHECKING:
    from .subscriber import JetStreamSubscriber

log = logging.getLogger(__name__)

_TRANSIENT = (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError)


def plan_assignment(
    members: Mapping[str, str], streams: Iterable[str], current: Mapping[str, str]
) -> dict[str, str]:
    """Which member gets which stream.

    ``members``: member id -> glob pattern. ``current``: the assignment so far.
    Keeps every current pair that is still valid (sticky), gives each other
    stream to the matching member with the fewest streams, then moves streams one
    at a time from a member to a matching one with at least two fewer, until no
    such move exists (with one pattern for all: loads differ by at most one).
    Streams no member matches are left out. Ties go to the smaller id, so every
    member computes the same plan from the same inputs.
    """
    eligible = {
        s: sorted(m for m, pattern in members.items() if fnmatchcase(s, pattern))
        for s in sorted(set(streams))
    }
    plan = {s: m for s, m in current.items() if s in eligible and m in eligible[s]}
    load: Counter[str] = Counter({m: 0 for m in members})
    load.update(plan.values())
    for s, candidates in eligible.items():
        if s not in plan and candidates:
            best = min(candidates, key=lambda m: (load[m], m))
            plan[s] = best
            load[best] += 1
    moved = True
    while moved:  # each move lowers the sum of squared loads: this ends
        moved = False
        for s in sorted(plan):
            owner = plan[s]
            best = min(eligible[s], key=lambda m: (load[m], m))
            if load[best] < load[owner] - 1:
                plan[s] = best
                load[owner] -= 1
                load[best] += 1
                moved = True
    return plan


class GroupMember:
    """One subscriber's membership in its group (runs inside its task)."""

    def __init__(
        self,
        sub: JetStreamSubscriber,
        *,
        ack_interval: float = 0.2,
        release_timeout: float = 5.0,
    ) -> None:
        self.sub = sub
        self.id = f"{subject_token(sub.name)}-{secrets.token_hex(4)}"
        self.group_key = subject_token(sub.group)
        self.ttl = sub.member_ttl
        self.ack_interval = ack_interval
        self.release_timeout = release_timeout
        self.members: dict[str, str] = {}
        self.assignment: dict[str, str] = {}
        self.owned: set[str] = set()
        self._written: dict[str, int] = {}  # stream -> stream_seq last written
        self._waiting_since: dict[str, float] = {}
        self._members_kv: KeyValue | None = None
        self._groups_kv: KeyValue | None = None

    async def _buckets(self) -> tuple[KeyValue, KeyValue]:
        if self._members_kv is None or self._groups_kv is None:
            js = self.sub.link.js
            assert js is not None
            settings = self.sub.settings
            self._members_kv = await _bucket(
                js, settings.members_bucket, ttl=self.ttl, replicas=settings.replicas
            )
            self._groups_kv = await _bucket(
                js, settings.groups_bucket, ttl=None, replicas=settings.replicas
            )
        return self._members_kv, self._groups_kv

    async def run(self) -> None:
        acks = asyncio.create_task(self._ack_loop(), name=f"group acks {self.id}")
        try:
            while True:
                try:
                    await self._step()
                except _TRANSIENT as exc:
                    refusal = self.sub.link.api_refusal()
                    if refusal is not None:
                        raise refusal from exc
                    log.debug("group %s member %s: %s", self.sub.group, self.id, exc)
                await asyncio.sleep(self.ttl / 4)
        finally:
            await cancel_and_wait(acks)

    async def leave(self) -> None:
        """Release every stream (acked points flushed) and drop out of the group."""
        for stream in sorted(self.owned):
            await self._release(stream)
        with contextlib.suppress(*_TRANSIENT, AssertionError):
            members, _ = await self._buckets()
            await members.delete(f"{self.group_key}.{self.id}")

    async def _step(self) -> None:
        members_kv, groups_kv = await self._buckets()
        me = json.dumps({"name": self.sub.name, "pattern": self.sub.pattern}).encode()
        await members_kv.put(f"{self.group_key}.{self.id}", me)
        self.members = await self._read_members(members_kv)
        if self.id == min(self.members, default=self.id):
            await self._lead(groups_kv)
        try:
            entry = await groups_kv.get(self.group_key)
        except nats.js.errors.KeyNotFoundError:
            return
        state = json.loads(entry.value or b"{}")
        self.assignment = dict(state.get("assignment", {}))
        start_seq = int(state.get("start_seq", 1))
        mine = {s for s, m in self.assignment.items() if m == self.id}
        for stream in sorted(self.owned - mine):
            await self._release(stream)
        for stream in sorted(mine - self.owned):
            await self._take(groups_kv, stream, start_seq)

    async def _read_members(self, kv: KeyValue) -> dict[str, str]:
        try:
            keys = await kv.keys()
        except nats.js.errors.NoKeysError:
            keys = []
        prefix = f"{self.group_key}."
        members: dict[str, str] = {}
        for key in keys:
            if not key.startswith(prefix):
                continue
            try:
                entry = await kv.get(key)
                members[key[len(prefix) :]] = json.loads(entry.value or b"{}")["pattern"]
            except (nats.js.errors.KeyNotFoundError, KeyError, ValueError):
                continue
        members[self.id] = self.sub.pattern
        return members

    async def _lead(self, kv: KeyValue) -> None:
        js = self.sub.link.js
        assert js is not None
        settings = self.sub.settings
        info = await js.stream_info(settings.stream, subjects_filter=f"{settings.prefix}.>")
        streams: list[str] = []
        for subject in info.state.subjects or {}:
            with contextlib.suppress(RemoteProtocolError):
                streams.append(stream_name_of(subject.rpartition(".")[2]))
        try:
            entry = await kv.get(self.group_key)
            state = json.loads(entry.value or b"{}")
            revision: int | None = entry.revision
        except nats.js.errors.KeyNotFoundError:
            start = 1 if self.sub.start_name == "earliest" else info.state.last_seq + 1
            state = {"start_seq": start, "assignment": {}}
            revision = None
        current = state.get("assignment", {})
        plan = plan_assignment(self.members, streams, current)
        if plan == current and revision is not None:
            return
        state["assignment"] = plan
        value = json.dumps(state, sort_keys=True).encode()
        try:
            if revision is None:
                await kv.create(self.group_key, value)
            else:
                await kv.update(self.group_key, value, last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return  # another leader wrote first; next round sees it
        moved = sorted(s for s in plan if current.get(s) != plan[s])
        if moved:
            log.info("group %s: %d stream(s) (re)assigned", self.sub.group, len(moved))

    async def _take(self, kv: KeyValue, stream: str, start_seq: int) -> None:
        key = f"{self.group_key}.{subject_token(stream)}"
        point: dict[str, Any] = {}
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            entry = await kv.get(key)
            point = json.loads(entry.value or b"{}")
        previous = point.get("member")
        alive = previous in self.members and previous != self.id
        if alive and not point.get("released"):
            since = self._waiting_since.setdefault(stream, time.monotonic())
            if time.monotonic() - since < self.release_timeout:
                return  # the previous owner is alive: let it finish and release
        self._waiting_since.pop(stream, None)
        sub = self.sub
        if "stream_seq" in point:
            first = int(point["stream_seq"]) + 1
            seq = int(point["seq"])
            if seq > sub.received.get(stream, -1):
                sub.received[stream] = seq
            if seq > sub.acked.get(stream, -1):
                sub.acked[stream] = seq
            sub.acked_stream_seq[stream] = int(point["stream_seq"])
            sub._last_stream_seq[stream] = int(point["stream_seq"])
            self._written[stream] = int(point["stream_seq"])
        else:
            first = start_seq
            sub._last_stream_seq.pop(stream, None)
        sub._unacked_seqs.pop(stream, None)
        self.owned.add(stream)
        sub.assigned.add(stream)
        sub.start_reader(stream, sub.settings.subject(stream), first)
        log.info("group %s: %s takes %r from stream seq %d", sub.group, self.id, stream, first)

    async def _release(self, stream: str) -> None:
        sub = self.sub
        await sub.stop_reader(stream)
        self.owned.discard(stream)
        with contextlib.suppress(*_TRANSIENT, AssertionError):
            await self._write_point(stream, released=True)
        if stream in sub.assigned:
            sub.stream_closed(stream)

    async def _write_point(self, stream: str, *, released: bool = False) -> None:
        sub = self.sub
        stream_seq = sub.acked_stream_seq.get(stream)
        if stream_seq is None:
            if not released:
                return
            value: dict[str, Any] = {"member": self.id, "released": True}
        else:
            value = {
                "seq": sub.acked[stream],
                "stream_seq": stream_seq,
                "member": self.id,
                "released": released,
            }
        _, kv = await self._buckets()
        await kv.put(f"{self.group_key}.{subject_token(stream)}", json.dumps(value).encode())
        if stream_seq is not None:
            self._written[stream] = stream_seq

    async def _ack_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ack_interval)
            for stream in sorted(self.owned):
                seq = self.sub.acked_stream_seq.get(stream)
                if seq is not None and seq != self._written.get(stream):
                    with contextlib.suppress(*_TRANSIENT):
                        await self._write_point(stream)


async def _bucket(js: Any, name: str, *, ttl: float | None, replicas: int) -> KeyValue:
    try:
        kv: KeyValue = await js.key_value(name)
        return kv
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        kv = await js.create_key_value(bucket=name, history=1, ttl=ttl, replicas=replicas)
    except nats.js.errors.BadRequestError:
        kv = await js.key_value(name)  # created by another member in between
    return kv
