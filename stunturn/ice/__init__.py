"""Sans-IO ICE (RFC 8445): candidates, the check list and its state table, the agent."""

from .agent import (
    CHECK_POLICY,
    MAX_EARLY_CHECKS,
    IceAgent,
    IceState,
    SendDatagram,
    new_password,
    new_ufrag,
)
from .candidate import (
    Candidate,
    CandidateError,
    CandidateType,
    candidate_priority,
    foundation,
    from_sdp,
    local_preference,
)
from .checklist import TRANSITIONS, LocalCandidate, Pair, PairEvent, PairState, pair_priority

__all__ = [
    "CHECK_POLICY",
    "MAX_EARLY_CHECKS",
    "TRANSITIONS",
    "Candidate",
    "CandidateError",
    "CandidateType",
    "IceAgent",
    "IceState",
    "LocalCandidate",
    "Pair",
    "PairEvent",
    "PairState",
    "SendDatagram",
    "candidate_priority",
    "foundation",
    "from_sdp",
    "local_preference",
    "new_password",
    "new_ufrag",
    "pair_priority",
]
