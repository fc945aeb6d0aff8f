"""Consumer groups: members share streams, one owner per stream.

The assignment itself is computed by ``assign_streams`` (pure); this module
keeps a group's state and applies a new assignment to the subscribers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..protocol import CloseReason, StartPosition
from .assignment import assign_streams
from .plausible import clamp
from .streams import StreamState

if TYPE_CHECKING:
    from .sessions import SubscriberSession
    from .subscriptions import Subscriptions

log = logging.getLogger("audiosockets.relay")


@dataclass(eq=False)
class Group:
    """One consumer group.

    ``members`` in the order they joined; ``assignment`` maps each stream
    name to exactly one member; ``acked`` holds, per stream name, the last
    sequence number the group confirmed with ACK: where a new owner resumes
    after a handover.
    """

    name: str
    members: list[SubscriberSession] = field(default_factory=list)
    assignment: dict[str, SubscriberSession] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)
    #: Relay clock since when the group has had no member (None: it has some).
    #: An empty group keeps its ACKed points for ``stream_grace_seconds``, so
    #: members that all restart at once (a rolling update, a host reboot)
    #: resume where the group left off; then housekeeping forgets it.
    empty_since: float | None = None

    def load(self, member: SubscriberSession) -> int:
        """Number of streams assigned to ``member``."""
        # A copy (one C-level step): the metrics endpoint calls this from its thread.
        return sum(1 for m in list(self.assignment.values()) if m is member)

    def ack(self, member: SubscriberSession, stream: str, seq: int) -> None:
        """Record an ACK of ``seq`` in ``stream``; ignored unless ``member``
        owns the stream and ``seq`` is beyond what the group confirmed. An ACK
        beyond the highest seq sent to ``member`` is clamped to it (counted
        ``ack_beyond_sent``): a forged ACK must not make the next owner skip
        audio nobody received."""
        if self.assignment.get(stream) is not member:
            return
        cursor = member.relay.subscriptions.get(member, stream)
        sent = cursor.after_seq if cursor is not None else -1
        seq = clamp(
            member.relay, "ack_beyond_sent", seq, sent, f"{member.name!r} ACK in {stream!r}"
        )
        if seq > self.acked.get(stream, -1):
            self.acked[stream] = seq

    def rebalance(self, streams: Mapping[str, StreamState], subscriptions: Subscriptions) -> None:
        """Compute the assignment for the live members and apply it: take each
        moved stream from its old owner (CLOSE_STREAM ``unassigned``), then
        attach it to its new owner where the group stands (``start_position``)."""
        members = [m for m in self.members if not m.channel.closed]
        new = assign_streams(members, streams, self.assignment, lambda m, name: m.matches(name))
        # In place: the dict is this group's one assignment, whoever holds it.
        self.assignment.clear()
        self.assignment.update(new)
        for member in members:
            for name in subscriptions.streams_of(member):
                if self.assignment.get(name) is not member:
                    member.unassign(streams[name], CloseReason.UNASSIGNED)
        for name, owner in self.assignment.items():
            if subscriptions.get(owner, name) is None:
                after, earliest = self.start_position(name)
                log.info(
                    "group %r: stream %r -> %r (after seq %s%s)",
                    self.name,
                    name,
                    owner.name,
                    after,
                    ", earliest held" if earliest else "",
                )
                owner.attach(streams[name], after, earliest=earliest)

    def leave(
        self,
        member: SubscriberSession,
        streams: Mapping[str, StreamState],
        subscriptions: Subscriptions,
        now: float,
    ) -> None:
        """``member`` left: the others take over its streams. With none left the
        group keeps its ACKs for the grace period from ``now`` (relay clock,
        seconds; ``expiry.forget_empty_groups``)."""
        with contextlib.suppress(ValueError):
            self.members.remove(member)
        if self.members:
            self.rebalance(streams, subscriptions)
        else:
            self.assignment.clear()
            self.empty_since = now

    def start_position(self, stream: str) -> tuple[int | None, bool]:
        """Where a new owner of ``stream`` starts: ``(after_seq, earliest)``.

        ``after_seq`` is the group's last ACK; after a relay restart (no ACKs
        yet) the furthest resume point any member brought, since the previous
        owner may be another member than the new one; None when there is none.
        A group whose members come back with resume points (or reconnecting,
        which asks for EARLIEST) existed before the relay did: a stream none of
        them knows was owned by a member not back yet, so ``earliest`` says to
        start at the oldest chunk held rather than lose the chunks since its
        last ACK (at-least-once, never a silent gap).
        """
        after = self.acked.get(stream)
        if after is None:
            points = [m.resume[stream] for m in self.members if stream in m.resume]
            after = max(points) if points else None
        earliest = after is None and any(
            m.resume or (m.subscription and m.subscription.start is StartPosition.EARLIEST)
            for m in self.members
        )
        return after, earliest
