"""The sans-IO ICE agent (RFC 8445, RFC 7675), driven by hand-built datagrams and a stepped clock.

Our agent is "A" (ufrag ``aufr``); the peer "B" (ufrag ``bufr``) is either played by hand (checks
and answers built here) or by a second agent joined back to back by :class:`Wire`.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aioice import stun as astun
from aioice.candidate import candidate_priority as aio_priority
from ice_sim import BusyLoop

from stunturn.ice import (
    CHECK_POLICY,
    MAX_EARLY_CHECKS,
    Candidate,
    CandidateType,
    IceAgent,
    IceState,
    LocalCandidate,
    Pair,
    PairState,
    SendDatagram,
    candidate_priority,
    foundation,
    pair_priority,
)
from stunturn.stun import (
    Address,
    Attribute,
    Message,
    MessageClass,
    Method,
    UnknownAttribute,
    check_fingerprint,
    check_integrity,
    decode,
    short_term_key,
)
from stunturn.stun.attributes import (
    ErrorCode,
    Fingerprint,
    IceControlled,
    IceControlling,
    MessageIntegrity,
    Priority,
    UnknownAttributes,
    UseCandidate,
    Username,
    XorMappedAddress,
)

A_UFRAG, A_PASSWORD = "aufr", "a-password-0123456789abcd"
B_UFRAG, B_PASSWORD = "bufr", "b-password-0123456789abcd"
A_ADDR: Address = ("192.0.2.1", 5000)
B_ADDR: Address = ("192.0.2.2", 6000)
HOST = CandidateType.HOST


def cand(
    address: Address,
    kind: CandidateType = HOST,
    local_pref: int = 65535,
    found: str | None = None,
    related: Address | None = None,
) -> Candidate:
    host, port = address
    return Candidate(
        found or foundation(kind, host),
        1,
        "udp",
        candidate_priority(kind, local_pref),
        host,
        port,
        kind,
        None if related is None else related[0],
        None if related is None else related[1],
    )


def local(address: Address = A_ADDR, base_id: int = 0, local_pref: int = 65535) -> LocalCandidate:
    return LocalCandidate(cand(address, local_pref=local_pref), base_id, address)


def agent(
    controlling: bool = True,
    *,
    tie_breaker: int = 100,
    locals_: tuple[LocalCandidate, ...] = (),
    remotes: tuple[Candidate, ...] = (),
    ended: bool = True,
    **kwargs: float,
) -> IceAgent:
    """Agent A with fixed credentials, its candidates and B's; not started."""
    a = IceAgent(
        controlling,
        ufrag=A_UFRAG,
        password=A_PASSWORD,
        tie_breaker=tie_breaker,
        rng=random.Random(7),
        **kwargs,  # type: ignore[arg-type]
    )
    a.set_remote_credentials(B_UFRAG, B_PASSWORD)
    for lc in locals_ or (local(),):
        assert a.add_local_candidate(lc, 0.0) == []
    for rc in remotes:
        assert a.add_remote_candidate(rc, 0.0) == []
    if ended:
        a.end_of_local_candidates()
        a.end_of_remote_candidates()
    return a


def only(out: list[SendDatagram]) -> SendDatagram:
    assert len(out) == 1, out
    return out[0]


def msg_of(dgram: SendDatagram) -> Message:
    return decode(dgram.data)


def answer(
    dgram: SendDatagram,
    mapped: Address | None = None,
    *,
    password: str = B_PASSWORD,
    error: int | None = None,
) -> bytes:
    """B's answer to one of A's checks (signed with B's password, as B would)."""
    request = msg_of(dgram)
    if error is not None:
        response = Message(Method.BINDING, MessageClass.ERROR, request.transaction_id)
        response.attributes.append(ErrorCode(error, "x"))
    else:
        response = Message(Method.BINDING, MessageClass.SUCCESS, request.transaction_id)
        response.attributes.append(XorMappedAddress(*(mapped or A_ADDR)))
    return response.encode(short_term_key(password), fingerprint=True)


def peer_check(
    *,
    username: str | None = f"{A_UFRAG}:{B_UFRAG}",
    password: str | None = A_PASSWORD,
    priority: int | None = candidate_priority(CandidateType.PRFLX),
    controlling: bool = False,
    tie_breaker: int = 200,
    use_candidate: bool = False,
    fingerprint: bool = True,
    extra: tuple[Attribute, ...] = (),
) -> bytes:
    """A check from B to A, built by hand."""
    msg = Message(Method.BINDING, MessageClass.REQUEST)
    if username is not None:
        msg.attributes.append(Username(username))
    if priority is not None:
        msg.attributes.append(Priority(priority))
    msg.attributes.append(
        IceControlling(tie_breaker) if controlling else IceControlled(tie_breaker)
    )
    if use_candidate:
        msg.attributes.append(UseCandidate())
    msg.attributes.extend(extra)
    key = None if password is None else short_term_key(password)
    return msg.encode(key, fingerprint=fingerprint)


def response_to(out: list[SendDatagram], destination: Address) -> Message:
    """The one response A sent to ``destination``."""
    responses = [
        msg_of(d)
        for d in out
        if d.destination == destination and msg_of(d).cls is not MessageClass.REQUEST
    ]
    assert len(responses) == 1, out
    return responses[0]


def checks(out: list[SendDatagram]) -> list[SendDatagram]:
    return [d for d in out if msg_of(d).cls is MessageClass.REQUEST]


def pair_to(a: IceAgent, remote: Address, base_id: int = 0) -> Pair:
    return a.pairs[(base_id, remote)]


R1: Address = ("203.0.113.1", 7001)
R2: Address = ("203.0.113.2", 7002)
R3: Address = ("203.0.113.3", 7003)
R4: Address = ("203.0.113.4", 7004)


def four_remotes() -> tuple[Candidate, ...]:
    """Distinct foundations, priorities falling from R1 to R4."""
    return tuple(cand(r, local_pref=60000 - 1000 * i) for i, r in enumerate((R1, R2, R3, R4)))


# --- pair formation -----------------------------------------------------------------------------


def test_pairs_formed_per_family_and_srflx_replaced_by_base() -> None:
    """Pairs join candidates of one family; a server-reflexive local candidate is not paired
    itself (its base, the host candidate, is), so no redundant pairs exist (RFC 8445 6.1.2.4)."""
    v6: Address = ("2606:4700::10", 5000)
    srflx = LocalCandidate(
        cand(("198.51.100.1", 40000), CandidateType.SRFLX, related=A_ADDR), 0, A_ADDR
    )
    srflx6 = LocalCandidate(cand(("2606:4700::99", 1), CandidateType.SRFLX, related=v6), 1, v6)
    remote6 = cand(("2606:4700::20", 6000))
    a = agent(
        locals_=(local(), srflx, LocalCandidate(cand(v6), 1, v6), srflx6),
        remotes=(cand(B_ADDR), remote6, cand(R1, CandidateType.SRFLX)),
    )
    assert set(a.pairs) == {(0, B_ADDR), (0, R1), (1, remote6.address)}
    assert {p.local.candidate.type for p in a.pairs.values()} == {HOST}
    for pair in a.pairs.values():
        assert pair.priority == pair_priority(
            True, pair.local.candidate.priority, pair.remote.priority
        )


def test_unusable_and_duplicate_remote_candidates_ignored() -> None:
    """TCP candidates, host names and a second candidate at a known address form no pairs."""
    tcp = Candidate("9", 1, "tcp", 1, "203.0.113.9", 9, HOST)
    mdns = Candidate("8", 1, "udp", 1, "abc.local", 9, HOST)
    twin = cand(B_ADDR, CandidateType.SRFLX)
    a = agent(remotes=(cand(B_ADDR), tcp, mdns, twin))
    assert list(a.pairs) == [(0, B_ADDR)]
    assert a.remote_candidates == [cand(B_ADDR)]


def test_initial_states_one_waiting_per_foundation() -> None:
    """RFC 8445 6.1.2.6: in each foundation the best pair starts Waiting, the others Frozen."""
    same_hi = cand(R1, local_pref=60000, found="F")
    same_lo = cand(R2, local_pref=50000, found="F")
    other = cand(R3, local_pref=40000, found="G")
    a = agent(remotes=(same_hi, same_lo, other))
    assert pair_to(a, R1).state is PairState.WAITING
    assert pair_to(a, R2).state is PairState.FROZEN
    assert pair_to(a, R3).state is PairState.WAITING


def test_success_unfreezes_its_foundation() -> None:
    """RFC 8445 7.2.5.3.3: a success unfreezes the Frozen pairs of the same foundation."""
    a = agent(
        remotes=(cand(R1, local_pref=60000, found="F"), cand(R2, local_pref=50000, found="F"))
    )
    first = only(a.start(0.0))
    assert first.destination == R1
    a.on_datagram(0, R1, answer(first), 0.02)
    assert pair_to(a, R1).state is PairState.SUCCEEDED
    assert pair_to(a, R2).state is PairState.WAITING


def test_frozen_pairs_checked_when_nothing_waits() -> None:
    """With no Waiting pair left the best Frozen one is unfrozen and checked."""
    a = agent(
        remotes=(cand(R1, local_pref=60000, found="F"), cand(R2, local_pref=50000, found="F"))
    )
    assert only(a.start(0.0)).destination == R1
    second = only(a.on_timer(0.05))
    assert second.destination == R2
    assert pair_to(a, R2).history == ["frozen->waiting:unfreeze", "waiting->in-progress:check"]


# --- pacing and checks --------------------------------------------------------------------------


def test_pacing_one_check_per_ta_in_priority_order() -> None:
    """RFC 8445 6.1.4.2: one new check every Ta (50 ms), highest pair priority first; calling
    the timer early or twice sends nothing more."""
    a = agent(remotes=four_remotes())
    sent = [only(a.start(0.0)).destination]
    assert a.next_deadline() == pytest.approx(0.05)
    assert a.on_timer(0.0) == [] and a.on_timer(0.049) == []
    for step in (1, 2, 3):
        now = 0.05 * step
        sent.append(only(a.on_timer(now)).destination)
        assert a.on_timer(now) == []
    assert sent == [R1, R2, R3, R4]
    assert all(p.state is PairState.IN_PROGRESS for p in a.pairs.values())


def test_triggered_check_goes_first() -> None:
    """RFC 8445 7.3.1.4: a check from the peer queues a triggered check on that pair, sent in
    the next Ta slot ahead of the ordinary check list."""
    a = agent(remotes=four_remotes())
    a.start(0.0)
    out, _ = a.on_datagram(0, R4, peer_check(), 0.01)
    assert response_to(out, R4).cls is MessageClass.SUCCESS
    assert checks(out) == []  # paced: not sent at once
    assert only(a.on_timer(0.05)).destination == R4
    assert only(a.on_timer(0.10)).destination == R2


@pytest.mark.parametrize("controlling", [True, False])
def test_check_contents(controlling: bool) -> None:
    """A check carries USERNAME "remote:local", PRIORITY of a peer-reflexive candidate with the
    local candidate's local preference, ICE-CONTROLLING or -CONTROLLED with our tie-breaker,
    no USE-CANDIDATE, MESSAGE-INTEGRITY with the remote password, FINGERPRINT last."""
    a = agent(controlling, locals_=(local(local_pref=43210),), remotes=(cand(B_ADDR),))
    dgram = only(a.start(0.0))
    assert (dgram.base_id, dgram.destination) == (0, B_ADDR)
    msg = msg_of(dgram)
    assert (msg.method, msg.cls) == (Method.BINDING, MessageClass.REQUEST)
    assert msg.get(Username) == Username(f"{B_UFRAG}:{A_UFRAG}")
    assert msg.get(Priority) == Priority(candidate_priority(CandidateType.PRFLX, 43210))
    if controlling:
        assert msg.get(IceControlling) == IceControlling(100)
        assert msg.get(IceControlled) is None
    else:
        assert msg.get(IceControlled) == IceControlled(100)
        assert msg.get(IceControlling) is None
    assert msg.get(UseCandidate) is None
    assert check_integrity(msg, short_term_key(B_PASSWORD))
    assert not check_integrity(msg, short_term_key(A_PASSWORD))
    assert check_fingerprint(msg)
    assert [type(x) for x in msg.attributes[-2:]] == [MessageIntegrity, Fingerprint]


def test_retransmissions_then_failure() -> None:
    """Checks follow CHECK_POLICY: sends at 0, 0.5, 1.5 and 3.5 s, the pair fails at 5.5 s;
    with every pair failed and both sides done, the agent fails then (not at 10 s)."""
    assert CHECK_POLICY.total() == pytest.approx(5.5)
    a = agent(remotes=(cand(B_ADDR),))
    times = [0.0 for _ in a.start(0.0)]
    tid = msg_of(only(a.on_timer(0.5))).transaction_id
    times.append(0.5)
    now = 0.5
    while a.state is IceState.CHECKING:
        deadline = a.next_deadline()
        assert deadline is not None and deadline > now
        now = deadline
        for dgram in a.on_timer(now):
            assert msg_of(dgram).transaction_id == tid
            times.append(now)
    assert times == pytest.approx([0.0, 0.5, 1.5, 3.5])
    assert now == pytest.approx(5.5)
    assert pair_to(a, B_ADDR).state is PairState.FAILED
    assert (a.state, a.failure_reason) == (IceState.FAILED, "every candidate pair failed")
    assert a.next_deadline() is None


@pytest.mark.parametrize(("local_done", "remote_done"), [(False, True), (True, False)])
def test_no_early_failure_before_candidates_end(local_done: bool, remote_done: bool) -> None:
    """While either side may still signal candidates, failed pairs do not end ICE: it fails at
    failure_timeout (10 s) instead."""
    a = agent(remotes=(cand(B_ADDR),), ended=False)
    if local_done:
        a.end_of_local_candidates()
    if remote_done:
        a.end_of_remote_candidates()
    a.start(0.0)
    now = 0.0
    while a.state is IceState.CHECKING:
        deadline = a.next_deadline()
        assert deadline is not None and deadline > now
        now = deadline
        a.on_timer(now)
    assert now == pytest.approx(10.0)
    assert a.failure_reason == "no working candidate pair after 10 s"


def test_failure_timeout_with_pairs_still_in_progress() -> None:
    """With a new pair keeping checks alive, failure comes at failure_timeout after start."""
    a = agent(remotes=(cand(B_ADDR),), ended=False, failure_timeout=4.0)
    a.start(1.0)
    a.on_timer(5.0 - 1e-9)
    assert a.state is IceState.CHECKING
    a.on_timer(5.0)
    assert (a.state, a.failure_reason) == (IceState.FAILED, "no working candidate pair after 4 s")


# --- responses ----------------------------------------------------------------------------------


def test_success_makes_pair_valid() -> None:
    """A signed success from the checked address, on the base it was sent from, makes the pair
    Succeeded with its round-trip time."""
    a = agent(remotes=(cand(B_ADDR),))
    dgram = only(a.start(0.0))
    a.on_datagram(0, B_ADDR, answer(dgram), 0.02)
    pair = pair_to(a, B_ADDR)
    assert pair.state is PairState.SUCCEEDED
    assert pair.rtt == pytest.approx(0.02)
    assert pair.valid_local is pair.local


def test_response_with_bad_integrity_ignored() -> None:
    """RFC 8445 7.2.5.1: a response whose MESSAGE-INTEGRITY fails is no answer; the check keeps
    retransmitting and a good answer to the same transaction still counts."""
    a = agent(remotes=(cand(B_ADDR),))
    dgram = only(a.start(0.0))
    for forged in (
        answer(dgram, password="wrong"),
        answer(dgram, password=A_PASSWORD),
        answer(dgram, error=487, password="wrong"),
    ):
        assert a.on_datagram(0, B_ADDR, forged, 0.02) == ([], None)
    assert pair_to(a, B_ADDR).state is PairState.IN_PROGRESS
    assert a.controlling
    again = only(a.on_timer(0.5))
    assert again.data == dgram.data
    a.on_datagram(0, B_ADDR, answer(again), 0.52)
    assert pair_to(a, B_ADDR).state is PairState.SUCCEEDED


def test_unsigned_error_response_ignored() -> None:
    """400/401 answers are unsigned (the peer could not check our credentials), so they do not
    fail the pair either: only a timeout or a signed error does."""
    a = agent(remotes=(cand(B_ADDR),))
    dgram = only(a.start(0.0))
    request = msg_of(dgram)
    error = Message(Method.BINDING, MessageClass.ERROR, request.transaction_id, [ErrorCode(401)])
    a.on_datagram(0, B_ADDR, error.encode(fingerprint=True), 0.02)
    assert pair_to(a, B_ADDR).state is PairState.IN_PROGRESS


def test_signed_error_response_fails_pair() -> None:
    """A signed error other than 487 fails the pair (RFC 8445 7.2.5.2.4)."""
    a = agent(remotes=(cand(B_ADDR),), ended=False)
    dgram = only(a.start(0.0))
    a.on_datagram(0, B_ADDR, answer(dgram, error=500), 0.02)
    assert pair_to(a, B_ADDR).state is PairState.FAILED
    assert a.state is IceState.CHECKING  # candidates may still come


@pytest.mark.parametrize(
    ("base_id", "source"),
    [(0, ("203.0.113.77", 6000)), (0, (B_ADDR[0], B_ADDR[1] + 1)), (1, B_ADDR)],
)
def test_non_symmetric_response_fails_pair(base_id: int, source: Address) -> None:
    """RFC 8445 7.2.5.2.1: a success from another address, or arriving on another base, fails
    the pair."""
    a = agent(locals_=(local(), local(("192.0.2.9", 5000), 1)), remotes=(cand(B_ADDR),))
    dgram = next(d for d in a.start(0.0) if d.base_id == 0)
    a.on_datagram(base_id, source, answer(dgram), 0.02)
    assert pair_to(a, B_ADDR).state is PairState.FAILED


def test_peer_reflexive_local_candidate() -> None:
    """RFC 8445 7.2.5.3.1: an unknown mapped address becomes a peer-reflexive local candidate
    (type preference 110, our local preference, related to the base); a second success naming
    it reuses it."""
    mapped: Address = ("198.51.100.50", 41000)
    a = agent(locals_=(local(local_pref=30000),), remotes=(cand(R1), cand(R2)))
    first = only(a.start(0.0))
    a.on_datagram(0, first.destination, answer(first, mapped), 0.02)
    learned = pair_to(a, first.destination).valid_local
    assert learned is not None
    c = learned.candidate
    assert (c.type, c.address, c.priority) == (
        CandidateType.PRFLX,
        mapped,
        candidate_priority(CandidateType.PRFLX, 30000),
    )
    assert (c.related_host, c.related_port) == A_ADDR
    assert (learned.base_id, learned.base) == (0, A_ADDR)
    assert learned in a.local_candidates
    assert len(a.pairs) == 2  # peer-reflexive locals are not paired
    second = next(d for d in a.on_timer(0.05) if d.destination == R2)
    a.on_datagram(0, second.destination, answer(second, mapped), 0.07)
    assert pair_to(a, second.destination).valid_local is learned


def test_mapped_address_of_known_srflx() -> None:
    """A mapped address equal to our server-reflexive candidate names that candidate."""
    srflx = LocalCandidate(
        cand(("198.51.100.1", 40000), CandidateType.SRFLX, related=A_ADDR), 0, A_ADDR
    )
    a = agent(locals_=(local(), srflx), remotes=(cand(B_ADDR),))
    dgram = only(a.start(0.0))
    a.on_datagram(0, B_ADDR, answer(dgram, srflx.candidate.address), 0.02)
    assert pair_to(a, B_ADDR).valid_local is srflx


# --- requests -----------------------------------------------------------------------------------


def test_answer_to_a_check() -> None:
    """A valid check is answered with a success: same transaction, XOR-MAPPED-ADDRESS of the
    source, MESSAGE-INTEGRITY with our password, FINGERPRINT; from the base it arrived on."""
    a = agent(remotes=(cand(B_ADDR),))
    request = peer_check()
    out, app = a.on_datagram(0, B_ADDR, request, 0.0)
    assert app is None
    dgram = next(d for d in out if d.destination == B_ADDR)
    assert dgram.base_id == 0
    response = msg_of(dgram)
    assert response.cls is MessageClass.SUCCESS
    assert response.transaction_id == decode(request).transaction_id
    assert response.get(XorMappedAddress) == XorMappedAddress(*B_ADDR)
    assert check_integrity(response, short_term_key(A_PASSWORD))
    assert check_fingerprint(response)


def test_checks_answered_before_start() -> None:
    """Checks that arrive before our own checking starts are answered (state New)."""
    a = agent(remotes=(cand(B_ADDR),))
    out, _ = a.on_datagram(0, B_ADDR, peer_check(), 0.0)
    assert response_to(out, B_ADDR).cls is MessageClass.SUCCESS
    assert a.state is IceState.NEW


def test_peer_reflexive_remote_candidate() -> None:
    """RFC 8445 7.3.1.3: a check from an unknown address creates a peer-reflexive remote
    candidate with the PRIORITY of the check, a pair for it, and a triggered check to it."""
    source: Address = ("198.51.100.9", 7777)
    a = agent(remotes=(cand(B_ADDR),))
    a.start(0.0)
    out, _ = a.on_datagram(0, source, peer_check(priority=1234567), 0.01)
    assert response_to(out, source).get(XorMappedAddress) == XorMappedAddress(*source)
    learned = a.remote_candidates[-1]
    assert (learned.type, learned.address, learned.priority) == (
        CandidateType.PRFLX,
        source,
        1234567,
    )
    pair = pair_to(a, source)
    assert pair.priority == pair_priority(True, pair.local.candidate.priority, 1234567)
    assert only(a.on_timer(0.05)).destination == source


def fresh_agent(controlling: bool = True) -> IceAgent:
    """Agent A with its host candidate but without B's credentials yet (B's answer is late)."""
    a = IceAgent(
        controlling, ufrag=A_UFRAG, password=A_PASSWORD, tie_breaker=100, rng=random.Random(7)
    )
    assert a.add_local_candidate(local(), 0.0) == []
    return a


SYMMETRIC_MAPPING: Address = ("198.51.100.20", 25553)
"""Where B's check comes from when B is behind a symmetric NAT: a mapping made for A alone,
which no candidate B signals names."""


def test_check_before_credentials_is_processed_once_they_arrive() -> None:
    """RFC 8445 7.3: a check that arrives before the peer's credentials is answered at once,
    and once they arrive the agent "MUST proceed with the remaining steps": learn the
    peer-reflexive candidate (7.3.1.3) and queue a triggered check to it (7.3.1.4).

    Seen in the NAT lab (no NAT vs symmetric NAT): the answerer's first check reached the
    offerer a few ms before the answerer's signalled credentials did; it was answered, so the
    answerer never sent it again, but the offerer forgot it and never learned the symmetric
    NAT's mapping. Every pair the offerer could form failed, and ICE chose the TURN relay
    although a direct path existed."""
    a = fresh_agent()
    out, _ = a.on_datagram(0, SYMMETRIC_MAPPING, peer_check(priority=1234567), 0.01)
    assert response_to(out, SYMMETRIC_MAPPING).cls is MessageClass.SUCCESS
    assert a.remote_candidates == [] and a.pairs == {}
    a.set_remote_credentials(B_UFRAG, B_PASSWORD)
    learned = a.remote_candidates[-1]
    assert (learned.type, learned.address, learned.priority) == (
        CandidateType.PRFLX,
        SYMMETRIC_MAPPING,
        1234567,
    )
    assert pair_to(a, SYMMETRIC_MAPPING).state is PairState.WAITING
    assert a.add_remote_candidate(cand(B_ADDR), 0.02) == []  # signalled after: checked later
    first = only(a.start(0.03))
    assert first.destination == SYMMETRIC_MAPPING  # the triggered check goes first
    a.on_datagram(0, SYMMETRIC_MAPPING, answer(first), 0.04)
    assert pair_to(a, SYMMETRIC_MAPPING).state is PairState.SUCCEEDED


def test_early_use_candidate_selects_on_the_controlled_side() -> None:
    """7.3.1.5 for an early check: a USE-CANDIDATE that came before the credentials still
    nominates its pair; the controlled agent selects it once its triggered check succeeds."""
    a = fresh_agent(controlling=False)
    a.on_datagram(0, B_ADDR, peer_check(controlling=True, use_candidate=True), 0.01)
    a.set_remote_credentials(B_UFRAG, B_PASSWORD)
    assert pair_to(a, B_ADDR).use_candidate_seen
    check = only(a.start(0.02))
    assert check.destination == B_ADDR
    a.on_datagram(0, B_ADDR, answer(check), 0.03)
    assert a.state is IceState.CONNECTED
    assert a.selected is pair_to(a, B_ADDR)


def test_early_checks_of_another_session_and_beyond_the_limit_are_forgotten() -> None:
    """Only early checks naming the credentials that then arrive are processed (a check with
    another remote ufrag belongs to an earlier session), and at most MAX_EARLY_CHECKS are
    kept; every one is answered all the same."""
    a = fresh_agent()
    stale: Address = ("198.51.100.30", 4000)
    out, _ = a.on_datagram(0, stale, peer_check(username=f"{A_UFRAG}:old"), 0.0)
    assert response_to(out, stale).cls is MessageClass.SUCCESS
    sources = [("198.51.100.40", 10000 + i) for i in range(MAX_EARLY_CHECKS + 5)]
    for source in sources:
        out, _ = a.on_datagram(0, source, peer_check(), 0.0)
        assert response_to(out, source).cls is MessageClass.SUCCESS
    a.set_remote_credentials(B_UFRAG, B_PASSWORD)
    learned = [c.address for c in a.remote_candidates]
    assert learned == sources[: MAX_EARLY_CHECKS - 1]  # the stale one took a place


def test_signalled_candidate_replaces_peer_reflexive_one() -> None:
    """Trickle: B's check overtakes B's signalled host candidate, so A first knows B_ADDR as
    peer-reflexive. When the candidate is signalled, it takes the prflx one's place (type,
    foundation, priority), in the pair too, whose state is kept; A's other base is paired with
    it as with any signalled candidate. So a host-to-host path is reported as host -> host."""
    second = LocalCandidate(cand(("192.0.2.1", 5001), local_pref=40000), 1, ("192.0.2.1", 5001))
    a = agent(locals_=(local(), second), ended=False)
    a.start(0.0)
    a.on_datagram(0, B_ADDR, peer_check(), 0.01)
    check = only(a.on_timer(0.05))
    a.on_datagram(0, B_ADDR, answer(check), 0.06)
    pair = pair_to(a, B_ADDR)
    assert (pair.remote.type, pair.state) == (CandidateType.PRFLX, PairState.SUCCEEDED)
    signalled = cand(B_ADDR)
    a.add_remote_candidate(signalled, 0.07)
    assert a.remote_candidates == [signalled]
    assert pair_to(a, B_ADDR) is pair
    assert (pair.remote, pair.state) == (signalled, PairState.SUCCEEDED)
    assert pair.priority == pair_priority(True, pair.local.candidate.priority, signalled.priority)
    assert pair_to(a, B_ADDR, base_id=1).remote == signalled
    a.add_remote_candidate(cand(B_ADDR, CandidateType.SRFLX), 0.08)  # a duplicate: ignored
    assert a.remote_candidates == [signalled]


def test_checks_after_failure_are_answered_but_not_remembered() -> None:
    """A failed agent still answers checks (the peer may be slower to give up) but neither
    learns candidates nor queues triggered checks."""
    a = agent(remotes=(cand(B_ADDR),), failure_timeout=1.0)
    a.start(0.0)
    a.on_timer(1.0)
    assert a.state is IceState.FAILED
    source: Address = ("198.51.100.9", 7777)
    out, _ = a.on_datagram(0, source, peer_check(), 1.1)
    assert response_to(out, source).cls is MessageClass.SUCCESS
    assert source not in [c.address for c in a.remote_candidates]


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"username": f"{B_UFRAG}:{A_UFRAG}"}, 401),  # our ufrag is not first
        ({"username": "aufrx:bufr"}, 401),
        ({"password": B_PASSWORD}, 401),  # wrong key
        ({"username": None}, 400),
        ({"fingerprint": False}, 400),
    ],
)
def test_bad_requests_rejected_without_effect(changes: dict[str, Any], code: int) -> None:
    """Checks with a wrong USERNAME or MESSAGE-INTEGRITY get 401, malformed ones 400; the answer
    is unsigned, and nothing changes: no candidate, pair, triggered check or role switch, even
    though each claims ICE-CONTROLLING with the largest tie-breaker."""
    a = agent()
    a.start(0.0)
    check = peer_check(controlling=True, tie_breaker=2**64 - 1, **changes)
    out, app = a.on_datagram(0, B_ADDR, check, 0.01)
    assert app is None
    response = response_to(out, B_ADDR)
    assert response.cls is MessageClass.ERROR
    assert response.get(ErrorCode) == ErrorCode(code, "")
    assert response.get(MessageIntegrity) is None
    assert check_fingerprint(response)
    assert a.remote_candidates == [] and a.pairs == {}
    assert a.controlling and a.state is IceState.CHECKING
    assert a.on_timer(0.05) == []


def test_request_without_integrity_is_400() -> None:
    """RFC 8489 9.1.3: a request lacking MESSAGE-INTEGRITY (with USERNAME) is rejected with 400
    Bad Request; 401 is for credentials that are present but wrong."""
    a = agent()
    out, _ = a.on_datagram(0, B_ADDR, peer_check(password=None), 0.0)
    code = response_to(out, B_ADDR).get(ErrorCode)
    assert code is not None and code.code == 400


def test_unknown_comprehension_required_attribute_is_420() -> None:
    """An authenticated check with an unknown comprehension-required attribute gets a signed
    420 listing it, and changes nothing."""
    a = agent()
    out, _ = a.on_datagram(0, B_ADDR, peer_check(extra=(UnknownAttribute(0x7ABC, b"zz"),)), 0.0)
    response = response_to(out, B_ADDR)
    assert response.get(ErrorCode) == ErrorCode(420, "")
    assert response.get(UnknownAttributes) == UnknownAttributes((0x7ABC,))
    assert check_integrity(response, short_term_key(A_PASSWORD))
    assert a.remote_candidates == []


def test_unknown_optional_attribute_ignored() -> None:
    """Unknown comprehension-optional attributes (0x8000-0xFFFF) are ignored."""
    a = agent()
    out, _ = a.on_datagram(0, B_ADDR, peer_check(extra=(UnknownAttribute(0xC0DE, b"zz"),)), 0.0)
    assert response_to(out, B_ADDR).cls is MessageClass.SUCCESS


# --- role conflicts -----------------------------------------------------------------------------


@pytest.mark.parametrize(("ours", "theirs"), [(100, 99), (100, 100)])
def test_controlling_keeps_role_with_larger_or_equal_tie_breaker(ours: int, theirs: int) -> None:
    """RFC 8445 7.3.1.1: both controlling and our tie-breaker >= theirs: answer 487 (signed),
    keep the role, learn nothing."""
    a = agent(tie_breaker=ours)
    out, _ = a.on_datagram(0, B_ADDR, peer_check(controlling=True, tie_breaker=theirs), 0.0)
    response = response_to(out, B_ADDR)
    assert response.get(ErrorCode) == ErrorCode(487, "")
    assert check_integrity(response, short_term_key(A_PASSWORD))
    assert a.controlling and a.remote_candidates == []


def test_controlling_yields_to_larger_tie_breaker() -> None:
    """Both controlling and their tie-breaker is larger: switch to controlled, answer 200 and
    recompute pair priorities for the new role."""
    a = agent(tie_breaker=100, remotes=four_remotes())
    out, _ = a.on_datagram(0, R1, peer_check(controlling=True, tie_breaker=101), 0.0)
    assert response_to(out, R1).cls is MessageClass.SUCCESS
    assert not a.controlling
    for pair in a.pairs.values():
        assert pair.priority == pair_priority(
            False, pair.local.candidate.priority, pair.remote.priority
        )


@pytest.mark.parametrize(("ours", "theirs"), [(100, 99), (100, 100)])
def test_controlled_takes_control_with_larger_or_equal_tie_breaker(ours: int, theirs: int) -> None:
    """Both controlled and our tie-breaker >= theirs: switch to controlling and answer 200."""
    a = agent(False, tie_breaker=ours)
    out, _ = a.on_datagram(0, B_ADDR, peer_check(controlling=False, tie_breaker=theirs), 0.0)
    assert response_to(out, B_ADDR).cls is MessageClass.SUCCESS
    assert a.controlling


def test_controlled_answers_487_to_larger_tie_breaker() -> None:
    """Both controlled and their tie-breaker is larger: 487, role kept."""
    a = agent(False, tie_breaker=100)
    out, _ = a.on_datagram(0, B_ADDR, peer_check(controlling=False, tie_breaker=101), 0.0)
    assert response_to(out, B_ADDR).get(ErrorCode) == ErrorCode(487, "")
    assert not a.controlling


@pytest.mark.parametrize("controlling", [True, False])
def test_487_switches_role_and_rechecks(controlling: bool) -> None:
    """RFC 8445 7.2.5.1: a 487 answer switches our role and the pair is checked again (a
    triggered check) with the other role attribute."""
    a = agent(controlling, remotes=(cand(B_ADDR),))
    dgram = only(a.start(0.0))
    a.on_datagram(0, B_ADDR, answer(dgram, error=487), 0.02)
    assert a.controlling is not controlling
    retry = msg_of(only(a.on_timer(0.05)))
    assert (retry.get(IceControlling) is not None) is not controlling
    assert (retry.get(IceControlled) is not None) is controlling
    assert retry.transaction_id != msg_of(dgram).transaction_id


def test_two_487s_switch_role_once() -> None:
    """Two checks sent with ICE-CONTROLLING both answered 487: we must end up controlled. The
    agent flips its role per 487 (``not self.controlling``), so the second flips it back."""
    a = agent(remotes=(cand(R1), cand(R2)))
    first = only(a.start(0.0))
    second = only(a.on_timer(0.05))
    a.on_datagram(0, first.destination, answer(first, error=487), 0.06)
    a.on_datagram(0, second.destination, answer(second, error=487), 0.07)
    assert not a.controlling


def test_late_487_after_role_switch_keeps_role() -> None:
    """Both controlling, their tie-breaker larger, checks crossing: their check switches us to
    controlled; then their 487 to our earlier ICE-CONTROLLING check arrives. RFC 8445 7.2.5.1:
    switch to controlled "if it has not already done so", so we stay controlled; the agent
    flips back to controlling instead (and both sides are then controlling again)."""
    a = agent(tie_breaker=1, remotes=(cand(B_ADDR),))
    ours = only(a.start(0.0))
    a.on_datagram(0, B_ADDR, peer_check(controlling=True, tie_breaker=2), 0.01)
    assert not a.controlling
    a.on_datagram(0, B_ADDR, answer(ours, error=487), 0.02)
    assert not a.controlling


# --- nomination -------------------------------------------------------------------------------


def test_controlling_waits_for_better_pending_pairs_then_nominates() -> None:
    """Regular nomination: a valid pair while a higher-priority pair is still in progress is
    not nominated before nomination_wait (1 s) after the first valid pair; then USE-CANDIDATE
    goes out on the best valid pair, and its success selects it."""
    a = agent(remotes=(cand(R1, local_pref=60000), cand(R2, local_pref=50000)))
    hi = only(a.start(0.0))
    lo = only(a.on_timer(0.05))
    assert (hi.destination, lo.destination) == (R1, R2)
    a.on_datagram(0, R2, answer(lo), 0.06)
    now, nominated = 0.06, None
    while nominated is None:
        deadline = a.next_deadline()
        assert deadline is not None and deadline > now
        now = deadline
        for dgram in a.on_timer(now):
            if msg_of(dgram).get(UseCandidate) is not None:
                nominated = dgram
    assert now == pytest.approx(1.06)
    assert nominated.destination == R2
    assert (a.state, a.selected) == (IceState.CHECKING, None)
    a.on_datagram(0, R2, answer(nominated), now + 0.02)
    assert a.state is IceState.CONNECTED
    assert a.selected is pair_to(a, R2) and a.selected.nominated


def test_controlling_nominates_the_better_pair_once_it_works() -> None:
    """If the higher-priority pair succeeds within the wait, it is nominated at once."""
    a = agent(remotes=(cand(R1, local_pref=60000), cand(R2, local_pref=50000)))
    hi = only(a.start(0.0))
    lo = only(a.on_timer(0.05))
    a.on_datagram(0, R2, answer(lo), 0.06)
    a.on_datagram(0, R1, answer(hi), 0.3)
    nominated = only(a.on_timer(0.3))
    assert nominated.destination == R1
    assert msg_of(nominated).get(UseCandidate) is not None


def test_best_pair_valid_nominated_immediately() -> None:
    """When the best pair is valid and nothing better is pending, nomination does not wait."""
    a = agent(remotes=(cand(R1, local_pref=60000), cand(R2, local_pref=50000)))
    hi = only(a.start(0.0))
    a.on_datagram(0, R1, answer(hi), 0.02)
    out = a.on_timer(0.05)
    assert [d.destination for d in out] == [R2, R1]  # the paced check, then the nomination
    nominated = out[1]
    assert msg_of(nominated).get(UseCandidate) is not None
    a.on_datagram(0, R1, answer(nominated), 0.07)
    assert a.state is IceState.CONNECTED


def test_relayed_pair_only_when_direct_fails_in_time() -> None:
    """A relayed pair that works first is not nominated while a direct pair is pending; a
    direct pair answering within nomination_wait wins; if none does, the relay is used."""
    relay_local = LocalCandidate(cand(("203.0.113.100", 50000), CandidateType.RELAY), 1,
                                 ("203.0.113.100", 50000))  # fmt: skip
    remote = cand(B_ADDR, CandidateType.SRFLX)
    for direct_answers in (True, False):
        a = agent(locals_=(local(), relay_local), remotes=(remote,))
        direct = only(a.start(0.0))
        relayed = only(a.on_timer(0.05))
        assert (direct.base_id, relayed.base_id) == (0, 1)
        a.on_datagram(1, B_ADDR, answer(relayed, relay_local.candidate.address), 0.1)
        retransmit = only(a.on_timer(0.5))
        assert retransmit.base_id == 0 and msg_of(retransmit).get(UseCandidate) is None
        if direct_answers:
            a.on_datagram(0, B_ADDR, answer(retransmit), 0.55)
        now, nominated = 0.5, None
        while nominated is None:
            deadline = a.next_deadline()
            assert deadline is not None
            now = deadline
            nominated = next(
                (d for d in a.on_timer(now) if msg_of(d).get(UseCandidate) is not None), None
            )
        assert nominated.base_id == (0 if direct_answers else 1)
        assert now == pytest.approx(0.55 if direct_answers else 1.1)


def test_controlled_selects_when_nominated_pair_succeeds() -> None:
    """Controlled side: USE-CANDIDATE on a pair still in progress is remembered; the pair is
    selected when our own check of it succeeds. We never send USE-CANDIDATE ourselves."""
    a = agent(False, remotes=(cand(B_ADDR),))
    ours = only(a.start(0.0))
    assert msg_of(ours).get(UseCandidate) is None
    a.on_datagram(0, B_ADDR, peer_check(controlling=True, use_candidate=True), 0.01)
    assert a.selected is None and pair_to(a, B_ADDR).use_candidate_seen
    a.on_datagram(0, B_ADDR, answer(ours), 0.02)
    assert a.state is IceState.CONNECTED and a.selected is pair_to(a, B_ADDR)


def test_controlled_selects_on_use_candidate_for_valid_pair() -> None:
    """Controlled side: USE-CANDIDATE on an already valid pair selects it at once."""
    a = agent(False, remotes=(cand(B_ADDR),))
    ours = only(a.start(0.0))
    a.on_datagram(0, B_ADDR, answer(ours), 0.02)
    assert a.selected is None
    out, _ = a.on_datagram(0, B_ADDR, peer_check(controlling=True, use_candidate=True), 0.5)
    assert response_to(out, B_ADDR).cls is MessageClass.SUCCESS
    assert a.state is IceState.CONNECTED and a.selected is pair_to(a, B_ADDR)


def test_controlled_fails_without_nomination() -> None:
    """A controlled agent with a valid pair but no nomination fails at failure_timeout."""
    a = agent(False, remotes=(cand(B_ADDR),))
    a.on_datagram(0, B_ADDR, answer(only(a.start(0.0))), 0.02)
    a.on_timer(10.0)
    assert a.state is IceState.FAILED


# --- two agents back to back --------------------------------------------------------------------


@dataclass(order=True)
class _InFlight:
    when: float
    seq: int
    to_a: bool = field(compare=False)
    source: Address = field(compare=False)
    data: bytes = field(compare=False)


class Wire:
    """Agents A (controlling) and B joined back to back with a one-way delay, host candidates
    only; ``mute_b`` makes everything B sends vanish. Stepping raises BusyLoop when a timer asks
    for a time that running it does not clear."""

    def __init__(self, delay: float = 0.01, **kwargs: float) -> None:
        self.delay = delay
        self.a = IceAgent(True, ufrag=A_UFRAG, password=A_PASSWORD, tie_breaker=2,
                          rng=random.Random(1), **kwargs)  # type: ignore[arg-type]  # fmt: skip
        self.b = IceAgent(False, ufrag=B_UFRAG, password=B_PASSWORD, tie_breaker=1,
                          rng=random.Random(2), **kwargs)  # type: ignore[arg-type]  # fmt: skip
        self.a.set_remote_credentials(B_UFRAG, B_PASSWORD)
        self.b.set_remote_credentials(A_UFRAG, A_PASSWORD)
        self.a.add_local_candidate(local(A_ADDR), 0.0)
        self.b.add_local_candidate(local(B_ADDR), 0.0)
        self.a.add_remote_candidate(cand(B_ADDR), 0.0)
        self.b.add_remote_candidate(cand(A_ADDR), 0.0)
        for x in (self.a, self.b):
            x.end_of_local_candidates()
            x.end_of_remote_candidates()
        self.now = 0.0
        self.mute_b = False
        self.queue: list[_InFlight] = []
        self.seq = itertools.count()
        self.sent: list[tuple[float, bool, Message | bytes]] = []
        """(time, from A, decoded STUN or raw data) of everything sent."""
        self.received: dict[bool, list[bytes]] = {True: [], False: []}

    def push(self, from_a: bool, out: list[SendDatagram]) -> None:
        for dgram in out:
            try:
                shown: Message | bytes = decode(dgram.data)
            except ValueError:
                shown = dgram.data
            self.sent.append((self.now, from_a, shown))
            if not from_a and self.mute_b:
                continue
            source = A_ADDR if from_a else B_ADDR
            item = _InFlight(self.now + self.delay, next(self.seq), not from_a, source, dgram.data)
            heapq.heappush(self.queue, item)

    def start(self) -> None:
        self.push(True, self.a.start(self.now))
        self.push(False, self.b.start(self.now))

    def step(self, until: float) -> bool:
        times = [t for t in (self.a.next_deadline(), self.b.next_deadline()) if t is not None]
        if self.queue:
            times.append(self.queue[0].when)
        if not times or min(times) > until:
            self.now = until
            return False
        when = min(times)
        if when <= self.now and not (self.queue and self.queue[0].when <= self.now):
            raise BusyLoop(f"deadline {when} not cleared at {self.now}")
        self.now = max(self.now, when)
        while self.queue and self.queue[0].when <= self.now:
            item = heapq.heappop(self.queue)
            target = self.a if item.to_a else self.b
            out, app = target.on_datagram(0, item.source, item.data, self.now)
            if app is not None:
                self.received[item.to_a].append(app)
            self.push(item.to_a, out)
        for from_a, x in ((True, self.a), (False, self.b)):
            deadline = x.next_deadline()
            if deadline is not None and deadline <= self.now:
                self.push(from_a, x.on_timer(self.now))
        return True

    def run(self, until: float, done: Callable[[], bool] = lambda: False) -> None:
        while not done() and self.step(until):
            pass

    def connect(self) -> None:
        self.start()
        self.run(5.0, lambda: self.a.state is self.b.state is IceState.CONNECTED)
        assert self.a.state is self.b.state is IceState.CONNECTED


def consent_requests(wire: Wire, from_a: bool, after: float) -> list[tuple[float, Message]]:
    return [
        (t, m)
        for t, who, m in wire.sent
        if who is from_a and t > after and isinstance(m, Message) and m.cls is MessageClass.REQUEST
    ]


def test_back_to_back_connect() -> None:
    """Two agents on public addresses connect in a few round trips over host candidates."""
    wire = Wire()
    wire.connect()
    assert wire.now < 0.2
    assert wire.a.selected is not None and wire.a.selected.nominated
    assert wire.b.selected is not None and wire.b.selected.use_candidate_seen


def test_connect_when_round_trip_exceeds_ta() -> None:
    """With a one-way delay of 30 ms (round trip 60 ms > Ta = 50 ms) both agents' checks cross:
    each arriving check triggers a new check on the In-Progress pair, which forgets the first
    transaction, so its answer is ignored (RFC 8445 7.3.1.4 says to keep waiting for it). The
    crossing repeats every Ta and neither side ever gets a usable answer: ICE fails at 10 s."""
    wire = Wire(delay=0.03)
    wire.start()
    wire.run(12.0, lambda: IceState.FAILED in (wire.a.state, wire.b.state))
    assert wire.a.state is wire.b.state is IceState.CONNECTED


def test_consent_checks_every_five_seconds_randomised() -> None:
    """RFC 7675: after selection each side sends a consent check about every 5 s, randomised
    to 4-6 s; it has no USE-CANDIDATE; answered checks keep consent for ten minutes."""
    wire = Wire()
    wire.connect()
    connected = wire.now
    wire.run(connected + 600.0)
    assert wire.a.state is wire.b.state is IceState.CONNECTED
    for from_a in (True, False):
        requests = consent_requests(wire, from_a, connected)
        assert 100 <= len(requests) <= 150
        times = [connected] + [t for t, _ in requests]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(4.0 - 1e-9 <= g <= 6.0 + 1e-9 for g in gaps), gaps
        assert max(gaps) - min(gaps) > 0.5
        for _, msg in requests:
            assert msg.get(UseCandidate) is None and msg.get(Priority) is not None
            assert check_integrity(msg, short_term_key(B_PASSWORD if from_a else A_PASSWORD))


def test_consent_lost_after_30_s_without_answers() -> None:
    """RFC 7675: when the peer stops answering, consent expires 30 s after the last answer and
    the agent fails (timer driven on a coarse 10 ms grid, as a real event loop would)."""
    wire = Wire()
    wire.connect()
    wire.run(wire.now + 20.0)
    muted_at, wire.mute_b = wire.now, True
    wire.run(muted_at + 0.1)  # what B sent before going silent still arrives
    last_answer = wire.delay + max(
        t
        for t, from_a, m in wire.sent
        if not from_a and t <= muted_at and isinstance(m, Message) and m.cls is MessageClass.SUCCESS
    )
    t = wire.now
    while wire.a.state is IceState.CONNECTED and t < last_answer + 40:
        t = round(t + 0.01, 6)
        wire.push(True, wire.a.on_timer(t))
    assert wire.a.state is IceState.FAILED
    assert wire.a.failure_reason == "consent expired (RFC 7675)"
    assert last_answer + 30.0 < t <= last_answer + 30.01 + 1e-9
    assert wire.a.next_deadline() is None


def test_no_busy_loop_when_consent_expires() -> None:
    """next_deadline() returns last_consent + consent_timeout, but on_timer at exactly that time
    tests ``now - last > timeout`` (strictly greater) and does nothing, so calling
    on_timer(next_deadline()) never advances: a busy loop (with a real clock it spins until the
    clock moves past the deadline)."""
    wire = Wire()
    wire.connect()
    wire.run(wire.now + 20.0)
    wire.mute_b = True
    wire.run(wire.now + 60.0)
    assert wire.a.state is IceState.FAILED


def test_deadlines_always_advance_while_checking_and_connected() -> None:
    """Calling on_timer(next_deadline()) always moves time on: checking with nobody answering
    until failure, and ten minutes connected with consent answered."""
    lonely = agent(remotes=four_remotes())
    lonely.start(0.0)
    now = 0.0
    while (deadline := lonely.next_deadline()) is not None:
        assert deadline > now
        now = deadline
        lonely.on_timer(now)
    assert lonely.state is IceState.FAILED
    wire = Wire()
    wire.connect()
    wire.run(wire.now + 600.0)  # Wire raises BusyLoop on a stalled deadline


# --- application data and demultiplexing -------------------------------------------------------


def test_application_data_only_from_known_remotes() -> None:
    """Non-STUN datagrams are passed up only when they come from a known remote address (learned
    peer-reflexive ones included); nothing is sent in reply."""
    a = agent(remotes=(cand(B_ADDR),))
    assert a.on_datagram(0, B_ADDR, b"\x80\x00rtp", 0.0) == ([], b"\x80\x00rtp")
    assert a.on_datagram(0, R1, b"\x80\x00rtp", 0.0) == ([], None)
    a.on_datagram(0, R1, peer_check(), 0.0)
    assert a.on_datagram(0, R1, b"\x80\x00rtp", 0.0) == ([], b"\x80\x00rtp")


def test_stun_looking_datagrams_are_demultiplexed() -> None:
    """Datagrams that look like STUN (top bits 00, magic cookie, consistent length) are never
    application data: bad FINGERPRINT, undecodable bodies and other methods are dropped; DTLS
    records (first byte 20-63 but no cookie) are data."""
    a = agent(remotes=(cand(B_ADDR),))
    good = bytearray(peer_check())
    good[-1] ^= 1  # break FINGERPRINT
    indication = Message(0x007, MessageClass.INDICATION).encode(fingerprint=True)
    truncated = Message(Method.BINDING, MessageClass.REQUEST).encode()[:20]
    undecodable = truncated[:2] + b"\x00\x04" + truncated[4:] + b"\x00\x06\x00\x09"
    for data in (bytes(good), indication, undecodable):
        assert a.on_datagram(0, B_ADDR, data, 0.0) == ([], None)
    dtls = b"\x16\xfe\xfd" + bytes(30)
    assert a.on_datagram(0, B_ADDR, dtls, 0.0) == ([], dtls)
    assert a.remote_candidates == [cand(B_ADDR)]


def test_send_requires_connection_and_uses_selected_pair() -> None:
    """send() before a pair is selected is a usage error; afterwards it goes over the selected
    pair's base to its remote address, and arrives as application data."""
    wire = Wire()
    with pytest.raises(RuntimeError, match="not connected"):
        wire.a.send(b"x")
    wire.connect()
    assert wire.a.send(b"hello") == [SendDatagram(0, B_ADDR, b"hello")]
    wire.push(True, wire.a.send(b"hello"))
    wire.push(False, wire.b.send(b"world"))
    wire.run(wire.now + 0.1)
    assert wire.received == {True: [b"world"], False: [b"hello"]}


def test_start_requires_credentials_and_close_stops_everything() -> None:
    """start() without remote credentials is a usage error; close() stops timers and input."""
    a = IceAgent(True)
    with pytest.raises(RuntimeError, match="credentials"):
        a.start(0.0)
    b = agent(remotes=(cand(B_ADDR),))
    b.start(0.0)
    b.close()
    assert b.state is IceState.CLOSED and b.next_deadline() is None
    assert b.on_datagram(0, B_ADDR, peer_check(), 1.0) == ([], None)
    assert b.on_datagram(0, B_ADDR, b"data", 1.0) == ([], None)
    assert b.on_timer(2.0) == []


def test_default_credentials_are_ice_chars() -> None:
    """Generated ufrag/password have at least 24/128 bits and only ice-chars."""
    a = IceAgent(False)
    assert len(a.local_ufrag) >= 4 and len(a.local_password) >= 22
    assert all(c.isalnum() or c in "+/" for c in a.local_ufrag + a.local_password)
    assert 0 <= a.tie_breaker < 2**64


# --- interop-style: aioice's view ---------------------------------------------------------------


def test_check_built_like_aioice_is_answered() -> None:
    """A check built with aioice's codec the way aioice's ``build_request`` does (USERNAME
    "<our ufrag>:<its ufrag>", PRIORITY, ICE-CONTROLLED 64-bit tie-breaker, MESSAGE-INTEGRITY
    with our password, FINGERPRINT) is answered with a success aioice accepts: integrity under
    our password, XOR-MAPPED-ADDRESS of its source."""
    a = agent(remotes=(cand(B_ADDR),))
    request = astun.Message(astun.Method.BINDING, astun.Class.REQUEST)
    request.attributes["USERNAME"] = f"{A_UFRAG}:{B_UFRAG}"
    request.attributes["PRIORITY"] = aio_priority(1, "prflx")
    request.attributes["ICE-CONTROLLED"] = 0xFEDCBA9876543210
    request.add_message_integrity(A_PASSWORD.encode())
    out, _ = a.on_datagram(0, B_ADDR, bytes(request), 0.0)
    raw = next(d.data for d in out if d.destination == B_ADDR)
    response = astun.parse_message(raw)
    assert response.message_class == astun.Class.RESPONSE
    assert response.transaction_id == request.transaction_id
    assert response.check_message_integrity(A_PASSWORD.encode())
    assert response.attributes["XOR-MAPPED-ADDRESS"] == B_ADDR
    assert a.remote_candidates[0].address == B_ADDR and a.controlling


def test_our_check_parses_in_aioice() -> None:
    """aioice's codec reads our check: its USERNAME, PRIORITY, ICE-CONTROLLING tie-breaker and
    MESSAGE-INTEGRITY under its (the remote) password."""
    a = agent(tie_breaker=0xFEDCBA9876543210, remotes=(cand(B_ADDR),))
    theirs = astun.parse_message(only(a.start(0.0)).data)
    assert theirs.attributes["USERNAME"] == f"{B_UFRAG}:{A_UFRAG}"
    assert theirs.attributes["PRIORITY"] == candidate_priority(CandidateType.PRFLX)
    assert theirs.attributes["ICE-CONTROLLING"] == 0xFEDCBA9876543210
    assert theirs.check_message_integrity(B_PASSWORD.encode())
