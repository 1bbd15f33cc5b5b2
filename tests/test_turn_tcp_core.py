"""RFC 6062 TCP allocations in the sans-IO core: Allocate, Connect, ConnectionAttempt,
ConnectionBind, their errors (400, 403, 437, 441, 442, 443, 446, 447, 508) and timers.

The core runs against :class:`FakeTcpBinder` (records connection attempts and closes); the I/O
layer's outcome of a connection attempt is played by calling ``tcp_connected`` /
``tcp_connect_failed``, and time moves only by ``Harness.step``. The same protocol over real
sockets is in test_turn_tcp_io.py.
"""

from __future__ import annotations

import logging

import pytest
from turn_helpers import (
    CLIENT,
    PEER,
    PEER2,
    PEER6,
    FakeTcpBinder,
    Harness,
    TurnClient,
    error_code,
    is_success,
    make_server,
)

from stunturn.server import SendTo, Splice, Transport
from stunturn.stun import (
    TRANSPORT_TCP,
    Attribute,
    FramingError,
    Message,
    MessageClass,
    Method,
    StreamFramer,
    decode,
    new_transaction_id,
)
from stunturn.stun.attributes import (
    AdditionalAddressFamily,
    ConnectionId,
    DontFragment,
    EvenPort,
    RequestedTransport,
    ReservationToken,
    XorPeerAddress,
    XorRelayedAddress,
)
from stunturn.turn import QuotaLimits
from stunturn.turn.tcp import BIND_TIMEOUT, PeerConnection, PeerState


def tcp_server(**kwargs: object) -> tuple[Harness, FakeTcpBinder]:
    server = make_server(tcp=True, **kwargs)  # type: ignore[arg-type]
    assert isinstance(server.binder, FakeTcpBinder)
    return server, server.binder


def control(server: Harness, user: str = "alice", port: int = 40000) -> TurnClient:
    """A client on a TCP control connection with a TCP allocation."""
    client = server.client(user, address=(CLIENT[0], port), transport=Transport.TCP)
    response = client.request(Method.ALLOCATE, RequestedTransport(TRANSPORT_TCP))
    assert is_success(response), response
    return client


def data_client(server: Harness, user: str = "alice", port: int = 41000) -> TurnClient:
    """A new TCP connection from the same client host, for ConnectionBind."""
    return server.client(user, address=(CLIENT[0], port), transport=Transport.TCP)


def connect(client: TurnClient, peer: tuple[str, int] = PEER) -> Message | None:
    """Send Connect; the response if one came at once (an error), else None."""
    if client.nonce is None:
        client.login()
    actions = client.send(client.encode(Method.CONNECT, XorPeerAddress(*peer)))
    if not actions:
        return None
    (action,) = actions
    assert isinstance(action, SendTo)
    return decode(action.data)


def answer(actions: list[SendTo], client: TurnClient) -> Message:
    """The one message the core sent to ``client``'s control connection."""
    (action,) = actions
    assert (action.transport, action.remote, action.local) == client.five_tuple
    return decode(action.data)


def connected(server: Harness, client: TurnClient, peer: tuple[str, int] = PEER) -> int:
    """Connect and let the connection attempt succeed; the CONNECTION-ID."""
    binder = server.binder
    assert isinstance(binder, FakeTcpBinder)
    assert connect(client, peer) is None
    conn = binder.connecting[-1]
    response = answer(server.turn.tcp_connected(conn, server.now), client)
    assert is_success(response) and response.method == Method.CONNECT
    assert client.verified(response)
    conn_id = response.get(ConnectionId)
    assert conn_id is not None and conn_id.value == conn.id
    return conn_id.value


def bind(data: TurnClient, conn_id: int) -> Message:
    return data.request(Method.CONNECTION_BIND, ConnectionId(conn_id))


# --- Allocate -------------------------------------------------------------------------------------


def test_tcp_allocation_over_tcp() -> None:
    server, binder = tcp_server()
    client = control(server)
    alloc = server.allocation(client)
    assert alloc.tcp
    assert binder.tcp_bound and binder.tcp_bound[0].allocation is alloc


def test_tcp_allocation_over_udp_is_400() -> None:
    server, binder = tcp_server()
    response = server.client().request(Method.ALLOCATE, RequestedTransport(TRANSPORT_TCP))
    assert error_code(response) == 400
    assert not binder.tcp_bound and not server.turn.allocations


@pytest.mark.parametrize(
    "extra",
    [DontFragment(), EvenPort(False), ReservationToken(bytes(8)), AdditionalAddressFamily(2)],
    ids=["dont-fragment", "even-port", "reservation-token", "additional-family"],
)
def test_tcp_allocation_rejects_udp_only_attributes(extra: Attribute) -> None:
    server, _ = tcp_server()
    client = server.client(transport=Transport.TCP)
    response = client.request(Method.ALLOCATE, RequestedTransport(TRANSPORT_TCP), extra)
    assert error_code(response) == 400
    assert not server.turn.allocations


def test_no_channels_or_send_on_a_tcp_allocation() -> None:
    server, _ = tcp_server()
    client = control(server)
    assert error_code(client.channel_bind(0x4000, PEER)) == 400
    assert client.send_indication(PEER, b"x") == []


# --- Connect ----------------------------------------------------------------------------------


def test_connect_then_bind_splices() -> None:
    server, _ = tcp_server()
    client = control(server)
    conn_id = connected(server, client)
    conn = server.turn.peer_conns[conn_id]
    assert (conn.state, conn.peer, conn.inbound) == (PeerState.PENDING, PEER, False)
    data = data_client(server)
    response = bind(data, conn_id)
    assert is_success(response) and data.verified(response)
    assert conn.state is PeerState.BOUND and conn.client == data.five_tuple
    (splice,) = data.spliced
    assert isinstance(splice, Splice) and splice.peer_connection is conn
    assert (splice.transport, splice.remote, splice.local) == data.five_tuple


def test_connect_without_allocation_is_437() -> None:
    server, _ = tcp_server()
    client = server.client(transport=Transport.TCP)
    response = connect(client)
    assert response is not None and error_code(response) == 437


def test_connect_on_udp_allocation_is_400() -> None:
    server, _ = tcp_server()
    client = server.client(transport=Transport.TCP)
    assert is_success(client.allocate())
    response = connect(client)
    assert response is not None and error_code(response) == 400


def test_connect_without_peer_is_400() -> None:
    server, _ = tcp_server()
    client = control(server)
    response = client.request(Method.CONNECT)
    assert error_code(response) == 400


def test_connect_to_forbidden_peer_is_403() -> None:
    server, binder = tcp_server()
    client = control(server)
    response = connect(client, ("10.0.0.5", 80))
    assert response is not None and error_code(response) == 403
    assert not binder.connecting


def test_connect_wrong_family_is_443() -> None:
    server, _ = tcp_server()
    client = control(server)
    response = connect(client, PEER6)
    assert response is not None and error_code(response) == 443


def test_connect_twice_to_the_same_peer_is_446() -> None:
    """While connecting, and once connected (pending or bound): 446."""
    server, binder = tcp_server()
    client = control(server)
    assert connect(client) is None
    response = connect(client)
    assert response is not None and error_code(response) == 446
    answer(server.turn.tcp_connected(binder.connecting[0], server.now), client)
    response = connect(client)
    assert response is not None and error_code(response) == 446
    assert connect(client, PEER2) is None  # another peer is fine


def test_connect_failure_is_447_and_may_be_retried() -> None:
    server, binder = tcp_server()
    client = control(server)
    assert connect(client) is None
    response = answer(server.turn.tcp_connect_failed(binder.connecting[0], server.now), client)
    assert error_code(response) == 447 and client.verified(response)
    assert not server.turn.peer_conns
    assert connect(client) is None  # the peer is free again


def test_peer_connection_quota_is_508() -> None:
    server, _ = tcp_server(limits=QuotaLimits(peer_connections=2))
    client = control(server)
    assert connect(client, ("93.184.216.34", 1)) is None
    assert connect(client, ("93.184.216.34", 2)) is None
    response = connect(client, ("93.184.216.34", 3))
    assert response is not None and error_code(response) == 508


def test_late_outcome_after_allocation_ended_is_ignored() -> None:
    server, binder = tcp_server()
    client = control(server)
    assert connect(client) is None
    conn = binder.connecting[0]
    assert is_success(client.refresh(0))
    assert conn in binder.closed_tcp  # the attempt is abandoned with the allocation
    assert server.turn.tcp_connected(conn, server.now) == []
    assert server.turn.tcp_connect_failed(conn, server.now) == []


# --- ConnectionBind -----------------------------------------------------------------------------


def test_bind_unknown_id_is_400() -> None:
    server, _ = tcp_server()
    control(server)
    assert error_code(bind(data_client(server), 12345)) == 400


def test_bind_without_connection_id_is_400() -> None:
    server, _ = tcp_server()
    control(server)
    assert error_code(data_client(server).request(Method.CONNECTION_BIND)) == 400


def test_bind_on_the_control_connection_is_400() -> None:
    server, _ = tcp_server()
    client = control(server)
    conn_id = connected(server, client)
    assert error_code(bind(client, conn_id)) == 400
    assert server.turn.peer_conns[conn_id].state is PeerState.PENDING


def test_bind_over_udp_is_400() -> None:
    server, _ = tcp_server()
    client = control(server)
    conn_id = connected(server, client)
    udp = server.client()
    assert error_code(bind(udp, conn_id)) == 400


def test_bind_by_another_user_is_441() -> None:
    server, _ = tcp_server()
    client = control(server)
    conn_id = connected(server, client)
    response = bind(data_client(server, user="bob"), conn_id)
    assert error_code(response) == 441
    assert server.turn.peer_conns[conn_id].state is PeerState.PENDING


def test_bind_while_still_connecting_is_400() -> None:
    server, binder = tcp_server()
    client = control(server)
    assert connect(client) is None
    conn_id = binder.connecting[0].id
    assert error_code(bind(data_client(server), conn_id)) == 400


def test_second_bind_of_the_same_id_is_400() -> None:
    server, _ = tcp_server()
    client = control(server)
    conn_id = connected(server, client)
    assert is_success(bind(data_client(server, port=41000), conn_id))
    assert error_code(bind(data_client(server, port=41001), conn_id)) == 400


def test_unbound_connection_closes_after_30_s() -> None:
    server, binder = tcp_server()
    client = control(server)
    conn_id = connected(server, client)
    conn = server.turn.peer_conns[conn_id]
    server.step(BIND_TIMEOUT - 1)
    assert conn_id in server.turn.peer_conns
    server.step(1)
    assert conn_id not in server.turn.peer_conns and conn in binder.closed_tcp
    assert error_code(bind(data_client(server), conn_id)) == 400
    assert connect(client) is None  # the peer may be connected again


def test_bound_connection_outlives_the_bind_timer() -> None:
    server, binder = tcp_server()
    client = control(server)
    conn_id = connected(server, client)
    assert is_success(bind(data_client(server), conn_id))
    server.step(BIND_TIMEOUT * 3)
    assert conn_id in server.turn.peer_conns and not binder.closed_tcp


def test_closed_connection_frees_the_peer() -> None:
    server, _ = tcp_server()
    client = control(server)
    conn_id = connected(server, client)
    server.turn.tcp_closed(server.turn.peer_conns[conn_id])
    assert not server.turn.peer_conns and not server.allocation(client).peer_conns
    assert connect(client) is None


def test_allocation_end_closes_every_peer_connection() -> None:
    server, binder = tcp_server()
    client = control(server)
    first = connected(server, client, PEER)
    second = connected(server, client, PEER2)
    assert is_success(bind(data_client(server), first))
    conns = [server.turn.peer_conns[first], server.turn.peer_conns[second]]
    assert is_success(client.refresh(0))
    assert binder.closed_tcp == conns or set(map(id, binder.closed_tcp)) == set(map(id, conns))
    assert not server.turn.peer_conns


def test_connection_ids_are_unique_and_nonzero() -> None:
    server, _ = tcp_server()
    client = control(server)
    ids = {connected(server, client, ("93.184.216.34", port)) for port in range(1, 41)}
    assert len(ids) == 40 and 0 not in ids


# --- inbound connections (ConnectionAttempt) --------------------------------------------------


def incoming(
    server: Harness, client: TurnClient, peer: tuple[str, int]
) -> tuple[PeerConnection | None, list[SendTo]]:
    relay = server.allocation(client).relays[0]
    return server.turn.tcp_incoming(relay, peer, server.now)


def test_inbound_needs_a_permission() -> None:
    server, _ = tcp_server()
    client = control(server)
    assert incoming(server, client, PEER) == (None, [])
    assert is_success(client.create_permission(PEER))
    conn, actions = incoming(server, client, PEER)
    assert conn is not None and conn.inbound and conn.state is PeerState.PENDING
    indication = answer(actions, client)
    assert indication.method == Method.CONNECTION_ATTEMPT
    peer_attr = indication.get(XorPeerAddress)
    conn_attr = indication.get(ConnectionId)
    assert peer_attr is not None and peer_attr.address == PEER
    assert conn_attr is not None and conn_attr.value == conn.id
    data = data_client(server)
    assert is_success(bind(data, conn.id))
    assert data.spliced[0].peer_connection is conn


def test_inbound_second_connection_from_the_same_peer_is_refused() -> None:
    server, _ = tcp_server()
    client = control(server)
    assert is_success(client.create_permission(PEER))
    first, _ = incoming(server, client, PEER)
    assert first is not None
    assert incoming(server, client, PEER) == (None, [])
    other, _ = incoming(server, client, (PEER[0], PEER[1] + 1))
    assert other is not None  # same IP, other port: another peer


def test_inbound_from_denied_peer_is_refused_even_with_permission() -> None:
    """The policy applies to inbound connections too (a permission cannot name a denied
    address: CreatePermission itself is refused with 403)."""
    server, _ = tcp_server(deny=["93.184.216.0/24"])
    client = control(server)
    assert error_code(client.create_permission(PEER)) == 403
    assert incoming(server, client, PEER) == (None, [])


def test_inbound_unbound_closes_after_30_s() -> None:
    server, binder = tcp_server()
    client = control(server)
    assert is_success(client.create_permission(PEER))
    conn, _ = incoming(server, client, PEER)
    assert conn is not None
    server.step(BIND_TIMEOUT)
    assert conn in binder.closed_tcp and not server.turn.peer_conns


def test_inbound_on_udp_allocation_is_refused() -> None:
    server, _ = tcp_server()
    client = server.client(transport=Transport.TCP)
    assert is_success(client.allocate())
    relay = server.allocation(client).relays[0]
    assert server.turn.tcp_incoming(relay, PEER, server.now) == (None, [])


def test_relay_address_in_allocate_response() -> None:
    server, binder = tcp_server()
    client = server.client(transport=Transport.TCP)
    response = client.request(Method.ALLOCATE, RequestedTransport(TRANSPORT_TCP))
    relayed = response.get(XorRelayedAddress)
    assert relayed is not None and relayed.address == binder.tcp_bound[0].address


def test_stream_framer_stops_after_connection_bind() -> None:
    """Bytes after a ConnectionBind request in the same read stay unframed (they are the
    client's application data once the bind succeeds)."""
    request = Message(
        Method.CONNECTION_BIND, MessageClass.REQUEST, new_transaction_id(), [ConnectionId(7)]
    ).encode()
    other = Message(Method.BINDING, MessageClass.REQUEST, new_transaction_id()).encode()
    framer = StreamFramer()
    raw = b"\xff\xfe raw application bytes"
    frames = framer.feed(other + request + raw, int(Method.CONNECTION_BIND))
    assert frames == [other, request]
    assert framer.take() == raw and framer.buffered == 0
    # Without the stop type the same bytes are a framing error.
    with pytest.raises(FramingError, match="cannot start"):
        StreamFramer().feed(request + raw)


def test_closed_connection_dates_the_end_of_its_allocation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The I/O layer passes the moment a client's connection closed: the allocation_ended
    log's duration ends there, not at the last request the service saw."""
    server, _ = tcp_server()
    client = control(server)
    alloc = server.allocation(client)
    created = alloc.created
    caplog.set_level(logging.INFO, logger="stunturn")
    server.turn.delete(alloc, "connection closed", created + 42.5)
    (record,) = [r for r in caplog.records if getattr(r, "event", "") == "allocation_ended"]
    assert record.duration == 42.5  # type: ignore[attr-defined]
    assert record.reason == "connection closed"  # type: ignore[attr-defined]
    assert alloc.five_tuple not in server.turn.allocations
