"""NAT vocabulary and classification (stunturn.nat.classify): the classic RFC 3489 label for
every combination of evidence, and the peer-to-peer outlook matrix."""

from __future__ import annotations

import itertools

import pytest

from stunturn.nat import Behaviour, NatType, classic_type, direct_possible, outlook

E = Behaviour.ENDPOINT_INDEPENDENT
A = Behaviour.ADDRESS_DEPENDENT
P = Behaviour.ADDRESS_AND_PORT_DEPENDENT
U = Behaviour.UNKNOWN

OPEN = NatType.OPEN_INTERNET
FULL = NatType.FULL_CONE
RESTRICTED = NatType.RESTRICTED_CONE
PORT_RESTRICTED = NatType.PORT_RESTRICTED_CONE
SYM = NatType.SYMMETRIC
FIREWALL = NatType.SYMMETRIC_UDP_FIREWALL
BLOCKED = NatType.UDP_BLOCKED
UNKNOWN = NatType.UNKNOWN
KNOWN = (OPEN, FULL, RESTRICTED, PORT_RESTRICTED, SYM, FIREWALL)


def test_json_vocabulary() -> None:
    """The strings written to natprobe/1 reports are stable."""
    assert [b.value for b in Behaviour] == [
        "endpoint-independent",
        "address-dependent",
        "address-and-port-dependent",
        "unknown",
    ]
    assert [t.value for t in NatType] == [
        "open-internet",
        "full-cone",
        "restricted-cone",
        "port-restricted-cone",
        "symmetric",
        "symmetric-udp-firewall",
        "udp-blocked",
        "unknown",
    ]


# The table, written out: (nat_detected, mapping, filtering) -> label, without UDP blocked.
# No NAT: the mapping does not matter, the filtering decides.
_NO_NAT = {E: OPEN, A: FIREWALL, P: FIREWALL, U: UNKNOWN}
# Behind a NAT: a dependent mapping is symmetric whatever the filtering; EIM: the filtering
# names the cone; an unknown mapping says nothing.
_NAT_EIM = {E: FULL, A: RESTRICTED, P: PORT_RESTRICTED, U: UNKNOWN}


def _expected(nat: bool | None, mapping: Behaviour, filtering: Behaviour) -> NatType:
    if nat is None:
        return UNKNOWN
    if not nat:
        return _NO_NAT[filtering]
    if mapping in (A, P):
        return SYM
    if mapping is E:
        return _NAT_EIM[filtering]
    return UNKNOWN


CASES = list(itertools.product((None, False, True), list(Behaviour), list(Behaviour)))


@pytest.mark.parametrize(("nat", "mapping", "filtering"), CASES)
def test_classic_type_table(nat: bool | None, mapping: Behaviour, filtering: Behaviour) -> None:
    """Every (NAT detected, mapping, filtering) gives the documented label; UDP blocked wins
    over everything; nothing unknown is ever guessed into a cone."""
    got = classic_type(nat, mapping, filtering)
    assert got is _expected(nat, mapping, filtering)
    assert classic_type(nat, mapping, filtering, udp_blocked=True) is BLOCKED
    if U in (mapping, filtering) and nat:
        assert got in (SYM, UNKNOWN)


def test_classic_type_spot_checks() -> None:
    """The well-known names, spelled out."""
    assert classic_type(True, E, E) is FULL
    assert classic_type(True, E, A) is RESTRICTED
    assert classic_type(True, E, P) is PORT_RESTRICTED
    assert classic_type(True, P, P) is SYM
    assert classic_type(True, A, E) is SYM
    assert classic_type(True, U, P) is UNKNOWN
    assert classic_type(False, E, E) is OPEN
    assert classic_type(False, E, P) is FIREWALL
    assert classic_type(None, U, U, udp_blocked=True) is BLOCKED


# The outlook, written out as the docs state it: direct between cones, between a full or
# restricted cone and a symmetric NAT, and with no NAT at all; relay when a symmetric NAT meets a
# symmetric NAT, a port-restricted cone or a symmetric UDP firewall.
RELAY_PAIRS = {
    frozenset((SYM, SYM)),
    frozenset((SYM, PORT_RESTRICTED)),
    frozenset((SYM, FIREWALL)),
}


@pytest.mark.parametrize(("a", "b"), list(itertools.product(KNOWN, KNOWN)))
def test_direct_possible_matrix(a: NatType, b: NatType) -> None:
    """direct_possible is symmetric and false exactly for the documented relay pairs."""
    expected = frozenset((a, b)) not in RELAY_PAIRS
    assert direct_possible(a, b) is expected
    assert direct_possible(b, a) is expected


def test_direct_possible_rules_of_thumb() -> None:
    """The rules as prose: cone-cone, full/restricted cone with symmetric and no-NAT with
    anything are direct; symmetric with symmetric, port-restricted or firewall is relayed."""
    cones = (FULL, RESTRICTED, PORT_RESTRICTED)
    assert all(direct_possible(x, y) for x in cones for y in cones)
    assert direct_possible(FULL, SYM) and direct_possible(RESTRICTED, SYM)
    assert all(direct_possible(OPEN, x) for x in KNOWN)
    assert not any(direct_possible(SYM, x) for x in (SYM, PORT_RESTRICTED, FIREWALL))


@pytest.mark.parametrize("other", [*KNOWN, BLOCKED, UNKNOWN])
def test_direct_possible_unknown_and_blocked(other: NatType) -> None:
    """An unknown side gives no prediction (None); UDP blocked on one side means no direct
    path (False) unless the other side is unknown."""
    assert direct_possible(UNKNOWN, other) is None
    assert direct_possible(other, UNKNOWN) is None
    if other is not UNKNOWN:
        assert direct_possible(BLOCKED, other) is False
        assert direct_possible(other, BLOCKED) is False


@pytest.mark.parametrize("nat", KNOWN)
def test_outlook_lists(nat: NatType) -> None:
    """outlook() splits the six known peer types into direct and relay exactly as
    direct_possible does, and the summary names the relayed ones."""
    look = outlook(nat)
    assert set(look.direct_with) | set(look.relay_with) == set(KNOWN)
    assert not set(look.direct_with) & set(look.relay_with)
    assert set(look.relay_with) == {p for p in KNOWN if frozenset((nat, p)) in RELAY_PAIRS}
    if look.relay_with:
        assert all(p.value in look.summary for p in look.relay_with)
        assert "TURN relay" in look.summary
    else:
        assert "any NAT type" in look.summary


def test_outlook_of_symmetric() -> None:
    """A symmetric NAT: direct with no NAT and the two permissive cones only."""
    look = outlook(SYM)
    assert look.direct_with == (OPEN, FULL, RESTRICTED)
    assert look.relay_with == (PORT_RESTRICTED, SYM, FIREWALL)


def test_outlook_blocked_and_unknown() -> None:
    """UDP blocked: relay (over TCP/TLS) with everyone; unknown: no prediction at all."""
    blocked = outlook(BLOCKED)
    assert blocked.direct_with == () and set(blocked.relay_with) == set(KNOWN)
    assert "TCP" in blocked.summary
    unknown = outlook(UNKNOWN)
    assert unknown.direct_with == () == unknown.relay_with
    assert "no prediction" in unknown.summary
