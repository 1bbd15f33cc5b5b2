"""The candidate pair state table (RFC 8445 section 6.1.2.6 / 7.2.5) and pair priorities
(section 6.1.2.3)."""

from __future__ import annotations

import itertools
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stunturn.ice import (
    TRANSITIONS,
    Candidate,
    CandidateType,
    LocalCandidate,
    Pair,
    PairEvent,
    PairState,
    candidate_priority,
    pair_priority,
)
from stunturn.ice.checklist import advance

S, E = PairState, PairEvent


def make_pair(state: PairState = S.FROZEN) -> Pair:
    local = Candidate("1", 1, "udp", candidate_priority(CandidateType.HOST), "10.0.0.1", 5000,
                      CandidateType.HOST)  # fmt: skip
    remote = Candidate("2", 1, "udp", candidate_priority(CandidateType.SRFLX), "203.0.113.9",
                       6000, CandidateType.SRFLX)  # fmt: skip
    pair = Pair(LocalCandidate(local, 7, ("10.0.0.1", 5000)), remote, 1, state)
    return pair


EXPECTED: dict[tuple[PairState, PairEvent], PairState] = {
    (S.FROZEN, E.UNFREEZE): S.WAITING,
    (S.FROZEN, E.TRIGGER): S.WAITING,
    (S.WAITING, E.UNFREEZE): S.WAITING,
    (S.WAITING, E.TRIGGER): S.WAITING,
    (S.WAITING, E.CHECK): S.IN_PROGRESS,
    (S.IN_PROGRESS, E.UNFREEZE): S.IN_PROGRESS,
    (S.IN_PROGRESS, E.TRIGGER): S.IN_PROGRESS,
    (S.IN_PROGRESS, E.CHECK): S.IN_PROGRESS,
    (S.IN_PROGRESS, E.SUCCESS): S.SUCCEEDED,
    (S.IN_PROGRESS, E.FAILURE): S.FAILED,
    (S.FAILED, E.TRIGGER): S.WAITING,
    (S.FAILED, E.UNFREEZE): S.FAILED,
    (S.SUCCEEDED, E.UNFREEZE): S.SUCCEEDED,
    (S.SUCCEEDED, E.TRIGGER): S.SUCCEEDED,
    (S.SUCCEEDED, E.CHECK): S.SUCCEEDED,
    (S.SUCCEEDED, E.SUCCESS): S.SUCCEEDED,
    (S.SUCCEEDED, E.FAILURE): S.SUCCEEDED,
}


def test_table_is_exactly_the_documented_one() -> None:
    """The table holds exactly the transitions of RFC 8445's pair state machine as this agent
    uses it (nomination and consent checks keep a Succeeded pair Succeeded)."""
    assert TRANSITIONS == EXPECTED


@pytest.mark.parametrize(("state", "event"), sorted(TRANSITIONS))
def test_every_listed_transition(state: PairState, event: PairEvent) -> None:
    """advance() moves each listed (state, event) to the table's state and records real changes
    in the pair's history."""
    pair = make_pair(state)
    advance(pair, event)
    assert pair.state is TRANSITIONS[(state, event)]
    if pair.state is state:
        assert pair.history == []
    else:
        assert pair.history == [f"{state}->{pair.state}:{event}"]


ILLEGAL = sorted(set(itertools.product(PairState, PairEvent)) - set(TRANSITIONS))


def test_illegal_combinations_exist() -> None:
    """Sanity: the forbidden moves include the ones that would hide bugs."""
    for combo in [
        (S.FROZEN, E.CHECK),  # a check must come from Waiting
        (S.FROZEN, E.SUCCESS),
        (S.WAITING, E.SUCCESS),
        (S.WAITING, E.FAILURE),
        (S.FAILED, E.SUCCESS),
        (S.FAILED, E.CHECK),
    ]:
        assert combo in ILLEGAL


@pytest.mark.parametrize(("state", "event"), ILLEGAL)
def test_every_other_combination_raises(state: PairState, event: PairEvent) -> None:
    """Anything not in the table is a bug: AssertionError, and the pair is left alone."""
    pair = make_pair(state)
    with pytest.raises(AssertionError, match="illegal ICE pair transition"):
        advance(pair, event)
    assert pair.state is state and pair.history == []


def test_each_change_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """A change is logged once at debug level; a self-loop is not logged."""
    pair = make_pair()
    with caplog.at_level(logging.DEBUG, logger="stunturn.ice"):
        advance(pair, E.UNFREEZE)
        advance(pair, E.UNFREEZE)
        advance(pair, E.CHECK)
        advance(pair, E.TRIGGER)
        advance(pair, E.SUCCESS)
    messages = [r.getMessage() for r in caplog.records if r.name == "stunturn.ice"]
    assert len(messages) == 3
    assert "frozen -> waiting" in messages[0] and "(unfreeze)" in messages[0]
    assert pair.history == [
        "frozen->waiting:unfreeze",
        "waiting->in-progress:check",
        "in-progress->succeeded:success",
    ]


def test_pair_identity() -> None:
    """Pairs are keyed by (local base, remote address); the foundation joins both foundations."""
    pair = make_pair()
    assert pair.key == (7, ("203.0.113.9", 6000))
    assert pair.foundation == "1:2"
    assert pair.describe() == "host 10.0.0.1:5000 -> srflx 203.0.113.9:6000"


# --- pair priority ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("controlling", "local", "remote", "expected"),
    [
        # G is the controlling agent's candidate priority, D the controlled agent's.
        (True, 10, 20, (10 << 32) + 2 * 20 + 0),
        (True, 20, 10, (10 << 32) + 2 * 20 + 1),
        (False, 10, 20, (10 << 32) + 2 * 20 + 1),  # G = remote = 20 > D = 10
        (False, 20, 10, (10 << 32) + 2 * 20 + 0),
        (True, 7, 7, (7 << 32) + 14),
        (False, 7, 7, (7 << 32) + 14),
        (True, 2**31 - 1, 2**31 - 1, ((2**31 - 1) << 32) + 2 * (2**31 - 1)),
    ],
)
def test_pair_priority_formula(controlling: bool, local: int, remote: int, expected: int) -> None:
    """RFC 8445 6.1.2.3: 2^32*MIN(G,D) + 2*MAX(G,D) + (G>D?1:0)."""
    assert pair_priority(controlling, local, remote) == expected


priorities = st.integers(1, 2**31 - 1)
"""RFC 8445 5.1.2.1: a candidate priority is a positive integer between 1 and 2**31 - 1."""


@given(priorities, priorities)
def test_both_agents_compute_the_same_pair_priority(a: int, b: int) -> None:
    """The controlling agent (local a, remote b) and the controlled agent (local b, remote a)
    agree on every pair's priority, so both order their check lists alike."""
    assert pair_priority(True, a, b) == pair_priority(False, b, a)


@given(priorities, priorities)
def test_tie_bit_breaks_swapped_pairs(a: int, b: int) -> None:
    """Swapping G and D changes only the tie bit: the pair where the controlling side has the
    higher priority ranks just above."""
    if a == b:
        assert pair_priority(True, a, b) == pair_priority(True, b, a)
    else:
        hi, lo = max(a, b), min(a, b)
        assert pair_priority(True, hi, lo) == pair_priority(True, lo, hi) + 1


@given(priorities, priorities, priorities, priorities)
def test_minimum_dominates(a: int, b: int, c: int, d: int) -> None:
    """A pair whose weaker candidate is stronger always ranks higher; with candidate priorities
    below 2**31 the pair priority fits in 64 bits."""
    p, q = pair_priority(True, a, b), pair_priority(True, c, d)
    assert 0 <= p < 2**64 and 0 <= q < 2**64
    if min(a, b) > min(c, d):
        assert p > q
