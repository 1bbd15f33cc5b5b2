"""The ICE agent as a sans-IO state machine (RFC 8445, RFC 7675 consent freshness).

It is given local candidates (each with the base it is sent from), remote candidates and
credentials, datagrams as they arrive and timer ticks, all with ``now``; it returns datagrams to
send from a base. It never touches a socket or a clock. One data stream, one component.

Behaviour in brief:

* Pairs are formed, pruned (server-reflexive locals are replaced by their base) and ordered by
  pair priority; per foundation the best pair starts Waiting, the rest Frozen.
* Every ``ta`` seconds one check goes out: a triggered check if any, else the best Waiting pair,
  else the best Frozen one is unfrozen. Checks are STUN Binding requests with short-term
  credentials, PRIORITY, ICE-CONTROLLING/-CONTROLLED and FINGERPRINT; retransmissions follow the
  ``check_policy`` (RTO 500 ms doubling, 4 transmissions, 5.5 s to give up).
* Role conflicts are repaired both ways (487 and the tie-breaker rule, section 7.3.1.1).
  Unknown sources of valid checks become peer-reflexive remote candidates, unknown mapped
  addresses peer-reflexive local ones. Checks that arrive before the peer's credentials are
  answered at once and processed when the credentials come (section 7.3); a candidate signalled
  later at the address of a peer-reflexive one replaces it (trickle).
* Regular nomination (section 8.1.1): the controlling agent waits until no pair of higher
  priority than the best valid one is still pending, or ``nomination_wait`` after the first valid
  pair, then sends one more check with USE-CANDIDATE on the best valid pair. Direct pairs outrank
  relayed ones, so a relay is only chosen when no direct pair worked in time.
* Failure is declared when no pair is valid ``failure_timeout`` seconds after checks started
  (10 s by default), or earlier when every pair failed and both sides have sent all candidates.
* After selection, consent freshness (RFC 7675): a check every ``consent_interval`` (randomised
  +-20 %); no answer for ``consent_timeout`` seconds means consent is lost and the agent fails.
  These checks also serve as keepalives.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import secrets
from collections import deque
from dataclasses import dataclass
from enum import StrEnum

from ..stun import (
    Address,
    Message,
    MessageClass,
    Method,
    StunParseError,
    check_fingerprint,
    check_integrity,
    decode,
    looks_like_stun,
    short_term_key,
)
from ..stun.attributes import (
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
from ..stun.transaction import ClientTransaction, RetransmitPolicy
from .candidate import Candidate, CandidateType, candidate_priority, foundation
from .checklist import LocalCandidate, Pair, PairEvent, PairState, advance, pair_priority

log = logging.getLogger("stunturn.ice")

CHECK_POLICY = RetransmitPolicy(rto=0.5, rc=4, rm=4)
"""Connectivity checks: sends at 0, 0.5, 1.5 and 3.5 s, failure at 5.5 s."""
MAX_PAIRS = 100
MAX_EARLY_CHECKS = 32
"""Checks remembered while the peer's credentials are unknown (section 7.3)."""


class IceState(StrEnum):
    NEW = "new"
    CHECKING = "checking"
    CONNECTED = "connected"
    """A pair is selected; data flows."""
    FAILED = "failed"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class SendDatagram:
    """Send ``data`` from the base ``base_id`` to ``destination``."""

    base_id: int
    destination: Address
    data: bytes


@dataclass(frozen=True, slots=True)
class _Check:
    """A check we answered with a success: what sections 7.3.1.3-7.3.1.5 need of it."""

    base_id: int
    source: Address
    priority: int
    use_candidate: bool
    remote_ufrag: str
    """The sender's part of USERNAME (after our ufrag and the colon)."""
    received: float


def new_ufrag() -> str:
    """A username fragment: 8 ice-chars (RFC 8445 section 5.3 asks for at least 24 bits)."""
    return secrets.token_hex(4)


def new_password() -> str:
    """A password: 32 ice-chars (at least 128 bits)."""
    return secrets.token_hex(16)


class IceAgent:
    """One side of an ICE session."""

    def __init__(
        self,
        controlling: bool,
        *,
        ufrag: str | None = None,
        password: str | None = None,
        tie_breaker: int | None = None,
        ta: float = 0.05,
        check_policy: RetransmitPolicy = CHECK_POLICY,
        failure_timeout: float = 10.0,
        nomination_wait: float = 1.0,
        consent_interval: float = 5.0,
        consent_timeout: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.controlling = controlling
        self.local_ufrag = ufrag or new_ufrag()
        self.local_password = password or new_password()
        self.tie_breaker = (
            tie_breaker if tie_breaker is not None else int.from_bytes(os.urandom(8), "big")
        )
        self.remote_ufrag: str | None = None
        self.remote_password: str | None = None
        self.ta = ta
        self.check_policy = check_policy
        self.failure_timeout = failure_timeout
        self.nomination_wait = nomination_wait
        self.consent_interval = consent_interval
        self.consent_timeout = consent_timeout
        self.rng = rng or random.Random()
        self.state = IceState.NEW
        self.local_candidates: list[LocalCandidate] = []
        self.remote_candidates: list[Candidate] = []
        self.remote_done = False
        self.local_done = False
        self.pairs: dict[tuple[int, Address], Pair] = {}
        self.selected: Pair | None = None
        self.failure_reason: str | None = None
        self._triggered: deque[Pair] = deque()
        self._checks: dict[bytes, tuple[Pair, ClientTransaction, bool, bool]] = {}
        """tid -> (pair, transaction, our role when sent, USE-CANDIDATE). A check replaced by
        a triggered one stays here: it is no longer retransmitted, but its answer still counts
        (RFC 8445 section 7.3.1.4)."""
        self._consent: dict[bytes, ClientTransaction] = {}
        self._started: float | None = None
        self._next_check = 0.0
        self._first_valid: float | None = None
        self._last_consent = 0.0
        self._next_consent = 0.0
        self._out: list[SendDatagram] = []
        self._prflx_seq = 0
        self._last_tick = 0.0
        self._early: list[_Check] = []
        """Checks answered before the remote credentials were known (section 7.3)."""

    # --- setup -----------------------------------------------------------------------------

    def set_remote_credentials(self, ufrag: str, password: str) -> None:
        """The peer's ufrag and password. Checks that arrived before (answered at once) are
        now processed: peer-reflexive candidates, triggered checks, USE-CANDIDATE."""
        self.remote_ufrag, self.remote_password = ufrag, password
        self._replay_early()

    def add_local_candidate(self, local: LocalCandidate, now: float) -> list[SendDatagram]:
        """A gathered candidate (trickle). Server-reflexive ones are signalled, not paired."""
        self.local_candidates.append(local)
        if local.candidate.type is not CandidateType.SRFLX:
            for remote in self.remote_candidates:
                self._pair(local, remote)
            self._wake(now)
        return self._flush()

    def add_remote_candidate(self, remote: Candidate, now: float) -> list[SendDatagram]:
        """A candidate from the peer (trickle). Only UDP candidates with an IP are used."""
        if remote.transport != "udp" or not _is_ip(remote.host):
            return self._flush()
        known = next((c for c in self.remote_candidates if c.address == remote.address), None)
        if known is None:
            self.remote_candidates.append(remote)
        elif known.type is CandidateType.PRFLX and remote.type is not CandidateType.PRFLX:
            self._replace_prflx(known, remote)
        else:
            return self._flush()
        for local in self.local_candidates:
            if local.candidate.type is not CandidateType.SRFLX:
                self._pair(local, remote)
        self._wake(now)
        return self._flush()

    def _replace_prflx(self, known: Candidate, remote: Candidate) -> None:
        """A signalled candidate at the address of a peer-reflexive one learnt from an early
        check (trickle: the check overtook the signalling) is the same endpoint: it takes the
        peer-reflexive one's place, in the pairs too (their states are kept), so the path is
        reported as what it is (host, srflx, relay) and is paired with every local base.
        libwebrtc does the same."""
        self.remote_candidates[self.remote_candidates.index(known)] = remote
        for pair in self.pairs.values():
            if pair.remote is known:
                pair.remote = remote
                pair.priority = pair_priority(
                    self.controlling, pair.local.candidate.priority, remote.priority
                )

    def end_of_remote_candidates(self) -> None:
        self.remote_done = True

    def end_of_local_candidates(self) -> None:
        self.local_done = True

    def start(self, now: float) -> list[SendDatagram]:
        """Begin checking (remote credentials must be known)."""
        if self.remote_ufrag is None or self.remote_password is None:
            raise RuntimeError("set_remote_credentials() first")
        if self._started is None:
            self._started = now
            self._next_check = now
            self.state = IceState.CHECKING
        return self.on_timer(now)

    def close(self) -> None:
        self.state = IceState.CLOSED
        self._checks.clear()
        self._consent.clear()
        self._triggered.clear()
        self._early.clear()

    # --- pairs --------------------------------------------------------------------------------

    def _pair(self, local: LocalCandidate, remote: Candidate) -> Pair | None:
        cand = local.candidate
        if cand.component != remote.component or cand.v6 != remote.v6:
            return None
        if len(self.pairs) >= MAX_PAIRS:
            return None
        prio = pair_priority(self.controlling, cand.priority, remote.priority)
        key = (local.base_id, remote.address)
        existing = self.pairs.get(key)
        if existing is not None:
            existing.priority = max(existing.priority, prio)
            return existing
        pair = Pair(local, remote, prio)
        self.pairs[key] = pair
        # Section 6.1.2.6: the best pair of each foundation starts Waiting.
        same = [p for p in self.pairs.values() if p.foundation == pair.foundation]
        if not any(p.state is not PairState.FROZEN for p in same if p is not pair):
            best = max(same, key=lambda p: p.priority)
            if best.state is PairState.FROZEN:
                advance(best, PairEvent.UNFREEZE)
        return pair

    def _ordered(self) -> list[Pair]:
        return sorted(self.pairs.values(), key=lambda p: p.priority, reverse=True)

    def _recompute_priorities(self) -> None:
        for pair in self.pairs.values():
            pair.priority = pair_priority(
                self.controlling, pair.local.candidate.priority, pair.remote.priority
            )

    # --- checks ---------------------------------------------------------------------------

    def _send_check(self, pair: Pair, now: float, nominate: bool = False) -> None:
        assert self.remote_ufrag is not None and self.remote_password is not None
        local = pair.local.candidate
        prflx = candidate_priority(
            CandidateType.PRFLX, (local.priority >> 8) & 0xFFFF, local.component
        )
        msg = Message(Method.BINDING, MessageClass.REQUEST)
        msg.attributes += [
            Username(f"{self.remote_ufrag}:{self.local_ufrag}"),
            Priority(prflx),
            IceControlling(self.tie_breaker)
            if self.controlling
            else IceControlled(self.tie_breaker),
        ]
        if nominate:
            msg.attributes.append(UseCandidate())
        data = msg.encode(short_term_key(self.remote_password), fingerprint=True)
        tx = ClientTransaction(msg.transaction_id, data, pair.remote.address, self.check_policy)
        pair.transaction = tx
        pair.nominating = nominate
        self._checks[tx.tid] = (pair, tx, self.controlling, nominate)
        advance(pair, PairEvent.CHECK)
        self._out.append(SendDatagram(pair.local.base_id, pair.remote.address, tx.start(now)))

    def _role_attribute(self) -> IceControlling | IceControlled:
        if self.controlling:
            return IceControlling(self.tie_breaker)
        return IceControlled(self.tie_breaker)

    def _pace(self, now: float) -> None:
        """One check per Ta (section 6.1.4.2): triggered first, then Waiting, then Frozen."""
        if self.state is not IceState.CHECKING or now < self._next_check:
            return
        pair = None
        while self._triggered and pair is None:
            candidate = self._triggered.popleft()
            if candidate.state in (PairState.WAITING, PairState.IN_PROGRESS):
                pair = candidate
        if pair is None:
            ordered = self._ordered()
            pair = next((p for p in ordered if p.state is PairState.WAITING), None)
            if pair is None:
                pair = next((p for p in ordered if p.state is PairState.FROZEN), None)
                if pair is not None:
                    advance(pair, PairEvent.UNFREEZE)
        if pair is not None:
            self._send_check(pair, now)
            self._next_check = now + self.ta
        else:
            self._next_check = float("inf")  # woken again by new pairs or triggers

    def _wake(self, now: float) -> None:
        if self._next_check == float("inf"):
            self._next_check = now

    # --- input ----------------------------------------------------------------------------

    def on_datagram(
        self, base_id: int, source: Address, data: bytes, now: float
    ) -> tuple[list[SendDatagram], bytes | None]:
        """A datagram arrived on a base. Returns what to send, and application data (or None)."""
        if self.state is IceState.CLOSED:
            return [], None
        if not looks_like_stun(data):
            return [], data if self._known_remote(source) else None
        try:
            msg = decode(data)
        except StunParseError:
            return [], None
        if msg.get(Fingerprint) is not None and not check_fingerprint(msg):
            return [], None
        if msg.method != Method.BINDING:
            return [], None
        if msg.cls is MessageClass.REQUEST:
            self._on_request(msg, base_id, source, now)
        elif msg.cls in (MessageClass.SUCCESS, MessageClass.ERROR):
            self._on_response(msg, base_id, source, now)
        return self._flush(), None

    def _known_remote(self, source: Address) -> bool:
        return any(c.address == source for c in self.remote_candidates)

    def _on_request(self, msg: Message, base_id: int, source: Address, now: float) -> None:
        """Section 7.3: answer a check, repair role conflicts, learn peer-reflexive
        candidates, queue a triggered check, note USE-CANDIDATE."""
        username = msg.get(Username)
        key = short_term_key(self.local_password)
        if username is None or msg.get(Fingerprint) is None or msg.get(MessageIntegrity) is None:
            self._error(msg, base_id, source, 400)  # RFC 8489 section 9.1.3
            return
        if not username.value.startswith(self.local_ufrag + ":") or not check_integrity(msg, key):
            self._error(msg, base_id, source, 401)
            return
        unknown = msg.unknown_comprehension_required()
        if unknown:
            self._error(msg, base_id, source, 420, UnknownAttributes(tuple(unknown)))
            return
        their_controlling, their_controlled = msg.get(IceControlling), msg.get(IceControlled)
        if self.controlling and their_controlling is not None:
            if self.tie_breaker >= their_controlling.value:
                self._error(msg, base_id, source, 487)
                return
            self._switch_role(False)
        elif not self.controlling and their_controlled is not None:
            if self.tie_breaker >= their_controlled.value:
                self._switch_role(True)
            else:
                self._error(msg, base_id, source, 487)
                return
        response = Message(Method.BINDING, MessageClass.SUCCESS, msg.transaction_id)
        response.attributes.append(XorMappedAddress(*source))
        self._out.append(SendDatagram(base_id, source, response.encode(key, fingerprint=True)))
        if self.state in (IceState.FAILED, IceState.CLOSED):
            return
        prio = msg.get(Priority)
        check = _Check(
            base_id,
            source,
            prio.value if prio else 0,
            msg.get(UseCandidate) is not None,
            username.value[len(self.local_ufrag) + 1 :],
            now,
        )
        if self.remote_password is None:
            # Section 7.3: "it is possible (and in fact very likely) that the initiating agent
            # will receive a Binding request prior to receiving the candidates from its peer.
            # If this happens, the agent MUST immediately generate a response [...] Once the
            # answer is received, it MUST proceed with the remaining steps required, namely,
            # Sections 7.3.1.3, 7.3.1.4, and 7.3.1.5". Dropping them loses the one check a
            # symmetric NAT's peer-reflexive mapping shows itself with (see _replay_early).
            if len(self._early) < MAX_EARLY_CHECKS:
                self._early.append(check)
            return
        self._process_check(check, now)

    def _replay_early(self) -> None:
        """Sections 7.3.1.3-7.3.1.5 for the checks answered before the credentials came."""
        early, self._early = self._early, []
        for check in early:
            if check.remote_ufrag == self.remote_ufrag:  # else from another session: ignore
                self._process_check(check, check.received)

    def _process_check(self, check: _Check, now: float) -> None:
        """Section 7.3.1.3 (peer-reflexive remote), 7.3.1.4 (triggered check), 7.3.1.5
        (USE-CANDIDATE) for a check that was answered with a success."""
        base_id, source = check.base_id, check.source
        remote = next((c for c in self.remote_candidates if c.address == source), None)
        if remote is None:
            remote = self._learn_remote_prflx(source, check.priority)
        local = self._local_for_base(base_id)
        if local is None:
            return
        pair = self.pairs.get((base_id, source)) or self._pair(local, remote)
        if pair is None:
            return
        if check.use_candidate and not self.controlling:
            pair.use_candidate_seen = True
            if pair.state is PairState.SUCCEEDED and self.selected is None:
                self._select(pair, now)
        if pair.state is PairState.SUCCEEDED:
            return
        advance(pair, PairEvent.TRIGGER)
        if pair not in self._triggered:
            self._triggered.append(pair)
        self._wake(now)

    def _learn_remote_prflx(self, source: Address, priority: int) -> Candidate:
        self._prflx_seq += 1
        remote = Candidate(
            foundation=f"prflx{self._prflx_seq}",
            component=1,
            transport="udp",
            priority=priority,
            host=source[0],
            port=source[1],
            type=CandidateType.PRFLX,
        )
        self.remote_candidates.append(remote)
        return remote

    def _local_for_base(self, base_id: int) -> LocalCandidate | None:
        for local in self.local_candidates:
            if local.base_id == base_id and local.candidate.type is not CandidateType.SRFLX:
                return local
        return None

    def _error(
        self, msg: Message, base_id: int, source: Address, code: int, *extra: UnknownAttributes
    ) -> None:
        response = Message(Method.BINDING, MessageClass.ERROR, msg.transaction_id)
        response.attributes.append(ErrorCode(code, ""))
        response.attributes.extend(extra)
        key = short_term_key(self.local_password) if code not in (400, 401) else None
        self._out.append(SendDatagram(base_id, source, response.encode(key, fingerprint=True)))

    def _switch_role(self, controlling: bool) -> None:
        log.info(
            "ICE role conflict: switching to %s", "controlling" if controlling else "controlled"
        )
        self.controlling = controlling
        self._recompute_priorities()

    def _on_response(self, msg: Message, base_id: int, source: Address, now: float) -> None:
        if msg.transaction_id in self._consent:
            self._on_consent_response(msg, base_id, source, now)
            return
        entry = self._checks.get(msg.transaction_id)
        if entry is None or self.remote_password is None:
            return
        pair, tx, sent_controlling, nominating = entry
        if not check_integrity(msg, short_term_key(self.remote_password)):
            return  # a forged or corrupted answer is no answer (section 7.2.5.1)
        for tid in [t for t, e in self._checks.items() if e[0] is pair]:
            del self._checks[tid]
        pair.transaction = None
        pair.nominating = False
        if msg.cls is MessageClass.ERROR:
            code = msg.get(ErrorCode)
            if code is not None and code.code == 487:
                # Section 7.2.5.1: take the role opposite to the one the request carried, if
                # not done already, and check the pair again.
                if self.controlling == sent_controlling:
                    self._switch_role(not sent_controlling)
                advance(pair, PairEvent.TRIGGER)
                self._triggered.append(pair)
                self._wake(now)
                return
            advance(pair, PairEvent.FAILURE)
            self._check_failed(now)
            return
        if base_id != pair.local.base_id or source != pair.remote.address:
            advance(pair, PairEvent.FAILURE)  # non-symmetric (section 7.2.5.2.1)
            self._check_failed(now)
            return
        mapped = msg.get(XorMappedAddress)
        pair.rtt = now - tx.started
        pair.valid_local = self._valid_local(pair, mapped.address if mapped else None, tx)
        advance(pair, PairEvent.SUCCESS)
        if self._first_valid is None:
            self._first_valid = now
        for other in self.pairs.values():
            if other.state is PairState.FROZEN and other.foundation == pair.foundation:
                advance(other, PairEvent.UNFREEZE)
        if nominating and self.controlling:
            pair.nominated = True
            self._select(pair, now)
        elif not self.controlling and pair.use_candidate_seen and self.selected is None:
            self._select(pair, now)
        self._wake(now)

    def _valid_local(
        self, pair: Pair, mapped: Address | None, tx: ClientTransaction
    ) -> LocalCandidate:
        """Section 7.2.5.3.1: the local candidate the mapped address names, peer-reflexive
        when it is none of ours."""
        if mapped is None or mapped == pair.local.candidate.address:
            return pair.local
        for local in self.local_candidates:
            if local.candidate.address == mapped and local.base_id == pair.local.base_id:
                return local
        base = pair.local.candidate
        prflx = Candidate(
            foundation=foundation(CandidateType.PRFLX, pair.local.base[0]),
            component=base.component,
            transport="udp",
            priority=candidate_priority(CandidateType.PRFLX, (base.priority >> 8) & 0xFFFF),
            host=mapped[0],
            port=mapped[1],
            type=CandidateType.PRFLX,
            related_host=pair.local.base[0],
            related_port=pair.local.base[1],
        )
        local = LocalCandidate(prflx, pair.local.base_id, pair.local.base)
        self.local_candidates.append(local)
        return local

    def _check_failed(self, now: float) -> None:
        if (
            self.selected is None
            and self.remote_done
            and self.local_done
            and self.pairs
            and all(p.state is PairState.FAILED for p in self.pairs.values())
        ):
            self._fail("every candidate pair failed", now)

    # --- nomination and selection ------------------------------------------------------------

    def _maybe_nominate(self, now: float) -> None:
        if not self.controlling or self.selected is not None or self.state is not IceState.CHECKING:
            return
        if any(p.nominating and p.transaction is not None for p in self.pairs.values()):
            return
        valid = [p for p in self.pairs.values() if p.state is PairState.SUCCEEDED]
        if not valid:
            return
        best = max(valid, key=lambda p: p.priority)
        pending = any(
            p.priority > best.priority
            and p.state in (PairState.FROZEN, PairState.WAITING, PairState.IN_PROGRESS)
            for p in self.pairs.values()
        )
        assert self._first_valid is not None
        if pending and now < self._first_valid + self.nomination_wait:
            return
        self._send_check(best, now, nominate=True)

    def _select(self, pair: Pair, now: float) -> None:
        self.selected = pair
        self.state = IceState.CONNECTED
        self._last_consent = now
        self._next_consent = now + self._consent_delay()
        log.info("ICE connected over %s (rtt %s)", pair.describe(), pair.rtt)
        # Stop checking other pairs (section 8.3): their transactions are abandoned.
        self._checks = {tid: e for tid, e in self._checks.items() if e[0] is pair}
        self._triggered.clear()

    def _consent_delay(self) -> float:
        return self.consent_interval * self.rng.uniform(0.8, 1.2)

    def _send_consent(self, now: float) -> None:
        pair = self.selected
        assert pair is not None and self.remote_password is not None
        msg = Message(Method.BINDING, MessageClass.REQUEST)
        msg.attributes += [
            Username(f"{self.remote_ufrag}:{self.local_ufrag}"),
            Priority(pair.local.candidate.priority),
            IceControlling(self.tie_breaker)
            if self.controlling
            else IceControlled(self.tie_breaker),
        ]
        data = msg.encode(short_term_key(self.remote_password), fingerprint=True)
        tx = ClientTransaction(msg.transaction_id, data, pair.remote.address, self.check_policy)
        self._consent[tx.tid] = tx
        self._out.append(SendDatagram(pair.local.base_id, pair.remote.address, tx.start(now)))

    def _on_consent_response(self, msg: Message, base_id: int, source: Address, now: float) -> None:
        tx = self._consent.pop(msg.transaction_id)
        pair = self.selected
        if pair is None or self.remote_password is None:
            return
        ok = (
            msg.cls is MessageClass.SUCCESS
            and check_integrity(msg, short_term_key(self.remote_password))
            and source == pair.remote.address
            and base_id == pair.local.base_id
        )
        if ok:
            self._last_consent = now
            pair.rtt = now - tx.started

    # --- timers -------------------------------------------------------------------------------

    def on_timer(self, now: float) -> list[SendDatagram]:
        self._last_tick = now
        if self.state in (IceState.FAILED, IceState.CLOSED, IceState.NEW):
            return self._flush()
        for tid, (pair, tx, _, _) in list(self._checks.items()):
            if tx is not pair.transaction:  # cancelled by a triggered check: answers still count
                if now >= tx.started + self.check_policy.total():
                    del self._checks[tid]
                continue
            if now < tx.deadline:
                continue
            data = tx.on_timer(now)
            if data is not None:
                self._out.append(SendDatagram(pair.local.base_id, tx.destination, data))
            elif tx.timed_out(now):
                del self._checks[tid]
                pair.transaction = None
                if pair.state is PairState.IN_PROGRESS:
                    advance(pair, PairEvent.FAILURE)
                pair.nominating = False
                self._check_failed(now)
        for tid, tx in list(self._consent.items()):
            if now >= tx.deadline:
                data = tx.on_timer(now)
                if data is not None and self.selected is not None:
                    self._out.append(
                        SendDatagram(self.selected.local.base_id, tx.destination, data)
                    )
                elif tx.timed_out(now):
                    del self._consent[tid]
        if self.state is IceState.CHECKING:
            self._pace(now)
            self._maybe_nominate(now)
            assert self._started is not None
            if self.selected is None and now >= self._started + self.failure_timeout:
                self._fail(f"no working candidate pair after {self.failure_timeout:g} s", now)
        elif self.state is IceState.CONNECTED:
            if now >= self._last_consent + self.consent_timeout:
                self._fail("consent expired (RFC 7675)", now)
            elif now >= self._next_consent:
                self._send_consent(now)
                self._next_consent = now + self._consent_delay()
        return self._flush()

    def next_deadline(self) -> float | None:
        if self.state in (IceState.FAILED, IceState.CLOSED, IceState.NEW):
            return None
        times = [tx.deadline for p, tx, _, _ in self._checks.values() if tx is p.transaction]
        times += [tx.deadline for tx in self._consent.values()]
        if self.state is IceState.CHECKING:
            assert self._started is not None
            times.append(self._next_check)
            times.append(self._started + self.failure_timeout)
            nominating = any(p.nominating and p.transaction for p in self.pairs.values())
            if self.controlling and self._first_valid is not None and not nominating:
                wait_until = self._first_valid + self.nomination_wait
                if wait_until > self._last_tick:
                    times.append(wait_until)
        elif self.state is IceState.CONNECTED:
            times += [self._next_consent, self._last_consent + self.consent_timeout]
        finite = [t for t in times if t != float("inf")]
        return min(finite, default=None)

    def _fail(self, reason: str, now: float) -> None:
        if self.state in (IceState.FAILED, IceState.CLOSED):
            return
        self.state = IceState.FAILED
        self.failure_reason = reason
        log.info("ICE failed: %s", reason)
        self._checks.clear()
        self._consent.clear()
        self._triggered.clear()

    # --- data -------------------------------------------------------------------------------

    def send(self, data: bytes) -> list[SendDatagram]:
        """Application data over the selected pair."""
        if self.state is not IceState.CONNECTED or self.selected is None:
            raise RuntimeError(f"not connected (state {self.state})")
        pair = self.selected
        return [SendDatagram(pair.local.base_id, pair.remote.address, data)]

    def _flush(self) -> list[SendDatagram]:
        out, self._out = self._out, []
        return out


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
