"""The TURN core in memory (RFC 8656, RFC 6156): Allocate, Refresh, CreatePermission,
ChannelBind, Send indications, ChannelData, the single timer, ICMP.

Requests go through :meth:`ServerCore.handle_udp` / :meth:`handle_stream_frame` as encoded
bytes; responses are decoded; relayed data comes back as :class:`RelayTo` actions. Relay sockets
are :class:`FakeRelay` objects from an in-memory binder. Time only moves when a test steps it.
"""

from __future__ import annotations

import pytest
from turn_helpers import (
    CLIENT,
    CLIENT2,
    PEER,
    PEER2,
    PEER3,
    PEER6,
    RELAY_PORTS,
    RELAY_V4,
    RELAY_V6,
    SERVER,
    SERVER6,
    FakeRelay,
    Harness,
    TurnClient,
    attribute_types,
    error_code,
    is_success,
    make_server,
    relayed,
)

from stunturn.server import RelayTo, Transport
from stunturn.server.keys import address_key, ip_key
from stunturn.stun import (
    REASONS,
    TRANSPORT_TCP,
    Address,
    Attribute,
    MessageClass,
    Method,
    decode,
)
from stunturn.stun.attributes import (
    AdditionalAddressFamily,
    AddressErrorCode,
    ChannelNumber,
    DontFragment,
    EvenPort,
    Icmp,
    Lifetime,
    MessageIntegrity,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
)
from stunturn.turn import ChannelRoute, LocalQuotas, QuotaLimits
from stunturn.turn.service import CHANNEL_MAX, CHANNEL_MIN

TID = bytes.fromhex("0102030405060708090a0b0c")


def relay_of(server: Harness, client: TurnClient, index: int = 0) -> FakeRelay:
    """The fake relay socket of a client's allocation."""
    relay = server.allocation(client).relays[index]
    assert isinstance(relay, FakeRelay)
    return relay


def allocated(
    server: Harness, *, address: Address = CLIENT, transport: Transport = Transport.UDP
) -> tuple[TurnClient, FakeRelay]:
    """A client (alice) with a fresh allocation."""
    client = server.client(address=address, transport=transport)
    assert is_success(client.allocate())
    return client, relay_of(server, client)


def quota_counts(server: Harness) -> tuple[int, int, int]:
    quotas = server.quotas
    assert isinstance(quotas, LocalQuotas)
    return quotas.total, sum(quotas.users.values()), sum(quotas.ips.values())


# --- Allocate (RFC 8656 section 7.2) ----------------------------------------------------------


def test_allocate_success_attributes() -> None:
    """7.2: the success response carries XOR-RELAYED-ADDRESS, LIFETIME and XOR-MAPPED-ADDRESS
    (the client's reflexive address), signed; the relay is bound for this 5-tuple."""
    server = make_server()
    client = server.client()
    response = client.allocate()
    assert (response.method, response.cls) == (Method.ALLOCATE, MessageClass.SUCCESS)
    assert attribute_types(response) == [
        XorRelayedAddress,
        Lifetime,
        XorMappedAddress,
        MessageIntegrity,
    ]
    [(host, port)] = relayed(response)
    assert host == RELAY_V4 and RELAY_PORTS[0] <= port <= RELAY_PORTS[1]
    assert response.get(Lifetime) == Lifetime(600)
    assert response.get(XorMappedAddress) == XorMappedAddress(*CLIENT)
    relay = server.binder.bound[(host, port)]
    assert relay.five_tuple == (Transport.UDP, CLIENT, SERVER)
    assert relay.allocation is server.allocation(client)
    assert port in server.turn.ports.in_use(RELAY_V4)


def test_allocate_from_an_ipv6_client() -> None:
    """XOR-MAPPED-ADDRESS of an IPv6 client (XOR'd with cookie and transaction ID)."""
    server = make_server()
    client = server.client(address=("2001:db8:ffff::7", 41000), local=SERVER6)
    response = client.allocate()
    assert response.get(XorMappedAddress) == XorMappedAddress("2001:db8:ffff::7", 41000)
    assert relayed(response)[0][0] == RELAY_V4


def test_retransmitted_allocate_gets_identical_bytes() -> None:
    """7.2: a retransmission (same transaction ID) on the 5-tuple gets the same response bytes,
    and no second relay is bound."""
    server = make_server()
    client = server.client()
    client.login()
    request = client.encode(Method.ALLOCATE, RequestedTransport(17), tid=TID)
    first = client.send(request)
    again = client.send(request)
    assert first == again
    assert len(server.binder.bound) == 1 and len(server.turn.allocations) == 1
    server.step(1.0)
    assert client.send(request) == first


def test_different_allocate_on_the_same_five_tuple_is_437() -> None:
    server = make_server()
    client = server.client()
    assert is_success(client.allocate())
    assert error_code(client.allocate()) == 437
    assert len(server.binder.bound) == 1


def test_missing_requested_transport_is_400() -> None:
    server = make_server()
    assert error_code(server.client().request(Method.ALLOCATE)) == 400
    assert not server.turn.allocations


def test_tcp_relay_is_442() -> None:
    """A server whose I/O layer cannot do TCP relays (RFC 6062): 442 Unsupported Transport
    Protocol. (The real one can: see test_turn_tcp_core.py.)"""
    server = make_server()
    response = server.client().request(Method.ALLOCATE, RequestedTransport(TRANSPORT_TCP))
    assert error_code(response) == 442
    assert quota_counts(server) == (0, 0, 0)


def test_requested_family_ipv6_gets_an_ipv6_relay() -> None:
    """RFC 6156 / 8656 7.2: REQUESTED-ADDRESS-FAMILY IPv6 -> relay on the IPv6 relay IP."""
    server = make_server(relay_ips=(RELAY_V4, RELAY_V6))
    response = server.client().allocate(RequestedAddressFamily(2))
    [(host, _)] = relayed(response)
    assert host == RELAY_V6


def test_requested_family_ipv4_explicitly() -> None:
    server = make_server(relay_ips=(RELAY_V4, RELAY_V6))
    assert relayed(server.client().allocate(RequestedAddressFamily(1)))[0][0] == RELAY_V4


def test_requested_ipv6_without_an_ipv6_relay_is_440() -> None:
    server = make_server()
    assert error_code(server.client().allocate(RequestedAddressFamily(2))) == 440
    assert quota_counts(server) == (0, 0, 0)


def test_ipv4_without_an_ipv4_relay_is_440() -> None:
    server = make_server(relay_ips=(RELAY_V6,))
    assert error_code(server.client().allocate()) == 440
    assert relayed(server.client().allocate(RequestedAddressFamily(2)))[0][0] == RELAY_V6


@pytest.mark.parametrize("family", [0, 3, 0x80])
def test_unknown_family_value_is_440(family: int) -> None:
    server = make_server(relay_ips=(RELAY_V4, RELAY_V6))
    assert error_code(server.client().allocate(RequestedAddressFamily(family))) == 440


def test_requested_and_additional_family_together_is_400() -> None:
    """8656 7.2: REQUESTED-ADDRESS-FAMILY with ADDITIONAL-ADDRESS-FAMILY: 400."""
    server = make_server(relay_ips=(RELAY_V4, RELAY_V6))
    response = server.client().allocate(RequestedAddressFamily(1), AdditionalAddressFamily(2))
    assert error_code(response) == 400


def test_additional_family_ipv4_is_400() -> None:
    """18.10: 0x02 (IPv6) is the only valid ADDITIONAL-ADDRESS-FAMILY in an Allocate."""
    server = make_server(relay_ips=(RELAY_V4, RELAY_V6))
    assert error_code(server.client().allocate(AdditionalAddressFamily(1))) == 400


def test_dual_allocation_gets_two_relays() -> None:
    """ADDITIONAL-ADDRESS-FAMILY IPv6: an IPv4 and an IPv6 relayed address."""
    server = make_server(relay_ips=(RELAY_V4, RELAY_V6))
    client = server.client()
    response = client.allocate(AdditionalAddressFamily(2))
    assert [h for h, _ in relayed(response)] == [RELAY_V4, RELAY_V6]
    assert response.get(AddressErrorCode) is None
    assert len(server.allocation(client).relays) == 2
    assert len(server.binder.bound) == 2


def test_dual_allocation_without_an_ipv6_relay_ip() -> None:
    """8656 7.2: the IPv4 relay is granted and ADDRESS-ERROR-CODE reports 440 for IPv6."""
    server = make_server()
    response = server.client().allocate(AdditionalAddressFamily(2))
    assert is_success(response)
    assert [h for h, _ in relayed(response)] == [RELAY_V4]
    assert response.get(AddressErrorCode) == AddressErrorCode(2, 440, REASONS[440])


def test_dual_allocation_with_ipv6_ports_exhausted() -> None:
    """No free IPv6 relay port: IPv4 relay only, ADDRESS-ERROR-CODE 508 for IPv6."""
    server = make_server(relay_ips=(RELAY_V4, RELAY_V6))
    server.binder.take(RELAY_V6, range(RELAY_PORTS[0], RELAY_PORTS[1] + 1))
    response = server.client().allocate(AdditionalAddressFamily(2))
    assert [h for h, _ in relayed(response)] == [RELAY_V4]
    assert response.get(AddressErrorCode) == AddressErrorCode(2, 508, REASONS[508])


@pytest.mark.parametrize("n", range(6))
def test_even_port_gives_an_even_port(n: int) -> None:
    server = make_server(seed=n)
    [(_, port)] = relayed(server.client().allocate(EvenPort(False)))
    assert port % 2 == 0


def test_even_port_with_reservation_and_redeeming_the_token() -> None:
    """8656 7.2: EVEN-PORT with R: an even port and a RESERVATION-TOKEN; a second client
    redeeming the token gets port + 1."""
    server = make_server()
    first = server.client()
    response = first.allocate(EvenPort(True))
    [(host, port)] = relayed(response)
    assert port % 2 == 0
    token = response.get(ReservationToken)
    assert token is not None and len(token.value) == 8
    second = server.client("bob", address=CLIENT2)
    redeemed = second.allocate(token)
    assert relayed(redeemed) == [(host, port + 1)]
    assert redeemed.get(ReservationToken) is None


def test_reserved_port_is_not_handed_to_others() -> None:
    """While reserved, port + 1 is not given to an ordinary Allocate."""
    server = make_server(relay_ports=(50000, 50003))
    response = server.client().allocate(EvenPort(True))
    [(_, port)] = relayed(response)
    others = [server.client("bob", address=(CLIENT2[0], 41000 + i)).allocate() for i in range(3)]
    ports = [relayed(r)[0][1] for r in others if is_success(r)]
    assert port + 1 not in ports
    assert len(ports) == 2 and error_code(others[-1]) == 508


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(EvenPort(False), id="even-port"),
        pytest.param(RequestedAddressFamily(1), id="requested-family"),
        pytest.param(AdditionalAddressFamily(2), id="additional-family"),
    ],
)
def test_reservation_token_with_other_port_attributes_is_400(extra: Attribute) -> None:
    """8656 7.2: RESERVATION-TOKEN together with EVEN-PORT or an address family: 400."""
    server = make_server(relay_ips=(RELAY_V4, RELAY_V6))
    token = server.client().allocate(EvenPort(True)).get(ReservationToken)
    assert token is not None
    response = server.client("bob", address=CLIENT2).allocate(token, extra)
    assert error_code(response) == 400


def test_unknown_reservation_token_is_508() -> None:
    server = make_server()
    response = server.client().allocate(ReservationToken(b"\x00" * 8))
    assert error_code(response) == 508
    assert quota_counts(server) == (0, 0, 0)


def test_expired_reservation_token_is_508() -> None:
    """Reservations last about 30 s (8656 7.2); past that the token is refused."""
    server = make_server()
    token = server.client().allocate(EvenPort(True)).get(ReservationToken)
    assert token is not None
    server.step(31)
    response = server.client("bob", address=CLIENT2).allocate(token)
    assert error_code(response) == 508
    assert quota_counts(server) == (1, 1, 1)


def test_even_port_reserve_with_additional_family_is_400() -> None:
    server = make_server(relay_ips=(RELAY_V4, RELAY_V6))
    response = server.client().allocate(EvenPort(True), AdditionalAddressFamily(2))
    assert error_code(response) == 400


def test_all_ports_taken_is_508_and_releases_the_quota() -> None:
    """Every relay port bound by somebody else: 508, every port tried once, nothing counted."""
    server = make_server()
    server.binder.take(RELAY_V4, range(RELAY_PORTS[0], RELAY_PORTS[1] + 1))
    response = server.client().allocate()
    assert error_code(response) == 508
    assert quota_counts(server) == (0, 0, 0)
    assert sorted(p for _, p in server.binder.attempts) == list(
        range(RELAY_PORTS[0], RELAY_PORTS[1] + 1)
    )
    assert not server.turn.ports.in_use(RELAY_V4)


def test_pool_exhausted_by_allocations_is_508() -> None:
    server = make_server(relay_ports=(50000, 50003))
    results = [server.client(address=(CLIENT[0], 41000 + i)).allocate() for i in range(5)]
    assert [error_code(r) for r in results] == [None, None, None, None, 508]
    assert len({relayed(r)[0] for r in results[:4]}) == 4


def test_taken_ports_are_skipped() -> None:
    """A port the binder cannot bind is skipped; the next free one is used."""
    server = make_server(relay_ports=(50000, 50003))
    server.binder.take(RELAY_V4, (50000, 50001, 50003))
    assert relayed(server.client().allocate()) == [(RELAY_V4, 50002)]


@pytest.mark.parametrize(
    ("requested", "granted"),
    [(None, 600), (0, 600), (1, 600), (599, 600), (601, 601), (1800, 1800), (3600, 3600),
     (3601, 3600), (0xFFFFFFFF, 3600)],
)  # fmt: skip
def test_allocate_lifetime_rules(requested: int | None, granted: int) -> None:
    """8656 7.2: absent -> default 600; below the default -> default; above the maximum
    (3600) -> maximum. The allocation ends exactly then."""
    server = make_server()
    client = server.client()
    extra = [] if requested is None else [Lifetime(requested)]
    response = client.allocate(*extra)
    assert response.get(Lifetime) == Lifetime(granted)
    assert server.allocation(client).expires == granted
    server.step_to(granted - 0.001)
    assert client.five_tuple in server.turn.allocations
    server.step_to(granted)
    assert client.five_tuple not in server.turn.allocations


@pytest.mark.parametrize(
    ("requested", "granted"), [(None, 300), (100, 300), (500, 500), (5000, 900)]
)
def test_lifetimes_are_configurable(requested: int | None, granted: int) -> None:
    server = make_server(default_lifetime=300, max_lifetime=900)
    extra = [] if requested is None else [Lifetime(requested)]
    assert server.client().allocate(*extra).get(Lifetime) == Lifetime(granted)


@pytest.mark.parametrize("dont_fragment", [False, True])
def test_dont_fragment_is_passed_to_the_binder(dont_fragment: bool) -> None:
    """8656 7.2 / 14: DONT-FRAGMENT asks for DF on relayed datagrams; the binder is told."""
    server = make_server()
    client = server.client()
    extra = [DontFragment()] if dont_fragment else []
    assert is_success(client.allocate(*extra))
    assert relay_of(server, client).dont_fragment is dont_fragment
    assert server.allocation(client).dont_fragment is dont_fragment


# --- quotas -----------------------------------------------------------------------------------


def test_per_user_quota_default_10() -> None:
    """486 Allocation Quota Reached on the user's 11th allocation; one ending frees a slot."""
    server = make_server()
    clients = [server.client(address=(CLIENT[0], 41000 + i)) for i in range(11)]
    results = [c.allocate() for c in clients[:10]]
    assert all(is_success(r) for r in results)
    assert error_code(clients[10].allocate()) == 486
    assert is_success(server.client("bob", address=CLIENT2).allocate())
    assert is_success(clients[0].refresh(0))
    assert is_success(clients[10].allocate())


def test_per_client_ip_quota() -> None:
    server = make_server(limits=QuotaLimits(per_client_ip=2))
    a = server.client("alice", address=(CLIENT[0], 1))
    b = server.client("bob", address=(CLIENT[0], 2))
    c = server.client("bob", address=(CLIENT[0], 3))
    assert is_success(a.allocate()) and is_success(b.allocate())
    assert error_code(c.allocate()) == 486
    assert is_success(server.client("bob", address=CLIENT2).allocate())


def test_total_quota() -> None:
    server = make_server(limits=QuotaLimits(total=2))
    assert is_success(server.client("alice").allocate())
    assert is_success(server.client("bob", address=CLIENT2).allocate())
    assert error_code(server.client("bob", address=("203.0.113.9", 1)).allocate()) == 486


def test_quota_released_when_allocations_end() -> None:
    """Quota counts drop when an allocation is refreshed to 0 and when it expires."""
    server = make_server(limits=QuotaLimits(per_user=2))
    a = server.client(address=(CLIENT[0], 1))
    b = server.client(address=(CLIENT[0], 2))
    assert is_success(a.allocate()) and is_success(b.allocate())
    assert quota_counts(server) == (2, 2, 2)
    assert is_success(a.refresh(0))
    assert quota_counts(server) == (1, 1, 1)
    server.step(600)
    assert quota_counts(server) == (0, 0, 0)
    c = server.client(address=(CLIENT[0], 3))
    d = server.client(address=(CLIENT[0], 4))
    assert is_success(c.allocate()) and is_success(d.allocate())


# --- Refresh (section 7.3) --------------------------------------------------------------------


def test_refresh_to_zero_deletes_everything() -> None:
    """7.3: LIFETIME 0 deletes the allocation at once: relay closed through the binder, routes
    and permissions gone, port and quota released; the response says LIFETIME 0."""
    server = make_server()
    client, relay = allocated(server)
    assert is_success(client.channel_bind(0x4000, PEER))
    routes = server.turn.route_table(Transport.UDP, SERVER)
    assert routes
    response = client.refresh(0)
    assert is_success(response) and response.get(Lifetime) == Lifetime(0)
    assert client.verified(response)
    assert relay.closed and server.binder.closed == [relay] and not server.binder.bound
    assert relay.allocation is None
    assert not routes and not server.turn.allocations
    assert not server.turn.ports.in_use(RELAY_V4)
    assert quota_counts(server) == (0, 0, 0)
    assert client.channel_data(0x4000, b"x") == []
    assert client.send_indication(PEER, b"x") == []
    assert error_code(client.refresh(600)) == 437


def test_refresh_extends_the_lifetime() -> None:
    server = make_server()
    client, _ = allocated(server)
    server.step(500)
    response = client.refresh(1200)
    assert response.get(Lifetime) == Lifetime(1200)
    server.step_to(1699.9)
    assert client.five_tuple in server.turn.allocations
    server.step_to(1700)
    assert client.five_tuple not in server.turn.allocations


def test_refresh_without_lifetime_uses_the_default() -> None:
    server = make_server()
    client, _ = allocated(server)
    server.step(100)
    assert client.refresh().get(Lifetime) == Lifetime(600)
    assert server.allocation(client).expires == 700


def test_refresh_without_allocation_is_437() -> None:
    assert error_code(make_server().client().refresh(600)) == 437


def test_refresh_by_another_user_is_441() -> None:
    """8656 7.3 / 441: requests on an allocation must use the credentials that created it."""
    server = make_server()
    allocated(server)
    assert error_code(server.client("bob").refresh(600)) == 441
    assert error_code(server.client("bob").refresh(0)) == 441
    assert server.turn.allocations


def test_refresh_with_the_wrong_family_is_443() -> None:
    """8656 7.3: REQUESTED-ADDRESS-FAMILY not matching the allocation: 443."""
    server = make_server(relay_ips=(RELAY_V4, RELAY_V6))
    client, _ = allocated(server)
    assert error_code(client.refresh(600, RequestedAddressFamily(2))) == 443
    assert is_success(client.refresh(600, RequestedAddressFamily(1)))


def test_refresh_to_zero_of_one_family_of_a_dual_allocation() -> None:
    """8656 7.3: in a dual allocation, REQUESTED-ADDRESS-FAMILY with LIFETIME 0 deletes only
    that family's relay; the other one stays."""
    server = make_server(relay_ips=(RELAY_V4, RELAY_V6))
    client = server.client()
    assert is_success(client.allocate(AdditionalAddressFamily(2)))
    v4, v6 = relay_of(server, client, 0), relay_of(server, client, 1)
    response = client.refresh(0, RequestedAddressFamily(2))
    assert is_success(response)
    assert v6.closed and not v4.closed
    assert server.allocation(client).relays == [v4]
    assert v6.address[1] not in server.turn.ports.in_use(RELAY_V6)
    assert quota_counts(server) == (1, 1, 1)
    assert error_code(client.create_permission(PEER6)) == 443
    assert is_success(client.create_permission(PEER))
    assert client.send_indication(PEER, b"v4") == [RelayTo(v4, b"v4", PEER)]
    assert is_success(client.refresh(0, RequestedAddressFamily(1)))
    assert not server.turn.allocations and v4.closed


def test_channels_of_a_removed_family_stop_relaying() -> None:
    """After the IPv6 half of a dual allocation is deleted, ChannelData on a channel bound to
    an IPv6 peer must be dropped, not handed to the closed IPv6 relay."""
    server = make_server(relay_ips=(RELAY_V4, RELAY_V6))
    client = server.client()
    assert is_success(client.allocate(AdditionalAddressFamily(2)))
    assert is_success(client.channel_bind(0x4001, PEER6))
    assert is_success(client.refresh(0, RequestedAddressFamily(2)))
    assert client.channel_data(0x4001, b"hi") == []


# --- CreatePermission (section 9) -----------------------------------------------------------


def test_create_permission_installs_every_peer() -> None:
    """9.2: several XOR-PEER-ADDRESS in one request: all installed (per IP, any port)."""
    server = make_server()
    client, relay = allocated(server)
    response = client.create_permission(PEER, PEER2, PEER3)
    assert is_success(response) and client.verified(response)
    for peer in (PEER, PEER2, PEER3, (PEER[0], 9)):
        assert client.send_indication(peer, b"hi") == [RelayTo(relay, b"hi", peer)]
    assert set(server.allocation(client).permissions) == {
        ip_key(p[0]) for p in (PEER, PEER2, PEER3)
    }


def test_create_permission_is_all_or_nothing_on_policy() -> None:
    """One denied peer (403) and none of the others is installed."""
    server = make_server()
    client, _ = allocated(server)
    assert error_code(client.create_permission(PEER, ("10.1.2.3", 80), PEER2)) == 403
    assert not server.allocation(client).permissions
    assert client.send_indication(PEER, b"x") == []


def test_create_permission_is_all_or_nothing_on_family() -> None:
    """One peer of the wrong family (443) and none of the others is installed."""
    server = make_server()
    client, _ = allocated(server)
    assert error_code(client.create_permission(PEER, PEER6)) == 443
    assert not server.allocation(client).permissions


def test_create_permission_without_peer_is_400() -> None:
    server = make_server()
    client, _ = allocated(server)
    assert error_code(client.create_permission()) == 400


def test_create_permission_on_a_dual_allocation_accepts_both_families() -> None:
    server = make_server(relay_ips=(RELAY_V4, RELAY_V6))
    client = server.client()
    assert is_success(client.allocate(AdditionalAddressFamily(2)))
    v4, v6 = relay_of(server, client, 0), relay_of(server, client, 1)
    assert is_success(client.create_permission(PEER, PEER6))
    assert client.send_indication(PEER6, b"6") == [RelayTo(v6, b"6", PEER6)]
    assert client.send_indication(PEER, b"4") == [RelayTo(v4, b"4", PEER)]


def test_permission_quota_is_508() -> None:
    server = make_server(limits=QuotaLimits(permissions=2))
    client, _ = allocated(server)
    assert is_success(client.create_permission(PEER, PEER2))
    assert error_code(client.create_permission(PEER3)) == 508
    assert is_success(client.create_permission(PEER2, PEER))  # refreshing is not growing
    assert error_code(client.create_permission(PEER, PEER3)) == 508
    assert ip_key(PEER3[0]) not in server.allocation(client).permissions


def test_channel_bind_counts_against_the_permission_quota() -> None:
    """The permission a ChannelBind installs is a permission like any other: it counts."""
    server = make_server(limits=QuotaLimits(permissions=2))
    client, _ = allocated(server)
    assert is_success(client.create_permission(PEER, PEER2))
    assert error_code(client.channel_bind(0x4000, PEER3)) == 508
    assert is_success(client.channel_bind(0x4000, PEER))  # PEER already has one: no growth
    assert ip_key(PEER3[0]) not in server.allocation(client).permissions


def test_permission_lasts_exactly_300_seconds() -> None:
    """8656 9: the permission lifetime MUST be 300 s; it is gone right after."""
    server = make_server()
    client, relay = allocated(server)
    assert is_success(client.create_permission(PEER))
    server.step_to(299.9)
    assert client.send_indication(PEER, b"a") == [RelayTo(relay, b"a", PEER)]
    server.step_to(300.1)
    assert client.send_indication(PEER, b"b") == []
    assert not server.allocation(client).permissions


def test_create_permission_refreshes() -> None:
    server = make_server()
    client, relay = allocated(server)
    assert is_success(client.create_permission(PEER))
    server.step_to(200)
    assert is_success(client.create_permission(PEER))
    server.step_to(300.1)  # the first lifetime's heap entry is stale now
    assert client.send_indication(PEER, b"a") == [RelayTo(relay, b"a", PEER)]
    server.step_to(499.9)
    assert server.allocation(client).permitted(PEER[0])
    server.step_to(500.1)
    assert not server.allocation(client).permitted(PEER[0])


def test_create_permission_without_allocation_is_437() -> None:
    assert error_code(make_server().client().create_permission(PEER)) == 437


# --- ChannelBind (section 11) -----------------------------------------------------------------


def test_channel_range_is_the_rfc5766_one() -> None:
    """The server accepts 0x4000-0x7FFF (RFC 5766's range, which RFC 5766 clients still use;
    service.py explains why that is unambiguous here), not just RFC 8656's 0x4000-0x4FFF."""
    assert (CHANNEL_MIN, CHANNEL_MAX) == (0x4000, 0x7FFF)


@pytest.mark.parametrize("number", [0x4000, 0x4FFF, 0x5000, 0x7FFF])
def test_channel_numbers_accepted(number: int) -> None:
    server = make_server()
    client, relay = allocated(server)
    assert is_success(client.channel_bind(number, PEER))
    assert client.channel_data(number, b"x") == [RelayTo(relay, b"x", PEER)]


@pytest.mark.parametrize("number", [0x0000, 0x3FFF, 0x8000, 0xFFFF])
def test_channel_numbers_refused(number: int) -> None:
    """12.2: a channel number outside the range is 400 Bad Request."""
    server = make_server()
    client, _ = allocated(server)
    response = client.channel_bind(number, PEER)
    assert error_code(response) == 400 and client.verified(response)
    assert not server.allocation(client).channels


def test_channel_bind_missing_attributes_is_400() -> None:
    server = make_server()
    client, _ = allocated(server)
    assert error_code(client.request(Method.CHANNEL_BIND, ChannelNumber(0x4000))) == 400
    assert error_code(client.request(Method.CHANNEL_BIND, XorPeerAddress(*PEER))) == 400


def test_channel_bind_policy_and_family() -> None:
    server = make_server()
    client, _ = allocated(server)
    assert error_code(client.channel_bind(0x4000, ("192.168.1.1", 80))) == 403
    assert error_code(client.channel_bind(0x4000, PEER6)) == 443
    assert not server.allocation(client).channels


def test_rebinding_the_same_channel_refreshes_it() -> None:
    """11.2: the same number to the same peer refreshes the binding (and its permission).

    ChannelData flows only while both the channel (600 s) and the permission (300 s) last, so
    a client must rebind (or CreatePermission) at least every 300 s (RFC 8656 section 12).
    """
    server = make_server()
    client, relay = allocated(server)
    assert is_success(client.refresh(3600))
    assert is_success(client.channel_bind(0x4000, PEER))
    server.step_to(400)
    assert is_success(client.channel_bind(0x4000, PEER))
    server.step_to(699.9)
    assert client.channel_data(0x4000, b"x") == [RelayTo(relay, b"x", PEER)]
    server.step_to(700.1)  # the permission lapsed; the channel (until 1000) alone is not enough
    assert client.channel_data(0x4000, b"x") == []
    assert is_success(client.channel_bind(0x4000, PEER))  # refreshes both
    assert client.channel_data(0x4000, b"x") == [RelayTo(relay, b"x", PEER)]


def test_same_number_to_another_peer_is_400() -> None:
    server = make_server()
    client, _ = allocated(server)
    assert is_success(client.channel_bind(0x4000, PEER))
    assert error_code(client.channel_bind(0x4000, PEER2)) == 400
    assert error_code(client.channel_bind(0x4000, (PEER[0], PEER[1] + 1))) == 400


def test_same_peer_to_another_number_is_400() -> None:
    server = make_server()
    client, _ = allocated(server)
    assert is_success(client.channel_bind(0x4000, PEER))
    assert error_code(client.channel_bind(0x4001, PEER)) == 400
    assert is_success(client.channel_bind(0x4001, (PEER[0], PEER[1] + 1)))  # another port


def test_channel_cooldown_after_expiry() -> None:
    """12.2: after a binding expires (600 s), for 5 minutes neither its number nor its peer
    may be bound to anything else; rebinding the same pair is fine; afterwards both are free."""
    server = make_server()
    client, relay = allocated(server)
    assert is_success(client.refresh(3600))
    assert is_success(client.channel_bind(0x4000, PEER))
    server.step_to(400)
    assert is_success(client.create_permission(PEER))  # ChannelData also needs the permission
    server.step_to(599.9)
    assert client.channel_data(0x4000, b"x") == [RelayTo(relay, b"x", PEER)]
    server.step_to(600)
    assert client.channel_data(0x4000, b"x") == []
    assert not server.allocation(client).channels
    server.step_to(899.9)
    assert error_code(client.channel_bind(0x4000, PEER2)) == 400  # number cooling down
    assert error_code(client.channel_bind(0x4001, PEER)) == 400  # peer cooling down
    server.step_to(900)
    assert is_success(client.channel_bind(0x4000, PEER2))
    assert is_success(client.channel_bind(0x4001, PEER))
    assert client.channel_data(0x4000, b"y") == [RelayTo(relay, b"y", PEER2)]


def test_channel_cooldown_allows_the_same_pair_again() -> None:
    server = make_server()
    client, relay = allocated(server)
    assert is_success(client.refresh(3600))
    assert is_success(client.channel_bind(0x4000, PEER))
    server.step_to(700)
    assert is_success(client.channel_bind(0x4000, PEER))
    assert client.channel_data(0x4000, b"x") == [RelayTo(relay, b"x", PEER)]
    server.step_to(999.9)  # the permission the rebind installed at 700 lasts until 1000
    assert client.channel_data(0x4000, b"x") == [RelayTo(relay, b"x", PEER)]


def test_channel_bind_installs_and_refreshes_the_permission() -> None:
    """11.2: ChannelBind also installs or refreshes the permission for the peer's IP."""
    server = make_server()
    client, relay = allocated(server)
    assert is_success(client.refresh(3600))
    assert is_success(client.channel_bind(0x4000, PEER))
    assert client.send_indication((PEER[0], 1), b"p") == [RelayTo(relay, b"p", (PEER[0], 1))]
    server.step_to(200)
    assert is_success(client.channel_bind(0x4000, PEER))
    server.step_to(499.9)
    assert server.allocation(client).permitted(PEER[0])
    server.step_to(500.1)
    assert not server.allocation(client).permitted(PEER[0])
    # The channel lasts until 800, but without a permission ChannelData is dropped.
    assert client.channel_data(0x4000, b"c") == []


def test_channel_quota_is_508() -> None:
    server = make_server(limits=QuotaLimits(channels=2))
    client, _ = allocated(server)
    assert is_success(client.channel_bind(0x4000, PEER))
    assert is_success(client.channel_bind(0x4001, PEER2))
    assert error_code(client.channel_bind(0x4002, PEER3)) == 508
    assert is_success(client.channel_bind(0x4001, PEER2))


# --- ChannelData (section 12.4-12.6) ------------------------------------------------------------


def test_channel_data_over_udp_is_relayed() -> None:
    server = make_server()
    client, relay = allocated(server)
    assert is_success(client.channel_bind(0x4000, PEER))
    assert client.channel_data(0x4000, b"hello") == [RelayTo(relay, b"hello", PEER)]
    assert client.channel_data(0x4000, b"") == [RelayTo(relay, b"", PEER)]
    alloc = server.allocation(client)
    assert (alloc.bytes_to_peer, alloc.packets_to_peer) == (5, 2)


def test_channel_data_over_udp_with_padding() -> None:
    """Padding after the announced length (allowed over UDP) is not relayed."""
    server = make_server()
    client, relay = allocated(server)
    assert is_success(client.channel_bind(0x4000, PEER))
    assert client.send(b"\x40\x00\x00\x03abc\x00") == [RelayTo(relay, b"abc", PEER)]


@pytest.mark.parametrize("frame", [b"\x40\x00\x00\x0ahello", b"\x40\x00", b"\x40\x00\x00"])
def test_truncated_channel_data_is_dropped(frame: bytes) -> None:
    """12.5: ChannelData shorter than its length field says is dropped silently."""
    server = make_server()
    client, _ = allocated(server)
    assert is_success(client.channel_bind(0x4000, PEER))
    assert client.send(frame) == []


def test_channel_data_on_an_unbound_channel_or_from_elsewhere_is_dropped() -> None:
    server = make_server()
    client, _ = allocated(server)
    assert is_success(client.channel_bind(0x4000, PEER))
    assert client.channel_data(0x4001, b"x") == []
    stranger = server.client("bob", address=CLIENT2)
    assert stranger.channel_data(0x4000, b"x") == []
    tcp_twin = server.client(transport=Transport.TCP)
    assert tcp_twin.channel_data(0x4000, b"x") == []


@pytest.mark.parametrize("transport", [Transport.TCP, Transport.TLS])
@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5])
def test_channel_data_over_streams_is_relayed(transport: Transport, size: int) -> None:
    """Over TCP/TLS frames are padded to 4 bytes (12.5); exactly the payload is relayed."""
    server = make_server()
    client, relay = allocated(server, transport=transport)
    assert is_success(client.channel_bind(0x4FFF, PEER))
    payload = bytes(range(size))
    assert client.channel_data(0x4FFF, payload) == [RelayTo(relay, payload, PEER)]


def test_route_table_follows_the_binding() -> None:
    """The hot-path route table gets ``address_key(client) << 16 | channel`` -> route when a
    channel is bound, and loses it when the binding expires."""
    server = make_server()
    client, relay = allocated(server)
    assert is_success(client.refresh(3600))
    routes = server.turn.route_table(Transport.UDP, SERVER)
    key = (address_key(CLIENT) << 16) | 0x4000
    assert key not in routes
    assert is_success(client.channel_bind(0x4000, PEER))
    route = routes[key]
    assert isinstance(route, ChannelRoute)
    assert (route.relay, route.peer, route.allocation) == (relay, PEER, server.allocation(client))
    assert server.allocation(client).peer_channels == {address_key(PEER): 0x4000}
    server.step_to(600)
    assert key not in routes
    assert not server.allocation(client).peer_channels


def test_route_table_is_per_transport_and_listener() -> None:
    server = make_server()
    client, _ = allocated(server, transport=Transport.TCP)
    assert is_success(client.channel_bind(0x4000, PEER))
    key = (address_key(CLIENT) << 16) | 0x4000
    assert key in server.turn.route_table(Transport.TCP, SERVER)
    assert key not in server.turn.route_table(Transport.UDP, SERVER)
    assert is_success(client.refresh(0))
    assert key not in server.turn.route_table(Transport.TCP, SERVER)


# --- Send indications (section 10) ------------------------------------------------------------


def test_send_indication_needs_a_permission() -> None:
    """10.2: relayed only with a permission for the peer's IP; never answered."""
    server = make_server()
    client, relay = allocated(server)
    assert client.send_indication(PEER, b"x") == []
    assert is_success(client.create_permission(PEER))
    assert client.send_indication(PEER, b"data") == [RelayTo(relay, b"data", PEER)]
    assert client.send_indication(PEER2, b"data") == []
    alloc = server.allocation(client)
    assert (alloc.bytes_to_peer, alloc.packets_to_peer) == (4, 1)


def test_send_indication_to_the_wrong_family_is_dropped() -> None:
    server = make_server()
    client, _ = allocated(server)
    assert client.send_indication(PEER6, b"x") == []


def test_send_indication_checks_the_policy_with_the_port() -> None:
    """The server's own relay IP is reachable only on relay-range ports, even with a
    permission for that IP (the permission is per IP, the policy looks at the port)."""
    server = make_server(allow=["192.0.2.0/24"])  # the test relay IP is in TEST-NET-1
    client, relay = allocated(server)
    assert is_success(client.create_permission((RELAY_V4, 50001)))
    to_relay = (RELAY_V4, 50001)
    assert client.send_indication(to_relay, b"x") == [RelayTo(relay, b"x", to_relay)]
    assert client.send_indication((RELAY_V4, 22), b"x") == []
    assert error_code(client.channel_bind(0x4000, (RELAY_V4, 22))) == 403
    assert is_success(client.channel_bind(0x4000, to_relay))


@pytest.mark.parametrize(
    ("peer", "data"), [(PEER, None), (None, b"x"), (None, None)], ids=["no-data", "no-peer", "none"]
)
def test_incomplete_send_indication_is_dropped(peer: Address | None, data: bytes | None) -> None:
    server = make_server()
    client, _ = allocated(server)
    assert is_success(client.create_permission(PEER))
    assert client.send_indication(peer, data) == []


def test_send_indication_without_allocation_is_dropped() -> None:
    server = make_server()
    client = server.client()
    assert client.send_indication(PEER, b"x") == []
    assert server.core.counters.error_responses == 0


# --- the timer --------------------------------------------------------------------------------


def test_next_deadline_is_the_earliest_lifetime() -> None:
    server = make_server()
    assert server.core.next_deadline() is None
    client, _ = allocated(server)
    assert server.core.next_deadline() == 600
    server.step_to(10)
    assert is_success(client.create_permission(PEER))
    assert server.core.next_deadline() == 310
    server.step_to(310)
    assert server.core.next_deadline() == 600


def test_allocation_expires_exactly_at_its_lifetime() -> None:
    server = make_server()
    client, relay = allocated(server)
    server.step_to(599.999)
    assert client.five_tuple in server.turn.allocations and not relay.closed
    server.step_to(600)
    assert client.five_tuple not in server.turn.allocations
    assert relay.closed and quota_counts(server) == (0, 0, 0)
    assert error_code(client.refresh(600)) == 437


def test_stale_heap_entries_do_not_expire_early() -> None:
    """A refresh pushes a new heap entry; the old one, popped at 600, must not delete."""
    server = make_server()
    client, _ = allocated(server)
    server.step_to(100)
    assert is_success(client.refresh(1200))
    server.step_to(600)
    assert client.five_tuple in server.turn.allocations
    assert server.core.next_deadline() == 1300
    server.step_to(1300)
    assert client.five_tuple not in server.turn.allocations


def test_whole_lifecycle_by_stepping_time() -> None:
    """Allocate, permissions, channels, data and refreshes over an hour of stepped time, then
    silence: everything lapses in order and nothing is left behind."""
    server = make_server()
    client, relay = allocated(server)
    assert is_success(client.channel_bind(0x4000, PEER))
    assert is_success(client.create_permission(PEER2))
    for t in range(240, 3600, 240):  # a well-behaved client refreshes every 4 minutes
        server.step_to(t)
        assert is_success(client.refresh(600))
        assert is_success(client.create_permission(PEER2))
        assert is_success(client.channel_bind(0x4000, PEER))
        assert client.channel_data(0x4000, b"c") == [RelayTo(relay, b"c", PEER)]
        assert client.send_indication(PEER2, b"s") == [RelayTo(relay, b"s", PEER2)]
    last = 3360
    server.step_to(last + 300)  # permissions lapse: neither Send nor ChannelData is relayed
    assert client.send_indication(PEER2, b"s") == []
    assert client.channel_data(0x4000, b"c") == []
    server.step_to(last + 600)  # channel and allocation lapse
    assert not server.turn.allocations and relay.closed
    assert not server.turn.route_table(Transport.UDP, SERVER)
    assert not server.binder.bound and quota_counts(server) == (0, 0, 0)
    while (deadline := server.core.next_deadline()) is not None:
        server.step_to(max(deadline, server.now))
    assert server.now <= last + 900


def test_close_all_ends_every_allocation() -> None:
    server = make_server()
    clients = [allocated(server, address=(CLIENT[0], 1 + i))[0] for i in range(3)]
    server.turn.close_all()
    assert not server.turn.allocations and not server.binder.bound
    assert quota_counts(server) == (0, 0, 0)
    assert error_code(clients[0].refresh(600)) == 437


# --- ICMP (section 11.4 / 18.13) ----------------------------------------------------------------


def test_icmp_indication_only_with_a_permission() -> None:
    """An ICMP error from a peer becomes a Data indication with XOR-PEER-ADDRESS and ICMP,
    only when the client has a permission for the peer's IP."""
    server = make_server()
    client, relay = allocated(server)
    assert server.turn.icmp_indication(relay, PEER, 3, 3, 0) is None
    assert is_success(client.create_permission(PEER))
    frame = server.turn.icmp_indication(relay, (PEER[0], 9999), 3, 4, 1400)
    assert frame is not None
    msg = decode(frame)
    assert (msg.method, msg.cls) == (Method.DATA, MessageClass.INDICATION)
    assert msg.attributes == [XorPeerAddress(PEER[0], 9999), Icmp(3, 4, 1400)]
    assert server.turn.icmp_indication(relay, PEER2, 3, 3, 0) is None
    assert is_success(client.refresh(0))
    assert server.turn.icmp_indication(relay, PEER, 3, 3, 0) is None


def test_icmpv6_indication_on_a_dual_allocation() -> None:
    server = make_server(relay_ips=(RELAY_V4, RELAY_V6))
    client = server.client()
    assert is_success(client.allocate(AdditionalAddressFamily(2)))
    assert is_success(client.create_permission(PEER6))
    frame = server.turn.icmp_indication(relay_of(server, client, 1), PEER6, 1, 4, 0)
    assert frame is not None
    assert decode(frame).attributes == [XorPeerAddress(*PEER6), Icmp(1, 4, 0)]


# --- per-allocation bandwidth budget ------------------------------------------------------------


def test_max_bps_budget_for_client_to_peer_traffic() -> None:
    """With max_bps, client-to-peer data beyond the budget is dropped until time refills the
    bucket (Send indications and ChannelData share it). The bucket holds one second of traffic
    but never less than 64 KiB, so any single datagram can pass."""
    server = make_server(limits=QuotaLimits(max_bps=100_000))
    client, relay = allocated(server)
    assert is_success(client.channel_bind(0x4000, PEER))
    chunk = b"x" * 40_000
    assert client.channel_data(0x4000, chunk) == [RelayTo(relay, chunk, PEER)]
    assert client.send_indication(PEER, chunk) == [RelayTo(relay, chunk, PEER)]
    assert client.channel_data(0x4000, chunk) == []  # 20,000 bytes left
    server.step(0.2)  # +20,000 bytes
    assert client.channel_data(0x4000, chunk) == [RelayTo(relay, chunk, PEER)]
    assert client.send_indication(PEER, chunk) == []
    server.step(10)  # the bucket holds at most one second (100,000 bytes)
    for _ in range(2):
        assert client.channel_data(0x4000, chunk) == [RelayTo(relay, chunk, PEER)]
    assert client.channel_data(0x4000, chunk) == []


# --- odds and ends ------------------------------------------------------------------------------


def test_old_timer_entries_do_not_touch_a_new_allocation_on_the_same_five_tuple() -> None:
    """An allocation deleted early leaves heap entries behind; when they pop they must not
    end a newer allocation of the same 5-tuple, nor its permissions or channels."""
    server = make_server()
    client, _ = allocated(server)
    assert is_success(client.create_permission(PEER))
    assert is_success(client.channel_bind(0x4000, PEER2))
    assert is_success(client.refresh(0))
    server.step_to(100)
    assert is_success(client.allocate())
    relay = relay_of(server, client)
    assert is_success(client.channel_bind(0x4000, PEER2))
    assert is_success(client.create_permission(PEER))
    server.step_to(300)  # the old permission's entry pops
    assert client.send_indication(PEER, b"p") == [RelayTo(relay, b"p", PEER)]
    server.step_to(450)
    assert is_success(client.create_permission(PEER2))  # keep ChannelData's permission
    server.step_to(600)  # the old allocation's and channel's entries pop
    assert client.five_tuple in server.turn.allocations
    assert client.channel_data(0x4000, b"c") == [RelayTo(relay, b"c", PEER2)]
    server.step_to(700)
    assert client.five_tuple not in server.turn.allocations


def test_refresh_to_zero_with_the_allocations_own_family_deletes_it() -> None:
    server = make_server()
    client, relay = allocated(server)
    assert is_success(client.refresh(0, RequestedAddressFamily(1)))
    assert not server.turn.allocations and relay.closed


def test_even_port_with_additional_family() -> None:
    """EVEN-PORT without R may come with ADDITIONAL-ADDRESS-FAMILY: the IPv4 port is even."""
    server = make_server(relay_ips=(RELAY_V4, RELAY_V6))
    response = server.client().allocate(EvenPort(False), AdditionalAddressFamily(2))
    [(v4, port), (v6, _)] = relayed(response)
    assert (v4, v6) == (RELAY_V4, RELAY_V6) and port % 2 == 0


def test_channel_data_from_an_ipv6_client() -> None:
    server = make_server()
    v6_client = ("2001:db8:ffff::7", 41000)
    client, relay = allocated(server, address=v6_client)
    client.local = SERVER6
    assert error_code(client.channel_bind(0x4000, PEER)) == 437  # another 5-tuple
    client.local = SERVER
    assert is_success(client.channel_bind(0x4000, PEER))
    assert client.channel_data(0x4000, b"v6") == [RelayTo(relay, b"v6", PEER)]
    key = (address_key(v6_client) << 16) | 0x4000
    assert key in server.turn.route_table(Transport.UDP, SERVER)


def test_success_responses_of_permission_and_channel_requests_are_bare() -> None:
    """CreatePermission and ChannelBind successes carry no attribute but the integrity."""
    server = make_server()
    client, _ = allocated(server)
    for response in (client.create_permission(PEER), client.channel_bind(0x4000, PEER)):
        assert attribute_types(response) == [MessageIntegrity]
        assert client.verified(response)


def test_malformed_input_is_counted_and_dropped() -> None:
    server = make_server()
    client = server.client()
    for junk in (b"\x00\x03\x00\x04" + b"\x21\x12\xa4\x42" + b"x" * 12, b"\x00", b"\xff" * 30):
        assert client.send(junk) == []
    assert server.core.counters.malformed == 3


def test_even_port_reservation_skips_a_pair_whose_second_port_is_taken() -> None:
    """EVEN-PORT with R: a pair whose port+1 another program holds is never chosen, so the
    token can be redeemed (the pool only reserves; the binder proves port+1 free first)."""
    server = make_server()
    host = server.turn.config.relay_ips[0]
    low, high = server.turn.config.relay_ports
    odd = [p for p in range(low, high + 1) if p % 2]
    server.binder.take(host, odd[: len(odd) // 2])  # half the pairs are unusable
    client = server.client()
    response = client.allocate(RequestedTransport(17), EvenPort(True))
    relay = response.get(XorRelayedAddress)
    assert relay is not None and relay.port % 2 == 0
    assert (host, relay.port + 1) not in server.binder.taken
