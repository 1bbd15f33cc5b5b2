"""Relay port selection: the per-worker share, EVEN-PORT, RESERVATION-TOKENs (RFC 8656 7.2).

:class:`PortPool` is tested directly, then through the TURN core with the in-memory binder.
"""

from __future__ import annotations

import random

import pytest
from turn_helpers import (
    CLIENT,
    CLIENT2,
    PORT_SECRET,
    RELAY_V4,
    RELAY_V6,
    error_code,
    is_success,
    make_server,
    relayed,
)

from stunturn.stun.attributes import EvenPort, RequestedAddressFamily, ReservationToken
from stunturn.turn import PortPool, QuotaLimits
from stunturn.turn.ports import RESERVATION_LIFETIME

LOW, HIGH = 50000, 50099
IP = "192.0.2.100"


def pool(
    *, worker: int = 0, workers: int = 1, seed: int = 0, secret: bytes = PORT_SECRET
) -> PortPool:
    return PortPool(LOW, HIGH, secret, worker=worker, workers=workers, rng=random.Random(seed))


@pytest.mark.parametrize(("low", "high"), [(0, 10), (10, 9), (1, 65536), (70000, 70001)])
def test_bad_ranges_are_refused(low: int, high: int) -> None:
    with pytest.raises(ValueError, match="relay port range"):
        PortPool(low, high, PORT_SECRET)


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_each_worker_owns_whole_pairs(workers: int) -> None:
    """Worker i gets exactly the ports p with (p // 2) % workers == i: pairs p, p+1 (p even)
    stay with one worker, the shares are disjoint and cover the range."""
    shares = [set(pool(worker=i, workers=workers).candidates(IP)) for i in range(workers)]
    for i, share in enumerate(shares):
        assert share == {p for p in range(LOW, HIGH + 1) if (p // 2) % workers == i}
        for p in share:
            assert (p ^ 1) in share or not LOW <= (p ^ 1) <= HIGH
    assert set().union(*shares) == set(range(LOW, HIGH + 1))
    assert sum(map(len, shares)) == HIGH - LOW + 1


def test_mine() -> None:
    p = pool(worker=1, workers=2)
    assert p.mine(50002) and p.mine(50003)
    assert not p.mine(50000) and not p.mine(50001)
    assert not p.mine(LOW - 2) and not p.mine(HIGH + 2)


@pytest.mark.parametrize("seed", range(5))
def test_candidates_are_each_free_port_once_in_random_order(seed: int) -> None:
    p = pool(seed=seed)
    p.take(IP, 50010)
    ports = list(p.candidates(IP))
    assert len(ports) == len(set(ports)) == HIGH - LOW
    assert 50010 not in ports
    assert set(p.candidates("198.51.100.1")) == set(range(LOW, HIGH + 1))  # per IP


def test_random_start() -> None:
    firsts = {next(pool(seed=s).candidates(IP)) for s in range(20)}
    assert len(firsts) > 5


def test_even_candidates() -> None:
    p = pool()
    p.take(IP, 50020)
    ports = list(p.candidates(IP, even=True))
    assert all(port % 2 == 0 for port in ports)
    assert set(ports) == set(range(LOW, HIGH + 1, 2)) - {50020}


def test_pair_candidates_need_the_next_port_free() -> None:
    """EVEN-PORT with R: an even port whose successor is free and inside the range."""
    p = PortPool(50000, 50008, PORT_SECRET)
    p.take(IP, 50003)
    ports = set(p.candidates(IP, even=True, pair=True))
    assert ports == {50000, 50004, 50006}  # 50002: 50003 taken; 50008: 50009 out of range


def test_take_and_release() -> None:
    p = pool()
    p.take(IP, 50001)
    assert p.in_use(IP) == {50001}
    p.release(IP, 50001)
    p.release(IP, 50001)  # idempotent
    assert p.in_use(IP) == set()


# --- reservation tokens ---------------------------------------------------------------------


def test_reservation_token_round_trip() -> None:
    """reserve() holds the port and returns an 8-byte token; redeem() gives the port back and
    lifts the reservation (the caller then binds and takes it)."""
    p = pool()
    token = p.reserve(IP, 50011, now=100.0)
    assert len(token) == 8
    assert 50011 in p.in_use(IP)
    assert 50011 not in set(p.candidates(IP))
    assert p.next_expiry() == 100.0 + RESERVATION_LIFETIME
    assert p.redeem(token, IP, now=110.0) == 50011
    assert 50011 not in p.in_use(IP)
    assert p.next_expiry() is None


@pytest.mark.parametrize("byte", range(8))
def test_forged_tokens_are_refused(byte: int) -> None:
    """Any changed byte (port, expiry or MAC) invalidates the token."""
    p = pool()
    token = bytearray(p.reserve(IP, 50011, now=100.0))
    token[byte] ^= 0x01
    assert p.redeem(bytes(token), IP, now=101.0) is None


@pytest.mark.parametrize("token", [b"", b"\x00" * 7, b"\x00" * 9, b"\x00" * 8])
def test_malformed_tokens_are_refused(token: bytes) -> None:
    assert pool().redeem(token, IP, now=0.0) is None


def test_token_is_bound_to_the_relay_ip() -> None:
    p = pool()
    token = p.reserve(IP, 50011, now=100.0)
    assert p.redeem(token, "192.0.2.101", now=101.0) is None
    assert p.redeem(token, IP, now=101.0) == 50011


def test_token_from_another_worker_with_the_same_secret() -> None:
    """Tokens are self-validating: another worker holding the secret redeems them; a pool
    with another secret does not."""
    minted = pool(worker=0, workers=2).reserve(IP, 50000, now=5.0)
    assert pool(worker=1, workers=2).redeem(minted, IP, now=6.0) == 50000
    assert pool(secret=b"another-secret-of-32-bytes......").redeem(minted, IP, now=6.0) is None


def test_token_expiry() -> None:
    """Valid until the (whole-second) expiry, refused from the next second on."""
    p = pool()
    token = p.reserve(IP, 50011, now=100.0)
    assert p.redeem(token, IP, now=130.9) == 50011
    token = p.reserve(IP, 50013, now=100.0)
    assert p.redeem(token, IP, now=131.0) is None


def test_token_expiry_across_the_16_bit_wrap() -> None:
    """The expiry is kept modulo 2**16 seconds; a token minted just before the wrap still
    validates just after it, and expires normally."""
    p = pool()
    token = p.reserve(IP, 50011, now=65530.0)
    assert p.redeem(token, IP, now=65545.0) == 50011
    token = p.reserve(IP, 50013, now=65530.0)
    assert p.redeem(token, IP, now=65561.0) is None


def test_reservations_expire() -> None:
    p = pool()
    p.reserve(IP, 50011, now=0.0)
    p.reserve(IP, 50013, now=10.0)
    assert p.expire(29.9) == []
    assert p.expire(30.0) == [(IP, 50011)]
    assert p.in_use(IP) == {50013}
    assert p.next_expiry() == 40.0
    assert p.expire(100.0) == [(IP, 50013)]
    assert p.in_use(IP) == set()


# --- through the core -------------------------------------------------------------------------


def test_no_port_is_handed_out_twice() -> None:
    """Allocations until the pool is empty: every relayed address distinct, then 508."""
    server = make_server(relay_ports=(50000, 50015), limits=QuotaLimits(per_user=0))
    results = [server.client(address=(CLIENT[0], 1000 + i)).allocate() for i in range(17)]
    addresses = [relayed(r)[0] for r in results[:16]]
    assert len(set(addresses)) == 16
    assert error_code(results[16]) == 508


def test_workers_never_share_a_port() -> None:
    """Two workers' cores with the same range hand out disjoint ports, each from its share."""
    w0 = make_server(relay_ports=(50000, 50015), worker=0, workers=2)
    w1 = make_server(relay_ports=(50000, 50015), worker=1, workers=2)
    ports = []
    for w, server in enumerate((w0, w1)):
        for i in range(8):
            [(_, port)] = relayed(server.client(address=(CLIENT[0], 1000 + i)).allocate())
            assert (port // 2) % 2 == w
            ports.append(port)
        assert error_code(server.client(address=CLIENT2).allocate()) == 508
    assert len(set(ports)) == 16


def test_redeemed_token_cannot_be_used_twice() -> None:
    server = make_server()
    token = server.client().allocate(EvenPort(True)).get(ReservationToken)
    assert token is not None
    assert is_success(server.client("bob", address=CLIENT2).allocate(token))
    third = server.client("bob", address=(CLIENT2[0], CLIENT2[1] + 1))
    assert error_code(third.allocate(token)) == 508


def test_reservation_token_for_an_ipv6_relay() -> None:
    server = make_server(relay_ips=(RELAY_V4, RELAY_V6))
    response = server.client().allocate(EvenPort(True), RequestedAddressFamily(2))
    [(host, port)] = relayed(response)
    token = response.get(ReservationToken)
    assert host == RELAY_V6 and token is not None
    assert relayed(server.client("bob", address=CLIENT2).allocate(token)) == [(RELAY_V6, port + 1)]


def test_reservation_lapses_on_the_timer() -> None:
    """An unredeemed reservation is dropped by the core's timer 30 s later: the port is free."""
    server = make_server()
    response = server.client().allocate(EvenPort(True))
    [(_, port)] = relayed(response)
    assert port + 1 in server.turn.ports.in_use(RELAY_V4)
    assert server.core.next_deadline() == RESERVATION_LIFETIME
    server.step_to(RESERVATION_LIFETIME)
    assert port + 1 not in server.turn.ports.in_use(RELAY_V4)


def test_every_reservation_lapses_on_the_timer() -> None:
    """Two reservations 10 s apart: the second must lapse at its own time (40 s)."""
    server = make_server()
    first = server.client().allocate(EvenPort(True))
    server.step_to(10)
    second = server.client("bob", address=CLIENT2).allocate(EvenPort(True))
    [(_, port)] = relayed(second)
    assert is_success(first) and is_success(second)
    server.step_to(30)  # the first reservation lapses; the I/O layer re-arms next_deadline()
    deadline = server.core.next_deadline()
    assert deadline is not None and deadline <= 40
    server.step_to(40)
    assert port + 1 not in server.turn.ports.in_use(RELAY_V4)
