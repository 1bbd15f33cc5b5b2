"""natprobe's step machine (stunturn.nat.discovery) against simulated NATs, in simulated time.

Every test runs :class:`~stunturn.nat.discovery.Discovery` through ``tests/natsim_driver.py``:
a :class:`~stunturn.nat.sim.SimNat` with RFC 4787 behaviours in front of the probing host and
our own server core (or a deliberately broken variant of it) as the RFC 5780 server. No socket
is opened and nothing sleeps; a run that waits for a 2.5 s timeout takes about a millisecond.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import pytest
from natsim_driver import (
    ALT_IP,
    ALT_PORT,
    COTURN_LIKE,
    DROPS_CHANGE,
    GOOD,
    IGNORES_CHANGE,
    LAN_IP,
    NAT_IP,
    NO_OTHER_ADDRESS,
    OTHER,
    PRIMARY,
    PRIMARY_IP,
    PRIMARY_PORT,
    PUBLIC_HOST_IP,
    REJECTS_CHANGE,
    Reply,
    ServerQuirks,
    SimRun,
    check_report,
    run_discovery,
)

from stunturn.nat import (
    Behaviour,
    CloseSocket,
    Discovery,
    NatType,
    OpenSocket,
    ProbeConfig,
    SendDatagram,
    TcpRequest,
)
from stunturn.nat.sim import SimNat
from stunturn.stun import AttrType, decode
from stunturn.stun.attributes import ResponseOrigin

E = Behaviour.ENDPOINT_INDEPENDENT
A = Behaviour.ADDRESS_DEPENDENT
P = Behaviour.ADDRESS_AND_PORT_DEPENDENT
U = Behaviour.UNKNOWN
COMBOS = [(m, f) for m in (E, A, P) for f in (E, A, P)]
SHORT = {E: "EI", A: "AD", P: "APD"}
COMBO_IDS = [f"{SHORT[m]}M-{SHORT[f]}F" for m, f in COMBOS]
CONE = {E: NatType.FULL_CONE, A: NatType.RESTRICTED_CONE, P: NatType.PORT_RESTRICTED_CONE}


def nat(mapping: Behaviour = E, filtering: Behaviour = P, **kwargs: Any) -> SimNat:
    """A SimNat on NAT_IP."""
    return SimNat(NAT_IP, mapping, filtering, **kwargs)


def expected_type(mapping: Behaviour, filtering: Behaviour) -> NatType:
    return CONE[filtering] if mapping is E else NatType.SYMMETRIC


def port_of(text: str) -> int:
    """The port of an ``ip:port`` string from the report."""
    return int(text.rpartition(":")[2])


def fmt(a: tuple[str, int]) -> str:
    return f"{a[0]}:{a[1]}"


# --- mapping x filtering ----------------------------------------------------------------------


@pytest.mark.parametrize(("mapping", "filtering"), COMBOS, ids=COMBO_IDS)
def test_every_mapping_and_filtering(mapping: Behaviour, filtering: Behaviour) -> None:
    """Each of the nine RFC 4787 combinations is told exactly, with the right classic type, a
    public address on the NAT and no error."""
    run = run_discovery(nat(mapping, filtering))
    r = run.report
    assert (r["mapping"], r["filtering"]) == (mapping.value, filtering.value)
    assert r["nat_type"] == expected_type(mapping, filtering).value
    assert r["nat_detected"] is True and r["udp_blocked"] is False and r["error"] is None
    assert r["public_address"].startswith(f"{NAT_IP}:")
    assert r["local_address"].startswith(f"{LAN_IP}:")
    assert r["mapping_varies_by_destination"] is (mapping is not E)
    assert r["reasons"].keys() <= {"filtering_evidence"}


def test_no_nat_is_open_internet() -> None:
    """A host with a public address: the mapped address is its own (same IP, same port), so no
    NAT; nothing filters, so open internet."""
    r = run_discovery(None).report
    assert r["nat_detected"] is False
    assert r["public_address"] == r["local_address"]
    assert r["public_address"].startswith(f"{PUBLIC_HOST_IP}:")
    assert (r["mapping"], r["filtering"], r["nat_type"]) == (E, E, NatType.OPEN_INTERNET)


@pytest.mark.parametrize("filtering", [A, P], ids=["ADF", "APDF"])
def test_stateful_firewall(filtering: Behaviour) -> None:
    """No translation but filtering (SimNat translate=False): no NAT detected, and the classic
    type is symmetric UDP firewall."""
    r = run_discovery(nat(E, filtering, translate=False)).report
    assert r["nat_detected"] is False
    assert r["public_address"] == r["local_address"]
    assert r["filtering"] == filtering.value
    assert r["nat_type"] == NatType.SYMMETRIC_UDP_FIREWALL


def test_no_nat_needs_same_port_too() -> None:
    """A mapped address on one of our IPs but on another port is a NAT (e.g. a port-changing
    firewall on the host): "no NAT" is not decided by the IP alone."""
    r = run_discovery(nat(E, E, allocation="sequential"), host_ip=NAT_IP).report
    assert r["nat_detected"] is True


# --- UDP blocked --------------------------------------------------------------------------------


def test_udp_blocked_with_tcp_answering() -> None:
    """No UDP answer, but a Binding over TCP to the same server is answered (the driver gives
    the machine our core's real TCP response): udp-blocked, with the TCP-mapped address as the
    public address, and every peer needs a relay."""
    run = run_discovery(nat(E, P), udp_blocked=True)
    r = run.report
    assert r["udp_blocked"] is True and r["error"] is None
    assert r["nat_type"] == NatType.UDP_BLOCKED
    assert r["nat_detected"] is None
    assert r["public_address"].startswith(f"{NAT_IP}:")
    assert r["servers"][0]["tcp_answered"] is True
    assert r["p2p"]["direct_with"] == [] and len(r["p2p"]["relay_with"]) == 6
    tcp = [a for _, a in run.actions if isinstance(a, TcpRequest)]
    assert len(tcp) == 1 and tcp[0].destination == PRIMARY
    assert run.duration == pytest.approx(2.5, abs=0.1)


def test_udp_blocked_and_tcp_failing_is_no_verdict() -> None:
    """Neither UDP nor TCP answers: an error ("no answer"), no verdict, nothing made up."""
    r = run_discovery(nat(E, P), udp_blocked=True, tcp_answers=False).report
    assert r["error"] is not None and "no answer" in r["error"]
    assert r["udp_blocked"] is False
    assert r["nat_type"] == NatType.UNKNOWN
    assert r["public_address"] is None and r["nat_detected"] is None


def test_no_tcp_check_means_no_tcp_request() -> None:
    """With the TCP check off, silence over UDP is an error right away and no TCP is tried."""
    run = run_discovery(nat(E, P), udp_blocked=True, tcp_check=False)
    assert "no UDP answer" in run.report["error"]
    assert not any(isinstance(a, TcpRequest) for _, a in run.actions)


# --- hairpinning ----------------------------------------------------------------------------------


@pytest.mark.parametrize("filtering", [E, P], ids=["EIF", "APDF"])
def test_hairpinning_on(filtering: Behaviour) -> None:
    """A hairpinning EIM NAT: both hairpin datagrams arrive, from the sender's external mapping
    (RFC 4787 REQ-9)."""
    r = run_discovery(nat(E, filtering, hairpin=True)).report
    assert r["hairpinning"] is True
    assert r["hairpinning_source"] == "external-mapping"
    arrived = [t for t in r["tests"] if t["name"].startswith("hairpin-") and "-to-" in t["name"]]
    assert {t["result"] for t in arrived} == {"arrived"} and len(arrived) == 2


def test_hairpinning_off() -> None:
    """A NAT that does not hairpin: hairpinning false, no source."""
    r = run_discovery(nat(E, E, hairpin=False)).report
    assert r["hairpinning"] is False and r["hairpinning_source"] is None


def test_hairpinning_from_internal_address() -> None:
    """A non-compliant NAT that loops packets back with the sender's internal address: told
    apart as "internal-address"."""
    r = run_discovery(nat(E, E, hairpin=True, hairpin_internal_source=True)).report
    assert r["hairpinning"] is True
    assert r["hairpinning_source"] == "internal-address"


def test_hairpinning_symmetric_new_port() -> None:
    """Behind an APDM NAT the hairpinned packet leaves on a new mapping: same IP, new port."""
    r = run_discovery(nat(P, E, hairpin=True)).report
    assert r["hairpinning"] is True
    assert r["hairpinning_source"] == "external-address-new-port"


def test_no_hairpin_test_when_disabled() -> None:
    """hairpin=False: hairpinning null and no hairpin test or socket at all."""
    run = run_discovery(nat(E, E), hairpin=False)
    assert run.report["hairpinning"] is None
    assert not run.sockets("hairpin")


# --- port allocation ------------------------------------------------------------------------------


def test_port_allocation_preserved() -> None:
    """External port = local port on every sample."""
    info = run_discovery(nat(E, P, allocation="preserve")).report["port_allocation"]
    assert info["kind"] == "preserved" and info["samples"] == 8
    assert info["local_ports"] == info["mapped_ports"]


def test_port_allocation_sequential() -> None:
    """A NAT handing out consecutive ports: sequential with delta 1, and the prediction names
    the next port."""
    info = run_discovery(nat(P, P, allocation="sequential")).report["port_allocation"]
    assert info["kind"] == "sequential" and info["delta"] == 1
    mapped = info["mapped_ports"]
    assert mapped == list(range(mapped[0], mapped[0] + 8))
    assert str(mapped[-1] + 1) in info["prediction"]


def test_port_allocation_random() -> None:
    """Random external ports: random, "not predictable"."""
    info = run_discovery(nat(P, P, allocation="random")).report["port_allocation"]
    assert info["kind"] == "random" and "not predictable" in info["prediction"]


def test_port_samples_configurable() -> None:
    """port_samples sockets, each used only by its own test."""
    run = run_discovery(nat(E, P), port_samples=5)
    assert run.report["port_allocation"]["samples"] == 5
    assert len(run.sockets("port-allocation")) == 5


# --- two plain servers ----------------------------------------------------------------------------

PLAIN = ServerQuirks(rfc5780=False)
SAME_IP = (PRIMARY, (PRIMARY_IP, ALT_PORT))
TWO_IPS = (PRIMARY, (ALT_IP, PRIMARY_PORT))


@pytest.mark.parametrize("servers", [SAME_IP, TWO_IPS], ids=["same-ip", "two-ips"])
def test_two_servers_mapping_constant(servers: tuple[tuple[str, int], ...]) -> None:
    """EIM behind two plain servers: the mapping does not vary. On two IPs that proves EIM; on
    two ports of one IP it cannot rule out ADM, so mapping stays unknown with a reason.
    Filtering needs RFC 5780, so it stays unknown with a reason, and so does the type."""
    r = run_discovery(nat(E, E), server=PLAIN, servers=servers).report
    assert r["mapping_varies_by_destination"] is False
    if servers == TWO_IPS:
        assert r["mapping"] == E
    else:
        assert r["mapping"] == U and "address-dependent" in r["reasons"]["mapping"]
    assert r["filtering"] == U and "RFC 5780" in r["reasons"]["filtering"]
    assert r["nat_type"] == NatType.UNKNOWN


def test_two_servers_same_ip_varying_is_apdm() -> None:
    """Two servers on one IP, different ports, and the mapping changes: it depends on the port,
    so APDM and symmetric."""
    r = run_discovery(nat(P, P), server=PLAIN, servers=SAME_IP).report
    assert r["mapping"] == P and r["nat_type"] == NatType.SYMMETRIC


@pytest.mark.parametrize("mapping", [A, P], ids=["ADM", "APDM"])
def test_two_servers_two_ips_varying(mapping: Behaviour) -> None:
    """Two servers on different IPs and the mapping changes: symmetric for sure, but ADM vs
    APDM cannot be told, so mapping unknown with a reason."""
    r = run_discovery(nat(mapping, P), server=PLAIN, servers=TWO_IPS).report
    assert r["mapping_varies_by_destination"] is True
    assert r["mapping"] == U and "cannot tell" in r["reasons"]["mapping"]
    assert r["nat_type"] == NatType.SYMMETRIC


def test_two_servers_same_ip_cannot_rule_out_adm() -> None:
    """An ADM NAT (symmetric in the classic sense) behind two servers on one IP must not be
    called endpoint-independent: equal mappings there only rule out APDM."""
    r = run_discovery(nat(A, P), server=PLAIN, servers=SAME_IP).report
    assert r["mapping"] != E
    assert r["nat_type"] != NatType.FULL_CONE


def test_two_servers_one_silent() -> None:
    """One of two servers never answers: mapping unknown with a reason."""

    def drop_second(reply: Reply) -> list[Reply]:
        return [] if reply.test == "mapping-server-2" else [reply]

    r = run_discovery(nat(E, E), server=PLAIN, servers=TWO_IPS, tamper=drop_second).report
    assert r["mapping"] == U and "did not answer" in r["reasons"]["mapping"]


def test_discovery_needs_one_or_two_servers() -> None:
    """Zero or three servers is a usage error."""
    for servers in [(), (PRIMARY, OTHER, ("192.0.2.1", 3478))]:
        with pytest.raises(ValueError, match="RFC 5780 server"):
            Discovery(ProbeConfig(servers=servers))


# --- qualifying the server ------------------------------------------------------------------------


def test_server_without_other_address() -> None:
    """No OTHER-ADDRESS: mapping and filtering unknown, each with the reason; no mapping or
    filtering test is even sent; the rest (NAT detected, hairpinning, ports) still works."""
    run = run_discovery(nat(E, E), server=NO_OTHER_ADDRESS)
    r = run.report
    assert r["mapping"] == U and r["filtering"] == U and r["nat_type"] == NatType.UNKNOWN
    assert "OTHER-ADDRESS" in r["reasons"]["mapping"]
    assert "OTHER-ADDRESS" in r["reasons"]["filtering"]
    assert r["servers"][0]["rfc5780"] is False and r["servers"][0]["other_address"] is None
    assert not run.sockets("mapping") and not run.sockets("filtering")
    assert r["nat_detected"] is True and r["hairpinning"] is True
    assert r["port_allocation"]["kind"] == "preserved"


@pytest.mark.parametrize(
    "other", [(PRIMARY_IP, ALT_PORT), (ALT_IP, PRIMARY_PORT)], ids=["same-ip", "same-port"]
)
def test_other_address_must_differ_in_ip_and_port(other: tuple[str, int]) -> None:
    """OTHER-ADDRESS equal to the primary in IP or in port cannot run RFC 5780's tests:
    unknown, with the reason naming the address."""
    run = run_discovery(nat(E, E), server=ServerQuirks(other_address=other))
    r = run.report
    assert r["mapping"] == U and r["filtering"] == U
    assert "must differ" in r["reasons"]["filtering"] and fmt(other) in r["reasons"]["mapping"]
    assert r["servers"][0]["rfc5780"] is False
    assert not run.sockets("filtering")


@pytest.mark.parametrize(("mapping", "filtering"), COMBOS, ids=COMBO_IDS)
def test_server_ignoring_change_request_is_never_full_cone(
    mapping: Behaviour, filtering: Behaviour
) -> None:
    """The classic trap: a server that ignores CHANGE-REQUEST answers filtering test II from
    the primary address, which every NAT lets in; a naive client concludes "full cone". natprobe
    sees the reply come from the wrong address: filtering unknown, with the reason."""
    r = run_discovery(nat(mapping, filtering), server=IGNORES_CHANGE).report
    assert r["filtering"] == U
    assert "ignores CHANGE-REQUEST" in r["reasons"]["filtering"]
    assert r["nat_type"] not in (NatType.FULL_CONE, NatType.RESTRICTED_CONE)
    assert r["nat_type"] == (NatType.UNKNOWN if mapping is E else NatType.SYMMETRIC)
    assert r["servers"][0]["change_request"] == "not honoured"
    assert r["mapping"] == mapping.value  # mapping tests need no CHANGE-REQUEST


def test_server_answering_change_request_with_420() -> None:
    """420 to CHANGE-REQUEST: filtering unknown, the reason names the error."""
    r = run_discovery(nat(E, E), server=REJECTS_CHANGE).report
    assert r["filtering"] == U and "420" in r["reasons"]["filtering"]
    assert r["nat_type"] == NatType.UNKNOWN
    assert r["servers"][0]["change_request"] == "not honoured"


def test_response_origin_disagreeing_with_source() -> None:
    """A CHANGE-REQUEST answer from the right address but whose RESPONSE-ORIGIN names another
    one is not trusted: filtering unknown."""

    def lie(reply: Reply) -> list[Reply]:
        if reply.test != "filtering-II":
            return [reply]
        msg = decode(reply.data)
        msg.attributes = [
            ResponseOrigin(PRIMARY_IP, 9) if isinstance(a, ResponseOrigin) else a
            for a in msg.attributes
        ]
        return [replace(reply, data=replace(msg, raw=b"", offsets=[]).encode())]

    r = run_discovery(nat(E, E), tamper=lie).report
    assert r["filtering"] == U and "RESPONSE-ORIGIN" in r["reasons"]["filtering"]


def test_response_port_and_padding_supported() -> None:
    """Our server supports RESPONSE-PORT and PADDING, and the report says so."""
    run = run_discovery(nat(E, P))
    server = run.report["servers"][0]
    assert server["response_port"] is True and server["padding"] is True
    public_port = port_of(run.report["public_address"])
    assert run.test("response-port")["attributes"] == [f"RESPONSE-PORT({public_port})"]
    assert run.test("padding")["attributes"] == ["PADDING(256)"]


def test_padding_refused() -> None:
    """A server answering PADDING with 420 is reported as not supporting it; the verdicts do
    not depend on it."""
    quirks = ServerQuirks(reject=frozenset({AttrType.PADDING}))
    r = run_discovery(nat(E, P), server=quirks).report
    assert r["servers"][0]["padding"] is False
    assert r["nat_type"] == NatType.PORT_RESTRICTED_CONE


def test_response_port_refused_keeps_the_verdicts() -> None:
    """A server refusing RESPONSE-PORT: the mapping and filtering verdicts do not depend on it,
    and RESPONSE-PORT support is not claimed."""
    quirks = ServerQuirks(reject=frozenset({AttrType.RESPONSE_PORT}))
    r = run_discovery(nat(E, P), server=quirks).report
    assert r["servers"][0]["response_port"] is not True
    assert r["nat_type"] == NatType.PORT_RESTRICTED_CONE


def test_response_port_refused_is_reported_as_unsupported() -> None:
    """A 420 to RESPONSE-PORT is an answer: RESPONSE-PORT is not supported."""
    quirks = ServerQuirks(reject=frozenset({AttrType.RESPONSE_PORT}))
    run = run_discovery(nat(E, P), server=quirks)
    assert run.test("response-port")["result"] == "error"
    assert run.report["servers"][0]["response_port"] is False


def test_change_request_honoured_is_reported() -> None:
    """Behind EIM the control test (a CHANGE-REQUEST from a socket whose filter is open)
    proves the server honours CHANGE-REQUEST, so "no reply" in filtering tests II and III really
    means the NAT filtered them."""
    r = run_discovery(nat(E, P)).report
    assert r["servers"][0]["change_request"] == "honoured"
    assert r["filtering"] == P
    assert "filtering_evidence" in r["reasons"]


def test_apdm_leaves_change_request_unverified() -> None:
    """Behind APDM no socket has a filter open to the alternate address for a reply, so
    CHANGE-REQUEST support cannot be verified: APDF is inferred from absent replies and the
    report says "unverified" (the nat_type, symmetric, does not depend on it)."""
    r = run_discovery(nat(P, P)).report
    assert r["servers"][0]["change_request"] == "unverified"
    assert r["filtering"] == P and r["nat_type"] == NatType.SYMMETRIC


def test_server_dropping_change_request_gives_no_filtering_verdict() -> None:
    """Behind EIM, silence to CHANGE-REQUEST even on an open socket means the server, not the
    NAT, is silent: filtering must be unknown, not APDF."""
    r = run_discovery(nat(E, E), server=DROPS_CHANGE).report
    assert r["filtering"] == U
    assert r["nat_type"] == NatType.UNKNOWN


def test_coturn_like_server_verdicts() -> None:
    """coturn 4.6.1 does not change the IP for CHANGE-REQUESTs received on its alternate IP;
    the filtering tests only use the primary address, so every verdict is still right."""
    for mapping, filtering in COMBOS:
        r = run_discovery(nat(mapping, filtering), server=COTURN_LIKE).report
        assert (r["mapping"], r["filtering"]) == (mapping.value, filtering.value)


@pytest.mark.parametrize("filtering", [E, P], ids=["EIF", "APDF"])
def test_coturn_like_server_change_request_consistent(filtering: Behaviour) -> None:
    """A server that honours CHANGE-REQUEST on the address the filtering tests use is reported
    as honouring it."""
    r = run_discovery(nat(E, filtering), server=COTURN_LIKE).report
    assert r["filtering"] == filtering.value
    assert r["servers"][0]["change_request"] == "honoured"


# --- replies that are not answers -----------------------------------------------------------------


def test_late_duplicate_never_answers_a_later_test() -> None:
    """Behind a port-restricted cone filtering tests II and III get no answer. A late copy of
    test I's reply arriving on the same socket while they wait (from the primary address, which
    the filter admits) must not be taken as their answer - a client matching "any reply on this
    socket" would conclude full cone."""

    def echo_late(reply: Reply) -> list[Reply]:
        if reply.test == "filtering-I":
            return [reply, replace(reply, extra_delay=1.0)]
        return [reply]

    run = run_discovery(nat(E, P), tamper=echo_late)
    sock = run.test("filtering-I")["socket"]
    late = [t for t, s, _ in run.received if s == sock and t > 0.9]
    assert late, "the late copy reached the filtering socket"
    assert run.test("filtering-II")["result"] == "timeout"
    assert run.test("filtering-III")["result"] == "timeout"
    assert run.report["filtering"] == P


def test_reply_after_timeout_is_dropped() -> None:
    """A reply arriving after its test timed out changes nothing: the test stays "timeout"
    with no reply source (the machine is kept busy by a lifetime test meanwhile)."""

    def slow(reply: Reply) -> list[Reply]:
        return [replace(reply, extra_delay=3.0)] if reply.test == "filtering-II" else [reply]

    run = run_discovery(nat(E, E), tamper=slow, lifetime_max=10)
    sock = run.test("filtering-II")["socket"]
    assert any(s == sock and t > 2.6 for t, s, _ in run.received)
    two = run.test("filtering-II")
    assert two["result"] == "timeout" and two["reply_source"] is None
    assert run.report["filtering"] == A  # III answered, II (as far as anyone knows) did not


def test_duplicates_change_nothing() -> None:
    """Every reply delivered twice (immediately and 3 s later): same verdicts, same evidence."""

    def twice(reply: Reply) -> list[Reply]:
        return [reply, replace(reply, extra_delay=0.001), replace(reply, extra_delay=3.0)]

    for mapping, filtering in [(E, E), (E, P), (P, A)]:
        base = run_discovery(nat(mapping, filtering), seed=4).report
        dup = run_discovery(nat(mapping, filtering), seed=4, tamper=twice).report
        keys = ("mapping", "filtering", "nat_type", "hairpinning", "port_allocation")
        assert {k: dup[k] for k in keys} == {k: base[k] for k in keys}
        assert [(t["name"], t["result"]) for t in dup["tests"]] == [
            (t["name"], t["result"]) for t in base["tests"]
        ]


def test_reply_from_unexpected_source_is_not_an_answer() -> None:
    """A mapping-test reply with the right transaction ID but from an address the test did not
    ask for is "wrong-source", and the mapping becomes unknown instead of being guessed."""

    def forge(reply: Reply) -> list[Reply]:
        if reply.test == "mapping-II":
            return [replace(reply, source=(ALT_IP, 9999))]
        return [reply]

    run = run_discovery(nat(E, E), tamper=forge)
    assert run.test("mapping-II")["result"] == "wrong-source"
    assert run.test("mapping-II")["reply_source"] == f"{ALT_IP}:9999"
    assert run.report["mapping"] == U
    assert run.report["nat_type"] == NatType.UNKNOWN


def test_foreign_and_garbage_datagrams_are_ignored() -> None:
    """Datagrams that are not STUN, or carry an unknown transaction ID, produce no action and
    no evidence."""
    machine = Discovery(ProbeConfig(servers=(PRIMARY,)))
    [open_, send] = machine.start(0.0)
    assert isinstance(open_, OpenSocket) and isinstance(send, SendDatagram)
    assert machine.on_opened(open_.sock, (LAN_IP, 40000), 0.0) == []
    before = [e.as_dict() for e in machine.evidence]
    assert machine.on_datagram(open_.sock, PRIMARY, b"not stun at all", 0.01) == []
    stranger = decode(send.data)
    stranger.transaction_id = bytes(12)
    data = replace(stranger, raw=b"", offsets=[]).encode()
    assert machine.on_datagram(open_.sock, PRIMARY, data, 0.01) == []
    assert [e.as_dict() for e in machine.evidence] == before


# --- sockets --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mapping", "filtering"), COMBOS, ids=COMBO_IDS)
def test_filtering_socket_never_sends_to_the_alternate_address(
    mapping: Behaviour, filtering: Behaviour
) -> None:
    """RFC 5780 section 4.5: the filtering tests have their own socket, which only ever sends
    to the primary address (a datagram to the alternate one would open the filter)."""
    run = run_discovery(nat(mapping, filtering), loss=0.1, seed=7)
    [sock] = run.sockets("filtering-")
    sends = run.sends(sock)
    assert sends and {s.destination for s in sends} == {PRIMARY}
    assert {t["name"] for t in run.report["tests"] if t["socket"] == sock} <= {
        "filtering-I",
        "filtering-II",
        "filtering-III",
    }


def test_each_test_group_has_its_own_socket() -> None:
    """Qualification, filtering, mapping, hairpinning, each port sample and each lifetime
    mapping use disjoint sockets; every socket opened is closed once at the end."""
    run = run_discovery(nat(E, P), lifetime_max=30)
    groups = {
        "qualify": run.sockets("qualify") | run.sockets("padding"),
        "response-port": run.sockets("response-port"),
        "filtering": run.sockets("filtering-"),
        "mapping": run.sockets("mapping-") | run.sockets("change-request"),
        "hairpin": run.sockets("hairpin-"),
        "ports": run.sockets("port-allocation-"),
        "lifetime-open": run.sockets("lifetime-open-"),
        "lifetime-prober": run.sockets("lifetime-") - run.sockets("lifetime-open-"),
    }
    assert [len(groups[k]) for k in ("qualify", "filtering", "mapping", "hairpin")] == [1, 1, 1, 2]
    assert len(groups["ports"]) == 8 and len(groups["lifetime-open"]) == 3
    assert len(groups["lifetime-prober"]) == 1
    every = [s for group in groups.values() for s in group]
    assert len(every) == len(set(every)), groups
    opened = [a.sock for _, a in run.actions if isinstance(a, OpenSocket)]
    closed = [a.sock for _, a in run.actions if isinstance(a, CloseSocket)]
    assert sorted(opened) == sorted(closed) == sorted(set(opened))
    assert set(every) == set(opened)


# --- mapping lifetime -----------------------------------------------------------------------------


def test_lifetime_interval_and_keepalive() -> None:
    """A NAT forgetting idle mappings after 35 s, probed up to 60 s in 10 s steps: alive at
    10, 20, 30 s, gone at 40, 50, 60 s, so between 30 and 40 s, with a keepalive shorter than
    30 s."""
    run = run_discovery(nat(E, P, timeout=35.0), lifetime_max=60, lifetime_step=10)
    life = run.report["mapping_lifetime"]
    assert life["interval_s"] == [30.0, 40.0]
    assert life["alive_at"] == [10.0, 20.0, 30.0] and life["gone_at"] == [40.0, 50.0, 60.0]
    assert 0 < life["recommended_keepalive_s"] < 30
    assert "between 30 and 40 s" in life["summary"]
    assert run.discovery.progress_done == run.discovery.progress_total == 6


def test_each_lifetime_mapping_is_probed_exactly_once() -> None:
    """Each lifetime socket sends exactly one datagram (the one that creates its mapping) and
    receives at most one probe answer, so nothing refreshes a mapping being measured; the
    probes come from one other socket, one transaction per delay."""
    run = run_discovery(nat(E, P, timeout=35.0), lifetime_max=60, lifetime_step=10)
    for sock in run.sockets("lifetime-open-"):
        assert len(run.sends(sock)) == 1
        assert sum(1 for _, s, _ in run.received if s == sock) <= 2
    probes = [t for t in run.report["tests"] if re.fullmatch(r"lifetime-\d+s", t["name"])]
    assert sorted(t["name"] for t in probes) == sorted(f"lifetime-{d}s" for d in range(10, 70, 10))
    ports = {t["attributes"][0] for t in probes}
    assert len(ports) == 6 and all(p.startswith("RESPONSE-PORT(") for p in ports)
    [prober] = {t["socket"] for t in probes}
    assert prober not in run.sockets("lifetime-open-")


def test_lifetime_longer_than_measured() -> None:
    """Mappings that never expire: "longer than" the longest delay, no upper bound."""
    life = run_discovery(nat(E, P), lifetime_max=30).report["mapping_lifetime"]
    assert life["interval_s"] == [30.0, None] and life["gone_at"] == []
    assert "longer than 30 s" in life["summary"]


def test_lifetime_without_response_port_is_not_measured() -> None:
    """Without RESPONSE-PORT support there is no lifetime measurement, not a bogus one."""
    quirks = ServerQuirks(reject=frozenset({AttrType.RESPONSE_PORT}))
    r = run_discovery(nat(E, P), server=quirks, lifetime_max=30).report
    life = r["mapping_lifetime"]
    assert life is None or life.get("interval_s") is None


# --- timing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mapping", "filtering"), COMBOS, ids=COMBO_IDS)
def test_full_run_fits_one_timeout(mapping: Behaviour, filtering: Behaviour) -> None:
    """On a lossless path the whole probe (mapping, filtering, hairpinning, port allocation)
    runs its groups concurrently and is done within one 2.5 s timeout plus a few round trips;
    with nothing to wait for (EIF, hairpinning works) it takes a few round trips only."""
    run = run_discovery(nat(mapping, filtering, hairpin=True))
    assert run.duration <= 2.6
    assert run.report["duration_ms"] == pytest.approx(run.duration * 1000, abs=0.1)
    if filtering is E:
        assert run.duration < 0.1


@pytest.mark.parametrize(("mapping", "filtering"), COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("seed", [0, 3, 5])
def test_verdicts_survive_loss(mapping: Behaviour, filtering: Behaviour, seed: int) -> None:
    """20 % random loss on every hop (seeded): retransmissions still bring the right verdicts,
    and they were needed (some test took more than one transmission)."""
    run = run_discovery(nat(mapping, filtering), loss=0.2, seed=seed)
    r = run.report
    assert (r["mapping"], r["filtering"]) == (mapping.value, filtering.value)
    assert r["nat_type"] == expected_type(mapping, filtering).value
    assert max(t["transmissions"] for t in r["tests"]) > 1


def test_loss_never_makes_a_wrong_mapping() -> None:
    """Over 40 seeds x 9 NATs at 20 % loss, the mapping verdict is right or unknown, never
    wrong (it rests on answers, not on their absence); a run that lost everything has an error,
    not a verdict. (Filtering rests on absent replies, so loss can make it stricter than it is:
    see docs/natprobe.md.)"""
    wrong = []
    for mapping, filtering in COMBOS:
        for seed in range(40):
            r = run_discovery(nat(mapping, filtering), loss=0.2, seed=seed).report
            if r["mapping"] not in (mapping.value, U):
                wrong.append((mapping, filtering, seed, r["mapping"]))
            if r["filtering"] not in (filtering.value, U):
                assert r["filtering"] in (A, P) and filtering is not P
    assert not wrong


# --- the report -----------------------------------------------------------------------------------


def test_report_schema() -> None:
    """The JSON report has the natprobe/1 schema, every required key, one entry per test with
    its destination, reply source, RESPONSE-ORIGIN, RTT and transaction ID, and round-trips
    through JSON."""
    run = run_discovery(nat(E, P), lifetime_max=20)
    r = run.report
    check_report(r)
    ids = [t["transaction_id"] for t in r["tests"]]
    assert len(ids) == len(set(ids))
    two = run.test("filtering-II")
    assert two["destination"] == fmt(PRIMARY) and two["expected_source"] == fmt(OTHER)
    assert two["attributes"] == ["CHANGE-REQUEST(ip+port)"]
    one = run.test("filtering-I")
    assert one["reply_source"] == one["response_origin"] == fmt(PRIMARY)
    assert one["rtt_ms"] == pytest.approx(10.0)
    assert r["p2p"]["summary"]


def test_report_of_a_run_without_verdict() -> None:
    """A run that got no answer still produces a well-formed report, with the error."""
    r = run_discovery(nat(E, P), udp_blocked=True, tcp_answers=False).report
    check_report(r)
    assert r["error"]


def test_good_server_is_the_default() -> None:
    """The driver's default server is the honest one (guards the fixtures of this file)."""
    assert ServerQuirks() == GOOD
    run: SimRun = run_discovery(nat(E, E))
    assert run.server_requests
    assert all(to[0] in (PRIMARY_IP, ALT_IP) for _, _, to in run.server_requests)
