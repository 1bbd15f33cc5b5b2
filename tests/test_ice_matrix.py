"""Two ICE agents behind every combination of NAT types, with STUN and a real TURN core, in
simulated time (see ``ice_sim.py``): which path they pick, how long it takes, and what happens
without TURN, with packet loss, with trickling and with ChannelData.

A is controlling and behind the first NAT type, B behind the second. With the default 10 ms
per hop, STUN and TURN available, the measured outcome is the pair A selected (its local and
remote candidate types: h host, s srflx, p prflx, r relay; R = through TURN) and the simulated
seconds from the start of checks until both agents are connected::

    A \\ B        no NAT      full cone   restricted  port-restr. symmetric
    no NAT        h-h  0.07   h-s  1.09   h-s  1.09   h-s  1.09   h-p  1.09
    full cone     s-h  0.07   s-s  1.09   s-s  1.09   s-s  1.09   s-p  1.14
    restricted    s-h  0.07   s-s  1.09   s-s  1.09   s-s  1.09   s-p  1.14
    port-restr.   s-h  0.07   s-s  1.09   s-s  1.09   s-s  1.09   s-r  1.33 R
    symmetric     p-h  0.07   p-s  1.09   p-s  1.09   p-r  1.30 R p-r  1.68 R

Most pairs take ~1.1 s because regular nomination waits up to ``nomination_wait`` (1 s) while
the host-to-host pair to an unreachable private address is still being checked. The table is
printed by ``pytest -s -k matrix_table``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from ice_sim import (
    RELAY_IP,
    BusyLoop,
    Flavour,
    IceSim,
    Outcome,
    SimConfig,
    direct_path_exists,
    relayed,
    simulate,
)

from stunturn.ice import IceAgent, IceState, PairState
from stunturn.nat.classify import Behaviour
from stunturn.nat.sim import SimNat, SimNetwork
from stunturn.stun import Address, MessageClass, decode, looks_like_stun

PAIRS = list(itertools.product(Flavour, Flavour))
RELAY_ONLY = {
    (Flavour.SYMMETRIC, Flavour.SYMMETRIC),
    (Flavour.SYMMETRIC, Flavour.PORT_RESTRICTED),
    (Flavour.PORT_RESTRICTED, Flavour.SYMMETRIC),
}
NATTED = [f for f in Flavour if f is not Flavour.NONE]


def ids(pair: tuple[Flavour, Flavour]) -> str:
    return f"{pair[0]}/{pair[1]}"


def test_expected_direct_paths() -> None:
    """The rule the matrix checks: a direct path exists unless a symmetric NAT meets a
    port-restricted or symmetric one."""
    assert {p for p in PAIRS if not direct_path_exists(*p)} == RELAY_ONLY


@pytest.fixture(scope="module")
def with_turn() -> dict[tuple[Flavour, Flavour], Outcome]:
    return {pair: simulate(*pair) for pair in PAIRS}


def assert_consistent(outcome: Outcome) -> None:
    """Both agents selected the same pair, seen from each end."""
    a, b = outcome.a.path, outcome.b.path
    assert a is not None and b is not None
    assert (a.local, a.remote) == (b.remote, b.local)
    assert a.relayed == b.relayed


@pytest.mark.parametrize("pair", PAIRS, ids=ids)
def test_matrix_with_turn(
    pair: tuple[Flavour, Flavour], with_turn: dict[tuple[Flavour, Flavour], Outcome]
) -> None:
    """With STUN and TURN both agents connect, agree on the pair, exchange data; the path is
    direct (host/srflx/prflx at both ends) whenever hole punching can work, and relayed only for
    symmetric NAT against symmetric or port-restricted."""
    outcome = with_turn[pair]
    assert outcome.connected, outcome.describe()
    assert_consistent(outcome)
    assert outcome.data_ok
    assert outcome.relayed is (pair in RELAY_ONLY)
    assert outcome.a.path is not None
    if not outcome.relayed:
        assert RELAY_IP not in (outcome.a.path.local[0], outcome.a.path.remote[0])
    ttc = outcome.time_to_connect
    assert ttc is not None and ttc < (2.0 if outcome.relayed else 1.2)


def test_matrix_table(with_turn: dict[tuple[Flavour, Flavour], Outcome]) -> None:
    """The time-to-connect matrix (printed with -s); every direct case under 1.2 s and every
    relayed one under 2 s of simulated time."""
    width = 25
    lines = ["A \\ B".ljust(18) + "".join(f.value.ljust(width) for f in Flavour)]
    for fa in Flavour:
        cells = []
        for fb in Flavour:
            o = with_turn[(fa, fb)]
            assert o.a.path is not None and o.time_to_connect is not None
            kind = "RELAY " if o.relayed else ""
            cells.append(f"{kind}{o.a.path.describe()} {o.time_to_connect:.2f}s".ljust(width))
        lines.append(fa.value.ljust(18) + "".join(cells))
    print("\n" + "\n".join(lines))
    assert sum(o.relayed for o in with_turn.values()) == len(RELAY_ONLY)


def test_matrix_with_internet_latency() -> None:
    """With 50 ms per hop (100 ms round trip on a direct path, like a long-distance call) the
    outcomes should be the same as on a fast network. Today 10 of the 25 combinations (no NAT
    with no NAT, and every cone NAT with every cone NAT) fail after 10 s with ~800 checks,
    although TURN is available: every pair's checks cross and re-trigger each other."""
    wrong = {}
    for pair in PAIRS:
        outcome = simulate(*pair, SimConfig(delay=0.05))
        if not outcome.connected or outcome.relayed is not (pair in RELAY_ONLY):
            wrong[ids(pair)] = outcome.describe()
    assert wrong == {}


@pytest.mark.parametrize("pair", PAIRS, ids=ids)
def test_matrix_without_turn(pair: tuple[Flavour, Flavour]) -> None:
    """Without TURN the direct cases still connect over the same kind of path, and the relayed
    ones fail on both sides within 10 s of simulated time."""
    outcome = simulate(*pair, SimConfig(turn=False))
    if pair in RELAY_ONLY:
        assert outcome.failed
        for side in (outcome.a, outcome.b):
            assert side.failed_after is not None and side.failed_after <= 10.0 + 1e-9
            assert side.failure_reason is not None
    else:
        assert outcome.connected and outcome.data_ok and not outcome.relayed
        assert_consistent(outcome)


@pytest.mark.parametrize("flavour", NATTED)
def test_same_nat_hosts_use_host_candidates(flavour: Flavour) -> None:
    """Two hosts on one LAN behind the same NAT connect over their host candidates."""
    outcome = simulate(flavour, flavour, SimConfig(same_nat=True))
    assert outcome.connected and outcome.data_ok
    assert outcome.a.path is not None and outcome.b.path is not None
    assert outcome.a.path.describe() == outcome.b.path.describe() == "host->host"
    assert outcome.a.path.remote[0].startswith("10.0.1.")


@pytest.mark.parametrize("pair", PAIRS, ids=ids)
def test_matrix_trickle(pair: tuple[Flavour, Flavour]) -> None:
    """Trickle ICE (checks start at once, candidates signalled as gathered, 50 ms signalling
    delay): the same paths, including peer-reflexive candidates learned before signalling."""
    outcome = simulate(*pair, SimConfig(trickle=True))
    assert outcome.connected and outcome.data_ok
    assert_consistent(outcome)
    assert outcome.relayed is (pair in RELAY_ONLY)


@pytest.mark.parametrize("pair", sorted(RELAY_ONLY), ids=ids)
def test_relay_with_channels(pair: tuple[Flavour, Flavour]) -> None:
    """Relaying over ChannelBind + ChannelData works as well as Send/Data indications."""
    sim = IceSim(*pair, SimConfig(channels=True))
    outcome = sim.run()
    assert outcome.connected and outcome.relayed and outcome.data_ok
    channels = [a for a in sim.turn_service.allocations.values() if a.channels]
    assert channels, "no channel was bound"


LOSS_SEEDS = (1, 2, 3)


@pytest.mark.parametrize("seed", LOSS_SEEDS)
def test_matrix_with_loss(seed: int) -> None:
    """With 10 % of all datagrams lost (gathering, TURN, checks), every pair still connects;
    the relay-only cases relay, and the others go direct unless, when the controlling agent
    nominated, no direct pair had got an answer yet (a lost check can take longer than the
    1 s nomination wait)."""
    fallbacks = []
    for pair in PAIRS:
        sim = IceSim(*pair, SimConfig(loss=0.1, seed=seed, exchange_data=False))
        outcome = sim.run()
        assert outcome.connected, (pair, outcome.describe())
        assert_consistent(outcome)
        assert outcome.lost > 0
        if pair in RELAY_ONLY:
            assert outcome.relayed
        elif outcome.relayed:
            assert sim.a.direct_valid_at_nomination is False, pair
            fallbacks.append(pair)
    assert len(fallbacks) <= 3, fallbacks


@pytest.mark.parametrize("pair", [(Flavour.NONE, Flavour.NONE), (Flavour.FULL, Flavour.SYMMETRIC),
                                  (Flavour.SYMMETRIC, Flavour.SYMMETRIC)], ids=ids)  # fmt: skip
@pytest.mark.parametrize("tie_breakers", [(1, 2), (2, 1)])
def test_role_conflict_resolved(
    pair: tuple[Flavour, Flavour], tie_breakers: tuple[int, int]
) -> None:
    """Both agents start controlling: they connect, the one with the larger tie-breaker ends up
    controlling and the other controlled (RFC 8445 7.3.1.1)."""
    sim = IceSim(*pair, SimConfig(controlling_b=True, tie_breakers=tie_breakers))
    outcome = sim.run()
    assert outcome.connected and outcome.data_ok
    assert outcome.relayed is (pair in RELAY_ONLY)
    assert sim.a.agent.controlling is (tie_breakers[0] > tie_breakers[1])
    assert sim.b.agent.controlling is (tie_breakers[1] > tie_breakers[0])


def test_role_conflict_needs_one_switch() -> None:
    """Both controlling on open internet: only the agent with the smaller tie-breaker should
    change role, once. It switches to controlled on B's check, back to controlling on the 487
    answering its own earlier check, and so on (5 changes in this run)."""
    sim = IceSim(Flavour.NONE, Flavour.NONE, SimConfig(controlling_b=True, tie_breakers=(1, 2)))
    roles = [(sim.a.agent.controlling, sim.b.agent.controlling)]
    sim.start()
    while not sim.settled() and sim.step(10.0):
        now = (sim.a.agent.controlling, sim.b.agent.controlling)
        if now != roles[-1]:
            roles.append(now)
    assert sim.settled() and sim.outcome().connected
    assert roles == [(True, True), (False, True)]


def relay_checks(sim: IceSim) -> int:
    """Binding requests sent from one relayed address straight to another."""
    assert sim.net.log is not None
    count = 0
    for _, source, destination, data in sim.net.log:
        if source[0] == destination[0] == RELAY_IP and looks_like_stun(data):
            count += decode(data).cls is MessageClass.REQUEST
    return count


def test_relay_to_relay_pair_checked_a_few_times() -> None:
    """The relay-to-relay pair has a 60 ms round trip (three hops each way: client to server,
    relay to relay, server to client), longer than Ta: both agents check it at once, each incoming
    check triggers a new check that forgets the outstanding one, and the pair is re-checked
    every 50 ms until nomination ends checking (16 requests each way with cone NATs)."""
    sim = IceSim(Flavour.FULL, Flavour.FULL)
    sim.net.log = []
    outcome = sim.run()
    assert outcome.connected
    assert relay_checks(sim) <= 6


def test_public_hosts_with_long_round_trip() -> None:
    """Two hosts on the open internet, 30 ms one way: they should connect over host candidates
    (they fail after 10 s with hundreds of checks, see test_ice_agent's Wire reproducer)."""
    outcome = simulate(Flavour.NONE, Flavour.NONE, SimConfig(delay=0.03, stun=False, turn=False))
    assert outcome.connected


@pytest.mark.parametrize("pair", [(Flavour.PORT_RESTRICTED, Flavour.PORT_RESTRICTED),
                                  (Flavour.SYMMETRIC, Flavour.SYMMETRIC)], ids=ids)  # fmt: skip
def test_consent_keeps_paths_alive_for_ten_minutes(pair: tuple[Flavour, Flavour]) -> None:
    """Consent checks every ~5 s keep direct and relayed paths up for ten minutes of simulated
    time, through NATs that drop mappings idle for 30 s (the TURN client refreshes its
    permissions and allocation meanwhile); data still flows at the end."""
    sim = IceSim(*pair, SimConfig(nat_timeout=30.0))
    first = sim.run()
    assert first.connected
    sim.run_for(600.0)
    assert sim.a.agent.state is sim.b.agent.state is IceState.CONNECTED
    for peer in sim.peers():
        peer.received.clear()
        peer.execute(peer.agent.send(b"late " + peer.name.encode()), sim.now)
    sim.run_for(1.0)
    assert sim.a.received == [b"late B"] and sim.b.received == [b"late A"]
    assert sim.net.sent > 500  # consent traffic was really exchanged


def test_consent_lost_over_relay() -> None:
    """When B's host disappears, A's consent over the relay expires 30 s after the last answer
    (answers came every 4-6 s before) and A fails; the harness raises BusyLoop instead, since
    next_deadline() keeps returning the expiry time."""
    sim = IceSim(Flavour.SYMMETRIC, Flavour.SYMMETRIC)
    assert sim.run().relayed
    sim.run_for(20.0)
    sim.net.blocked.add(sim.b.host)
    cut = sim.now
    sim.run_for(40.0)
    assert sim.a.agent.state is IceState.FAILED
    assert sim.a.agent.failure_reason == "consent expired (RFC 7675)"
    assert sim.a.failed_at is not None and 24.0 <= sim.a.failed_at - cut <= 30.0 + 1e-6


class _StuckAgent(IceAgent):
    """An agent whose timer always asks for t = 1 s."""

    def next_deadline(self) -> float | None:
        return 1.0


def test_harness_detects_busy_loops() -> None:
    """The harness itself: a deadline that on_timer does not clear raises BusyLoop rather than
    spinning forever."""
    sim = IceSim(Flavour.NONE, Flavour.NONE)
    sim.a.agent, sim.a.started = _StuckAgent(True), True
    with pytest.raises(BusyLoop, match=r"t=1\.0"):
        sim.run_for(5.0)


def test_valid_pairs_at_nomination_are_recorded() -> None:
    """The harness notes whether a direct pair was valid at nomination, used by the loss test."""
    sim = IceSim(Flavour.FULL, Flavour.FULL)
    sim.run()
    assert sim.a.direct_valid_at_nomination is True
    assert sim.b.direct_valid_at_nomination is None  # controlled: never nominates
    assert any(p.state is PairState.SUCCEEDED and relayed(p) for p in sim.a.agent.pairs.values())


# --- the harness itself ------------------------------------------------------------------------


def test_gathering_through_real_servers() -> None:
    """Candidates come from the real cores through the NAT: srflx from a Binding answer (the
    NAT's mapping), relay from an Allocate that first got a 401 challenge; a public host gets
    no srflx (its mapped address is its host address)."""
    sim = IceSim(Flavour.SYMMETRIC, Flavour.NONE)
    sim.start()
    a_types = [lc.candidate.type.value for lc in sim.a.gathered]
    b_types = [lc.candidate.type.value for lc in sim.b.gathered]
    assert sorted(a_types) == ["host", "relay", "srflx"]
    assert sorted(b_types) == ["host", "relay"]
    srflx = next(lc for lc in sim.a.gathered if lc.candidate.type.value == "srflx")
    relay = next(lc for lc in sim.a.gathered if lc.candidate.type.value == "relay")
    assert srflx.candidate.host == "198.51.100.1" and srflx.base == sim.a.host
    assert relay.candidate.host == RELAY_IP and relay.base == relay.candidate.address
    assert relay.candidate.related_host == "198.51.100.1"
    assert sim.turn_server.core.error_codes[401] == 2
    assert len(sim.turn_service.allocations) == 2


def test_without_turn_no_relay_candidates() -> None:
    """SimConfig(turn=False) gathers no relayed candidate and makes no allocation."""
    sim = IceSim(Flavour.FULL, Flavour.FULL, SimConfig(turn=False))
    sim.start()
    assert all(lc.candidate.type.value != "relay" for p in sim.peers() for lc in p.gathered)
    assert not sim.turn_service.allocations


def test_network_routing() -> None:
    """The harness network: LAN traffic goes direct with its LAN source, a LAN address is
    unreachable from other LANs, and hairpinning through the NAT shows the external mapping."""
    sim = IceSim(Flavour.FULL, Flavour.FULL)
    got: list[tuple[str, Address]] = []
    net = sim.net
    net.attach(("10.0.1.9", 9), lambda src, data, now: got.append(("lan", src)), sim.a.nat)
    net.attach(("10.0.2.9", 9), lambda src, data, now: got.append(("far", src)), sim.b.nat)
    net.send(sim.a.host, ("10.0.1.9", 9), b"x", 0.0)
    net.send(sim.a.host, ("10.0.2.9", 9), b"x", 0.0)
    assert sim.a.nat is not None
    external = sim.a.nat.outbound(("10.0.1.9", 9), ("203.0.113.99", 1), 0.0)
    net.send(sim.a.host, external, b"x", 0.0)
    net.run_until(1.0)
    assert got == [("lan", sim.a.host), ("lan", ("198.51.100.1", 5000))]
    assert net.dropped == 1


# --- the stock SimNetwork -----------------------------------------------------------------------


def _simnetwork() -> tuple[SimNetwork, list[tuple[str, Address]]]:
    """Hosts h1 and h2 behind one NAT, "elsewhere" behind another."""
    net = SimNetwork(delay=0.01)
    got: list[tuple[str, Address]] = []

    def receiver(name: str) -> Callable[[Address, Address, bytes, float], None]:
        def deliver(source: Address, destination: Address, data: bytes, now: float) -> None:
            got.append((name, source))

        return deliver

    nat = net.add_nat(SimNat("198.51.100.1", Behaviour.ENDPOINT_INDEPENDENT))
    other = net.add_nat(SimNat("198.51.100.2", Behaviour.ENDPOINT_INDEPENDENT))
    net.bind(("10.0.1.2", 5000), receiver("h1"), nat)
    net.bind(("10.0.1.3", 5000), receiver("h2"), nat)
    net.bind(("10.0.2.2", 5000), receiver("elsewhere"), other)
    return net, got


def test_simnetwork_lan_traffic_keeps_its_source() -> None:
    """Two hosts behind one NAT talk directly on their LAN: the receiver should see the
    sender's LAN address, but SimNetwork runs the datagram through the NAT's outbound mapping
    and shows the NAT's public address (ICE's host-to-host check then fails as
    non-symmetric)."""
    net, got = _simnetwork()
    net.send(("10.0.1.2", 5000), ("10.0.1.3", 5000), b"x", 0.0)
    net.run_until(1.0)
    assert got == [("h2", ("10.0.1.2", 5000))]


def test_simnetwork_private_address_unreachable_from_other_lans() -> None:
    """A LAN address behind one NAT is not reachable from a host behind another NAT, but
    SimNetwork delivers by address alone, bypassing the destination NAT's filtering."""
    net, got = _simnetwork()
    net.send(("10.0.1.2", 5000), ("10.0.2.2", 5000), b"x", 0.0)
    net.run_until(1.0)
    assert got == []
