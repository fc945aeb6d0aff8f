"""The group assignment as a pure function: properties over generated groups,
no socket, no event loop."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping

from hypothesis import given, settings
from hypothesis import strategies as st

from audiosockets.relay import assign_streams

ALL_MEMBERS = [f"m{i}" for i in range(6)]
ALL_STREAMS = [f"s{i:02d}" for i in range(14)]
PROPERTY = settings(max_examples=50, deadline=None)  # no deadline: CI machines are shared


class Scenario:
    """Members (live, in join order), the relay's streams, each member's
    pattern as the set of stream names it matches, the assignment in force."""

    def __init__(
        self,
        members: list[str],
        streams: list[str],
        eligible: dict[str, frozenset[str]],
        current: dict[str, str],
    ) -> None:
        self.members = members
        self.streams = streams
        self.eligible = eligible
        self.current = current

    def matches(self, member: str, stream: str) -> bool:
        return stream in self.eligible[member]

    def assign(self, current: Mapping[str, str] | None = None) -> dict[str, str]:
        return assign_streams(
            self.members, self.streams, self.current if current is None else current, self.matches
        )

    def __repr__(self) -> str:
        return (
            f"Scenario(members={self.members}, streams={self.streams}, "
            f"eligible={self.eligible}, current={self.current})"
        )


@st.composite
def scenarios(draw: st.DrawFn, *, one_pattern: bool = False) -> Scenario:
    members = draw(st.lists(st.sampled_from(ALL_MEMBERS), unique=True, max_size=6))
    streams = draw(st.lists(st.sampled_from(ALL_STREAMS), unique=True, max_size=14))
    if one_pattern:
        pattern = frozenset(draw(st.sets(st.sampled_from(ALL_STREAMS))))
        eligible = dict.fromkeys(ALL_MEMBERS, pattern)
    else:
        eligible = {m: frozenset(draw(st.sets(st.sampled_from(ALL_STREAMS)))) for m in ALL_MEMBERS}
    # The assignment in force may name gone members, gone streams, and owners
    # whose pattern no longer matches.
    current = draw(st.dictionaries(st.sampled_from(ALL_STREAMS), st.sampled_from(ALL_MEMBERS)))
    return Scenario(members, streams, eligible, current)


def loads(assignment: Mapping[str, str], members: list[str]) -> Counter[str]:
    counts = Counter(dict.fromkeys(members, 0))
    counts.update(assignment.values())
    return counts


def balanced(s: Scenario, assignment: Mapping[str, str]) -> bool:
    """No member could hand a stream to one at least two lighter that matches it."""
    load = loads(assignment, s.members)
    return not any(
        load[a] - load[b] > 1 and s.matches(b, name)
        for name, a in assignment.items()
        for b in s.members
    )


def kept(s: Scenario) -> dict[str, str]:
    """The part of the current assignment that may stand: live owner, known
    stream, pattern still matches."""
    return {
        n: m for n, m in s.current.items() if n in s.streams and m in s.members and s.matches(m, n)
    }


@PROPERTY
@given(scenarios())
def test_every_matching_stream_goes_to_exactly_one_live_member_that_matches(s: Scenario) -> None:
    result = s.assign()
    wanted = {n for n in s.streams if any(s.matches(m, n) for m in s.members)}
    assert set(result) == wanted  # a dict: one owner each
    for name, owner in result.items():
        assert owner in s.members
        assert s.matches(owner, name)
    assert list(result) == sorted(result)


@PROPERTY
@given(scenarios())
def test_no_member_could_give_a_stream_to_one_two_lighter(s: Scenario) -> None:
    assert balanced(s, s.assign())


@PROPERTY
@given(scenarios(one_pattern=True))
def test_with_one_pattern_loads_are_within_one(s: Scenario) -> None:
    result = s.assign()
    if s.members:
        load = loads(result, s.members)
        assert max(load.values()) - min(load.values()) <= 1


@PROPERTY
@given(scenarios(), st.randoms(use_true_random=False))
def test_deterministic_whatever_the_iteration_order(s: Scenario, rnd: random.Random) -> None:
    first = s.assign()
    streams = list(s.streams)
    rnd.shuffle(streams)
    items = list(s.current.items())
    rnd.shuffle(items)
    shuffled = assign_streams(s.members, set(streams), dict(items), s.matches)
    assert list(shuffled.items()) == list(first.items())
    assert s.assign() == first


@PROPERTY
@given(scenarios())
def test_sticky_a_valid_balanced_assignment_stands(s: Scenario) -> None:
    once = s.assign()
    assert s.assign(once) == once  # idempotent
    current = kept(s)
    wanted = {n for n in s.streams if any(s.matches(m, n) for m in s.members)}
    if set(current) == wanted and balanced(s, current):
        assert s.assign() == current


@PROPERTY
@given(scenarios())
def test_streams_move_only_between_members_whose_loads_call_for_it(s: Scenario) -> None:
    """A kept stream moves only to a member that ends up no busier than its
    old owner (never to even out what was already even)."""
    result = s.assign()
    after = loads(result, s.members)
    for name, owner in kept(s).items():
        if result[name] != owner:
            assert after[owner] >= after[result[name]]


@PROPERTY
@given(scenarios(one_pattern=True))
def test_with_one_pattern_as_few_moves_as_balance_allows(s: Scenario) -> None:
    result = s.assign()
    stay = kept(s)
    moved = sum(1 for name, owner in stay.items() if result[name] != owner)
    wanted = [n for n in s.streams if s.members and s.matches(s.members[0], n)]
    if not s.members:
        assert result == {}
        return
    # The best any assignment can do: r members may hold q+1 streams, the
    # others q; give the larger allowance to those that kept the most.
    q, r = divmod(len(wanted), len(s.members))
    held = sorted(loads(stay, s.members).values(), reverse=True)
    can_keep = sum(min(h, q + 1 if i < r else q) for i, h in enumerate(held))
    assert moved == len(stay) - can_keep


@PROPERTY
@given(scenarios(one_pattern=True), st.data())
def test_members_leaving_hand_their_streams_to_the_others(s: Scenario, data: st.DataObject) -> None:
    before = s.assign()
    leaving = set(data.draw(st.sets(st.sampled_from(s.members)) if s.members else st.just(set())))
    staying = [m for m in s.members if m not in leaving]
    after = assign_streams(staying, s.streams, before, s.matches)
    if staying:
        assert set(after) == set(before)
    else:
        assert after == {}
    for name, owner in before.items():
        if owner in staying:
            assert after[name] == owner, "a staying member's stream moved"
        elif staying:
            assert after[name] in staying


def test_ties_go_to_the_member_that_joined_first() -> None:
    result = assign_streams(["b", "a"], ["s1", "s2", "s3"], {}, lambda m, n: True)
    assert result == {"s1": "b", "s2": "a", "s3": "b"}


def test_a_joining_member_takes_the_last_streams_by_name_from_the_busiest() -> None:
    current = dict.fromkeys(["s1", "s2", "s3", "s4"], "a")
    result = assign_streams(["a", "b"], current, current, lambda m, n: True)
    assert result == {"s1": "a", "s2": "a", "s3": "b", "s4": "b"}


def test_balance_looks_past_a_busiest_member_that_cannot_give() -> None:
    """a holds streams only it matches; b can still even out with c."""
    eligible = {"a": {"x1", "x2", "x3", "x4"}, "b": {"y1", "y2", "y3"}, "c": {"y1", "y2", "y3"}}
    current = {"x1": "a", "x2": "a", "x3": "a", "x4": "a", "y1": "b", "y2": "b", "y3": "b"}
    result = assign_streams(["a", "b", "c"], current, current, lambda m, n: n in eligible[m])
    assert sorted(n for n, m in result.items() if m == "c") == ["y3"]
    assert sorted(n for n, m in result.items() if m == "b") == ["y1", "y2"]
