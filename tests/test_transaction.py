"""Client transaction timing (stunturn.stun.transaction): RFC 8489 section 6.2.1's schedule,
natprobe's shorter policy, reliable transports and response source matching. Pure arithmetic
on ``now``: the tests step a timeline, nothing sleeps."""

from __future__ import annotations

import pytest

from stunturn.nat import PROBE_POLICY
from stunturn.stun.transaction import RFC8489_DEFAULT, ClientTransaction, RetransmitPolicy

DEST = ("192.0.2.1", 3478)
DATA = b"request"


def schedule(tx: ClientTransaction, start: float = 0.0) -> tuple[list[float], float]:
    """Drive ``tx`` by calling on_timer exactly at each deadline: (send times, timeout time)."""
    sends = [start]
    assert tx.start(start) == DATA
    for _ in range(100):
        now = tx.deadline
        assert not tx.timed_out(now - 1e-9)
        data = tx.on_timer(now)
        if data is None:
            assert tx.timed_out(now)
            return sends, now
        assert data == DATA
        sends.append(now)
    raise AssertionError("never timed out")


def test_rfc8489_default_schedule() -> None:
    """RFC 8489 section 6.2.1: RTO 500 ms doubling, 7 transmissions at 0, 0.5, 1.5, 3.5, 7.5,
    15.5 and 31.5 s, then Rm x RTO = 8 s more: a timeout at 39.5 s."""
    assert RetransmitPolicy(rto=0.5, rc=7, rm=16, reliable_timeout=39.5) == RFC8489_DEFAULT
    sends, timeout = schedule(ClientTransaction(b"t" * 12, DATA, DEST))
    assert sends == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert timeout == 39.5
    assert RFC8489_DEFAULT.total() == 39.5


def test_schedule_is_relative_to_start() -> None:
    """The same schedule, shifted, when the transaction starts at an arbitrary ``now``."""
    sends, timeout = schedule(ClientTransaction(b"t" * 12, DATA, DEST), start=1000.25)
    assert [s - 1000.25 for s in sends] == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert timeout - 1000.25 == 39.5


def test_natprobe_policy() -> None:
    """natprobe's policy: the RFC's RTO, 3 transmissions (0, 0.5, 1.5 s) and a final wait of
    2 RTO, so a test that gets no answer gives up after 2.5 s."""
    assert PROBE_POLICY.rto == 0.5 and PROBE_POLICY.rc == 3 and PROBE_POLICY.rm == 2
    tx = ClientTransaction(b"t" * 12, DATA, DEST, PROBE_POLICY)
    sends, timeout = schedule(tx)
    assert sends == [0.0, 0.5, 1.5]
    assert timeout == 2.5 == PROBE_POLICY.total()
    assert tx.sent == 3


def test_single_transmission_policy() -> None:
    """rc=1: one transmission, then Rm x RTO of waiting."""
    policy = RetransmitPolicy(rto=0.2, rc=1, rm=4)
    sends, timeout = schedule(ClientTransaction(b"t" * 12, DATA, DEST, policy))
    assert sends == [0.0] and timeout == pytest.approx(0.8)


def test_reliable_is_one_attempt() -> None:
    """Over TCP/TLS there is no retransmission: one send, one timeout after
    ``reliable_timeout`` (39.5 s by default, 3 s for natprobe)."""
    for policy, limit in ((RFC8489_DEFAULT, 39.5), (PROBE_POLICY, 3.0)):
        tx = ClientTransaction(b"t" * 12, DATA, DEST, policy, reliable=True)
        assert tx.start(10.0) == DATA
        assert tx.deadline == 10.0 + limit
        assert tx.on_timer(10.0 + limit / 2) is None
        assert not tx.timed_out(10.0 + limit - 0.001)
        assert tx.on_timer(10.0 + limit) is None
        assert tx.timed_out(10.0 + limit)
        assert tx.sent == 1


def test_early_timer_sends_nothing() -> None:
    """A timer firing before the deadline neither retransmits nor times out."""
    tx = ClientTransaction(b"t" * 12, DATA, DEST, PROBE_POLICY)
    tx.start(0.0)
    assert tx.on_timer(0.3) is None
    assert tx.sent == 1 and not tx.timed_out(0.3)
    assert tx.on_timer(0.5) == DATA and tx.deadline == 1.5


def test_late_timer_reschedules_from_now() -> None:
    """A timer that fires late retransmits then, and the next interval (doubled) counts from
    that moment: the schedule never bunches up."""
    tx = ClientTransaction(b"t" * 12, DATA, DEST, PROBE_POLICY)
    tx.start(0.0)
    assert tx.on_timer(0.8) == DATA
    assert tx.deadline == pytest.approx(1.8)
    assert tx.on_timer(1.8) == DATA
    assert tx.deadline == pytest.approx(2.8)  # last transmission + rm x rto


def test_sources_default_to_the_destination() -> None:
    """A response answers the request only when it comes from where the request went."""
    tx = ClientTransaction(b"t" * 12, DATA, DEST)
    assert tx.sources == frozenset({DEST})
    assert tx.accepts(DEST)
    assert not tx.accepts(("192.0.2.1", 3479))
    assert not tx.accepts(("192.0.2.2", 3478))


def test_sources_for_change_request() -> None:
    """An RFC 5780 CHANGE-REQUEST test expects its reply from another address: that one is an
    answer, and the address the request went to is not."""
    other = ("192.0.2.2", 3479)
    tx = ClientTransaction(b"t" * 12, DATA, DEST, sources=frozenset({other}))
    assert tx.accepts(other)
    assert not tx.accepts(DEST)
