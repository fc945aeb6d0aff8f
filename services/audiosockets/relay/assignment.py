"""The group assignment as a pure function: no sockets, no asyncio, no clock.

Members of one group share the streams matching their patterns: each such
stream goes to exactly one live member. Ownership is sticky (a handover costs a
resume from the group's last ACK), so streams move only when an owner left or
stopped matching, or when the loads of two members that could swap differ by
more than one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import TypeVar

M = TypeVar("M", bound=Hashable)


def assign_streams(
    members: Sequence[M],
    streams: Iterable[str],
    current: Mapping[str, M],
    matches: Callable[[M, str], bool],
) -> dict[str, M]:
    """The new assignment of ``streams`` to ``members``.

    ``members`` are the group's live members in the order they joined (ties
    go to the earlier one; distinct, hashable); ``streams`` the names of the
    streams the relay knows; ``current`` the assignment in force (stream name
    -> member; entries for gone members or streams are dropped);
    ``matches(member, stream)`` says whether a member's pattern takes a stream.

    Returns a new dict, keys in sorted order, with:
    - every stream some member matches assigned to exactly one member that
      matches it, and no other stream;
    - every current owner that is still a member and still matches kept,
      unless balance needs the stream elsewhere;
    - no two members ``a``, ``b`` with ``load(a) - load(b) > 1`` where ``b``
      matches one of ``a``'s streams (with one pattern for all members: loads
      within one of each other);
    - as few moves of kept streams as that balance allows.
    The result depends only on the values given, not on the iteration order
    of ``streams`` or ``current``. Raises nothing of its own; whatever
    ``matches`` raises propagates.
    """
    order = {m: i for i, m in enumerate(members)}
    loads = dict.fromkeys(members, 0)
    names = sorted(set(streams))
    known = set(names)
    assignment: dict[str, M] = {}
    # Keep what still stands: an owner that is here and still matches.
    for name in sorted(current):
        owner = current[name]
        if name in known and owner in loads and matches(owner, name):
            assignment[name] = owner
            loads[owner] += 1
    # Streams without an owner go to the least loaded member that matches.
    for name in names:
        if name in assignment:
            continue
        eligible = [m for m in members if matches(m, name)]
        if eligible:
            target = min(eligible, key=lambda m: (loads[m], order[m]))
            assignment[name] = target
            loads[target] += 1
    # Even out: move one stream from a busier member to one at least two
    # lighter that matches it, busiest and idlest first, while any such pair
    # exists. Each move lowers the sum of squared loads, so this ends.
    while True:
        move = _next_move(members, loads, assignment, matches)
        if move is None:
            break
        name, target = move
        loads[assignment[name]] -= 1
        loads[target] += 1
        assignment[name] = target
    return {name: assignment[name] for name in sorted(assignment)}


def _next_move(
    members: Sequence[M],
    loads: Mapping[M, int],
    assignment: Mapping[str, M],
    matches: Callable[[M, str], bool],
) -> tuple[str, M] | None:
    """The stream to move and where, or None when balanced. The busiest giver
    first (earliest joined on a tie), to the idlest taker (earliest joined);
    of the giver's streams the taker matches, the last by name."""
    givers = sorted(members, key=lambda m: -loads[m])  # stable: join order on ties
    takers = sorted(members, key=lambda m: loads[m])
    for giver in givers:
        for taker in takers:
            if loads[giver] - loads[taker] <= 1:
                break
            movable = [n for n, m in assignment.items() if m == giver and matches(taker, n)]
            if movable:
                return max(movable), taker
    return None
