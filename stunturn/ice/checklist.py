"""Candidate pairs, their states and the one table of transitions (RFC 8445 section 6.1.2).

Every state change goes through :func:`advance`, which looks the (state, event) up in
:data:`TRANSITIONS` and logs the change once; anything not in the table is a bug.

::

    Frozen --unfreeze/trigger--> Waiting --check--> In-Progress --success--> Succeeded
                                    ^                    |
                                    +------trigger-------+--failure--> Failed --trigger--> Waiting
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import StrEnum

from ..stun import Address
from ..stun.transaction import ClientTransaction
from .candidate import Candidate

log = logging.getLogger("stunturn.ice")


class PairState(StrEnum):
    FROZEN = "frozen"
    WAITING = "waiting"
    IN_PROGRESS = "in-progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class PairEvent(StrEnum):
    UNFREEZE = "unfreeze"
    """Its foundation is unblocked (section 6.1.2.6 / 7.2.5.3.3)."""
    CHECK = "check"
    """An ordinary or triggered check is sent."""
    SUCCESS = "success"
    FAILURE = "failure"
    """Timeout, unrecoverable error, or a non-symmetric response (section 7.2.5.2)."""
    TRIGGER = "trigger"
    """A check arrived from the peer over this pair: check it back soon (section 7.3.1.4)."""


S, E = PairState, PairEvent
TRANSITIONS: dict[tuple[PairState, PairEvent], PairState] = {
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
"""(state, event) -> next state. A nomination or consent check on a Succeeded pair keeps it
Succeeded (consent loss is handled by the agent, not as a pair state)."""
del S, E


@dataclass(frozen=True, slots=True)
class LocalCandidate:
    """A candidate we gathered, with the base it is sent from.

    ``base_id`` names the I/O endpoint (a socket, or a TURN allocation for relayed
    candidates); ``base`` is its address. For host candidates base == address; for
    server-reflexive ones the base is the host socket's address (section 5.1.1.1).
    """

    candidate: Candidate
    base_id: int
    base: Address


@dataclass(slots=True, eq=False)
class Pair:
    """A candidate pair and its check state."""

    local: LocalCandidate
    remote: Candidate
    priority: int
    state: PairState = PairState.FROZEN
    nominated: bool = False
    """The controlling side nominated it (USE-CANDIDATE) and that check succeeded."""
    use_candidate_seen: bool = False
    """Controlled side: a check with USE-CANDIDATE arrived for this pair."""
    transaction: ClientTransaction | None = None
    nominating: bool = False
    """The check in flight carries USE-CANDIDATE."""
    rtt: float | None = None
    valid_local: LocalCandidate | None = None
    """The local candidate the success revealed (peer-reflexive when it differs)."""
    history: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[int, Address]:
        """Pairs are unique per (local base, remote address)."""
        return (self.local.base_id, self.remote.address)

    @property
    def foundation(self) -> str:
        return f"{self.local.candidate.foundation}:{self.remote.foundation}"

    def describe(self) -> str:
        loc, rem = self.local.candidate, self.remote
        return f"{loc.type} {loc.host}:{loc.port} -> {rem.type} {rem.host}:{rem.port}"


def pair_priority(controlling: bool, local_priority: int, remote_priority: int) -> int:
    """RFC 8445 section 6.1.2.3: 2^32*MIN(G,D) + 2*MAX(G,D) + (G>D?1:0)."""
    g, d = (local_priority, remote_priority) if controlling else (remote_priority, local_priority)
    return (min(g, d) << 32) + 2 * max(g, d) + (1 if g > d else 0)


def advance(pair: Pair, event: PairEvent) -> None:
    """Apply one transition from :data:`TRANSITIONS`; an illegal one is a bug."""
    new = TRANSITIONS.get((pair.state, event))
    if new is None:
        raise AssertionError(f"illegal ICE pair transition {pair.state} + {event}")
    if new is not pair.state:
        log.debug("pair %s: %s -> %s (%s)", pair.describe(), pair.state, new, event)
        pair.history.append(f"{pair.state}->{new}:{event}")
        pair.state = new
