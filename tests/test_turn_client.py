"""The sans-IO TURN client against our real TURN server core, in memory, on a stepped clock.

A :class:`Link` joins a :class:`TurnClientCore` to a :class:`ServerCore` (with a
:class:`TurnService` wired to the in-memory relay binder of ``turn_helpers``): the client's
:class:`Transmit` outputs go to ``handle_udp`` (or through a StreamFramer to
``handle_stream_frame``), the server's answers go back to ``client.receive``, and relayed data
is collected per peer. Peer-to-client traffic is built from the server's own tables, as the
relay socket's hot path does (permission check, ChannelData for a bound peer, else a Data
indication). Time only moves when a test steps it; both timers fire in order.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from turn_helpers import (
    CLIENT,
    PEER,
    PEER2,
    PEER6,
    RELAY_V4,
    RELAY_V6,
    SERVER,
    Harness,
    make_server,
)

from stunturn.server import RelayTo, SendTo, StreamAction, Transport
from stunturn.server.keys import address_key, ip_key
from stunturn.stun import (
    FAMILY_IPV6,
    PASSWORD_ALGORITHM_MD5,
    PASSWORD_ALGORITHM_SHA256,
    Address,
    Message,
    MessageClass,
    Method,
    StreamFramer,
    decode,
    long_term_key,
)
from stunturn.stun.attributes import (
    ChannelNumber,
    Data,
    ErrorCode,
    Lifetime,
    MessageIntegrity,
    MessageIntegritySha256,
    Nonce,
    PasswordAlgorithm,
    PasswordAlgorithms,
    Realm,
    RequestedAddressFamily,
    RequestedTransport,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
)
from stunturn.stun.transaction import RetransmitPolicy
from stunturn.turn import QuotaLimits, channel_data, data_indication
from stunturn.turn.client import (
    QUEUE_PER_IP,
    Allocated,
    ChannelBindFailed,
    ChannelBound,
    Closed,
    DataReceived,
    Event,
    Failed,
    IcmpReceived,
    Output,
    PermissionCreated,
    PermissionFailed,
    Refreshed,
    State,
    Transmit,
    TurnClientCore,
    TurnUsageError,
    normalize_peer,
)

PASSWORD = "alice-secret"

Filter = Callable[[bytes], bytes | None]


class Link:
    """A client core and the server harness joined in memory on one stepped clock."""

    def __init__(
        self,
        server: Harness,
        client: TurnClientCore,
        *,
        address: Address = CLIENT,
        to_server: Filter | None = None,
        to_client: Filter | None = None,
    ) -> None:
        self.server = server
        self.client = client
        self.address = address
        self.transport = client.transport
        self.events: list[Event] = []
        self.to_peer: list[tuple[Address, Address, bytes]] = []
        """(relayed address, peer, payload) for every datagram the server relayed."""
        self.sent: list[bytes] = []
        """Every Transmit the client produced, whether delivered or not."""
        self.received: list[bytes] = []
        """Every message the server sent to the client, as sent."""
        self.to_server = to_server
        self.to_client = to_client
        self.hold = False
        self.held: list[bytes] = []
        self._framer = StreamFramer()

    @property
    def now(self) -> float:
        return self.server.now

    @property
    def five_tuple(self) -> tuple[Transport, Address, Address]:
        return (self.transport, self.address, SERVER)

    # --- plumbing ---

    def deliver(self, outputs: list[Output]) -> list[Event]:
        """Carry out the client's outputs; returns the events among them (and those that the
        server's answers caused, recursively)."""
        events: list[Event] = []
        for output in outputs:
            if isinstance(output, Transmit):
                self.sent.append(output.data)
                if self.hold:
                    self.held.append(output.data)
                else:
                    events += self._to_server(output.data)
            else:
                events.append(output)
                self.events.append(output)
        return events

    def release(self) -> list[Event]:
        """Deliver what was held."""
        self.hold = False
        held, self.held = self.held, []
        events: list[Event] = []
        for data in held:
            events += self._to_server(data)
        return events

    def _to_server(self, data: bytes) -> list[Event]:
        if self.to_server is not None:
            filtered = self.to_server(data)
            if filtered is None:
                return []
            data = filtered
        core, now = self.server.core, self.now
        actions: list[StreamAction] = []
        if self.transport is Transport.UDP:
            actions += core.handle_udp(data, SERVER, self.address, now)
        else:
            for frame in self._framer.feed(data):
                actions += core.handle_stream_frame(
                    frame, SERVER, self.address, self.transport, now
                )
        events: list[Event] = []
        for action in actions:
            if isinstance(action, RelayTo):
                self.to_peer.append((action.relay.address, action.peer, action.data))
            else:
                assert isinstance(action, SendTo)
                assert action.remote == self.address
                events += self.to_client_bytes(action.data)
        return events

    def to_client_bytes(self, data: bytes) -> list[Event]:
        if self.to_client is not None:
            filtered = self.to_client(data)
            if filtered is None:
                return []
            data = filtered
        self.received.append(data)
        return self.deliver(self.client.receive(data, self.now))

    def step(self, seconds: float) -> list[Event]:
        """Let time pass, firing both timers in order."""
        target = self.now + seconds
        events: list[Event] = []
        while True:
            deadlines = [
                d
                for d in (self.client.next_deadline(), self.server.core.next_deadline())
                if d is not None and d <= target
            ]
            if not deadlines:
                break
            self.server.step_to(max(self.now, min(deadlines)))
            events += self.deliver(self.client.on_timer(self.now))
        self.server.step_to(target)
        return events

    # --- API shortcuts ---

    def allocate(self) -> Allocated:
        events = self.deliver(self.client.allocate(self.now))
        assert len(events) == 1 and isinstance(events[0], Allocated), events
        return events[0]

    def send(self, peer: Address, data: bytes) -> list[Event]:
        return self.deliver(self.client.send(peer, data, self.now))

    def create_permission(self, *ips: str) -> list[Event]:
        return self.deliver(self.client.create_permission(list(ips), self.now))

    def bind_channel(self, peer: Address) -> list[Event]:
        return self.deliver(self.client.bind_channel(peer, self.now))

    def close(self) -> list[Event]:
        return self.deliver(self.client.close(self.now))

    def from_peer(self, peer: Address, data: bytes, split: bool = False) -> list[Event]:
        """``peer`` sends ``data`` to the relayed address: the relay socket's logic."""
        alloc = self.server.turn.allocations.get(self.five_tuple)
        if alloc is None or ip_key(peer[0]) not in alloc.permissions:
            return []  # RFC 8656 section 11.3: no permission, no delivery
        number = alloc.peer_channels.get(address_key(peer))
        stream = self.transport is not Transport.UDP
        frame = (
            data_indication(peer, data)
            if number is None
            else channel_data(number, data, stream=stream)
        )
        if not split:
            return self.to_client_bytes(frame)
        events: list[Event] = []
        for i in range(len(frame)):
            events += self.to_client_bytes(frame[i : i + 1])
        return events

    # --- what the server saw ---

    def requests(self, method: int) -> list[Message]:
        """Requests of ``method`` the client produced (retransmissions included)."""
        out = []
        for data in self.sent:
            if data[0] < 0x40:
                msg = decode(data)
                if msg.method == method and msg.cls is MessageClass.REQUEST:
                    out.append(msg)
        return out

    def server_has_allocation(self) -> bool:
        return self.five_tuple in self.server.turn.allocations


def new_link(
    server: Harness | None = None,
    *,
    transport: Transport = Transport.UDP,
    lifetime: int | None = None,
    password: str = PASSWORD,
    address: Address = CLIENT,
    **kwargs: object,
) -> Link:
    server = server or make_server()
    client = TurnClientCore(
        "alice",
        password,
        transport=transport,
        lifetime=lifetime,
        **kwargs,  # type: ignore[arg-type]
    )
    return Link(server, client, address=address)


def allocated_link(**kwargs: object) -> Link:
    link = new_link(**kwargs)  # type: ignore[arg-type]
    link.allocate()
    return link


def strip_password_algorithms(data: bytes) -> bytes:
    """Make our server look like an RFC 5389 server: no PASSWORD-ALGORITHMS in its 401/438."""
    if data[0] >= 0x40:
        return data
    msg = decode(data)
    if msg.cls is not MessageClass.ERROR:
        return data
    msg.attributes = [a for a in msg.attributes if not isinstance(a, PasswordAlgorithms)]
    return msg.encode()


def error_codes(link: Link) -> dict[int, int]:
    return dict(link.server.core.error_codes)


# --- Allocate and authentication ----------------------------------------------------------------


def test_allocate_negotiates_sha256_with_an_rfc8489_server() -> None:
    """RFC 8489 section 9.2.5: the 401's nonce cookie announces PASSWORD-ALGORITHMS, the
    client picks SHA-256, echoes the list, names its choice and signs with
    MESSAGE-INTEGRITY-SHA256; the success response verifies under the SHA-256 key."""
    link = new_link(lifetime=600)
    allocated = link.allocate()
    alloc = link.server.turn.allocations[link.five_tuple]
    assert allocated == Allocated((RELAY_V4, alloc.relays[0].address[1]), CLIENT, 600)
    first, signed = link.requests(Method.ALLOCATE)
    assert first.get(MessageIntegrity) is None and first.get(MessageIntegritySha256) is None
    assert first.get(RequestedTransport) == RequestedTransport(17)
    assert first.get(Lifetime) == Lifetime(600)
    assert signed.get(PasswordAlgorithm) == PasswordAlgorithm(PASSWORD_ALGORITHM_SHA256)
    assert signed.get(PasswordAlgorithms) is not None
    assert signed.get(MessageIntegritySha256) is not None
    assert signed.get(MessageIntegrity) is None
    assert signed.transaction_id != first.transaction_id
    assert link.client.password_algorithm == PASSWORD_ALGORITHM_SHA256
    assert alloc.sha256
    assert alloc.key == long_term_key("alice", "example.org", PASSWORD, PASSWORD_ALGORITHM_SHA256)
    assert link.client.state is State.ALLOCATED
    assert link.client.relayed_address == allocated.relayed
    assert link.client.mapped_address == CLIENT
    assert error_codes(link) == {401: 1}


def test_allocate_md5_with_a_server_that_offers_no_algorithms() -> None:
    """Without PASSWORD-ALGORITHMS in the 401, the client signs RFC 5389 style: MD5 key,
    MESSAGE-INTEGRITY, no password algorithm attributes; the server answers with MI."""
    server = make_server()
    link = new_link(server)
    link.to_client = strip_password_algorithms
    link.allocate()
    _, signed = link.requests(Method.ALLOCATE)
    assert signed.get(MessageIntegrity) is not None
    assert signed.get(MessageIntegritySha256) is None
    assert signed.get(PasswordAlgorithm) is None and signed.get(PasswordAlgorithms) is None
    assert link.client.password_algorithm == PASSWORD_ALGORITHM_MD5
    alloc = server.turn.allocations[link.five_tuple]
    assert not alloc.sha256
    assert alloc.key == long_term_key("alice", "example.org", PASSWORD)
    success = decode(link.received[-1])
    assert success.get(MessageIntegrity) is not None


def test_allocate_requested_family_ipv6() -> None:
    """RFC 6156: REQUESTED-ADDRESS-FAMILY IPv6 gets an IPv6 relayed address."""
    server = make_server(relay_ips=(RELAY_V4, RELAY_V6))
    link = new_link(server, family=FAMILY_IPV6)
    allocated = link.allocate()
    assert allocated.relayed[0] == RELAY_V6
    assert link.requests(Method.ALLOCATE)[0].get(RequestedAddressFamily) == (
        RequestedAddressFamily(FAMILY_IPV6)
    )
    link.send(PEER6, b"six")
    assert link.to_peer == [(allocated.relayed, PEER6, b"six")]


def test_wrong_password_fails_with_401() -> None:
    link = new_link(password="wrong")
    events = link.deliver(link.client.allocate(link.now))
    assert events == [Failed("ALLOCATE: 401 credentials refused (401 to a signed request)", 401)]
    assert link.client.state is State.FAILED
    assert len(link.requests(Method.ALLOCATE)) == 2  # challenged once, refused once


def test_known_realm_and_nonce_sign_the_first_request() -> None:
    """With a nonce known in advance the first request is signed; a stale one draws 438, the
    client retries with the fresh nonce."""
    link = new_link(realm="example.org", nonce="obMatJos2AAACnot-a-valid-nonce")
    link.allocate()
    first = link.requests(Method.ALLOCATE)[0]
    assert first.get(MessageIntegrity) is not None  # MD5 until an algorithm is offered
    assert error_codes(link) == {438: 1}


def test_stale_nonce_recovered_on_refresh() -> None:
    """The nonce lives 600 s; the refresh at 540 s still uses it, the one at 1080 s draws a
    438 and is retried at once with the new nonce (RFC 8489 section 9.2.5)."""
    link = allocated_link(lifetime=600)
    events = link.step(540)
    assert events == [Refreshed(600)]
    assert error_codes(link) == {401: 1}
    events = link.step(540)
    assert events == [Refreshed(600)]
    assert error_codes(link) == {401: 1, 438: 1}
    refreshes = link.requests(Method.REFRESH)
    assert len(refreshes) == 3
    assert refreshes[1].get(Nonce) != refreshes[2].get(Nonce)
    assert link.server_has_allocation()


def test_refresh_keeps_the_allocation_alive_for_an_hour() -> None:
    """Refreshes at lifetime - 60 s keep the allocation across 3600 s of stepped time."""
    link = allocated_link(lifetime=600)
    relayed = link.client.relayed_address
    for _ in range(36):
        link.step(100)
        assert link.server_has_allocation()
    assert link.client.state is State.ALLOCATED
    assert link.client.relayed_address == relayed
    refreshes = [e for e in link.events if isinstance(e, Refreshed)]
    assert len(refreshes) == 6  # 540, 1080, ..., 3240
    alloc = link.server.turn.allocations[link.five_tuple]
    assert alloc.expires == 3240 + 600


def test_short_lifetime_refreshes_at_half() -> None:
    """A lifetime of 100 s is refreshed after 50 s, not 40 s (lifetime - 60 would be too
    late to retransmit)."""
    server = make_server(default_lifetime=100)
    link = new_link(server)
    assert link.allocate().lifetime == 100
    assert link.client.next_deadline() == 50
    link.step(50)
    assert len(link.requests(Method.REFRESH)) == 1
    assert link.client.next_deadline() == 100


def test_allocation_lost_on_the_server_fails_the_refresh_with_437() -> None:
    link = allocated_link()
    link.server.turn.delete(link.server.turn.allocations[link.five_tuple], "test")
    events = link.step(540)
    assert events == [Failed("REFRESH: 437 Allocation Mismatch", 437)]
    assert link.client.state is State.FAILED
    assert link.client.next_deadline() is None
    with pytest.raises(TurnUsageError):
        link.client.send(PEER, b"x", link.now)


def test_allocation_quota_surfaces_486() -> None:
    server = make_server(limits=QuotaLimits(per_user=1))
    allocated_link(server=server)
    second = new_link(server, address=("198.51.100.9", 40000))
    events = second.deliver(second.client.allocate(second.now))
    assert events == [Failed("ALLOCATE: 486 Allocation Quota Reached", 486)]


def test_explicit_refresh_and_close_release_the_allocation() -> None:
    """Refresh LIFETIME 0 deletes the allocation (RFC 8656 section 7.3); Closed follows."""
    link = allocated_link(lifetime=900)
    assert link.deliver(link.client.refresh(link.now)) == [Refreshed(900)]
    assert link.close() == [Closed()]
    release = link.requests(Method.REFRESH)[-1]
    assert release.get(Lifetime) == Lifetime(0)
    assert not link.server_has_allocation()
    assert link.client.state is State.CLOSED
    assert link.client.next_deadline() is None
    assert link.close() == []


def test_close_before_allocating_needs_no_request() -> None:
    link = new_link()
    assert link.close() == [Closed()]
    assert link.sent == []


def test_close_when_the_release_is_lost_times_out() -> None:
    link = allocated_link()
    link.hold = True
    assert link.close() == []
    assert link.client.state is State.CLOSING
    assert link.step(40) == [Closed()]
    assert len(link.requests(Method.REFRESH)) == 7  # sent and retransmitted 6 times


# --- retransmissions --------------------------------------------------------------------------


def test_udp_retransmits_per_rfc8489_then_times_out() -> None:
    """RFC 8489 section 6.2.1: 7 transmissions at 0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s and a
    timeout 8 s (Rm x RTO) after the last one, at 39.5 s."""
    link = new_link()
    link.hold = True
    link.deliver(link.client.allocate(link.now))
    times = [0.0]
    while True:
        deadline = link.client.next_deadline()
        assert deadline is not None
        link.server.step_to(deadline)
        events = link.deliver(link.client.on_timer(deadline))
        if events:
            break
        times.append(deadline)
    assert times == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert link.now == 39.5
    assert events == [Failed("ALLOCATE timed out", None)]
    assert len(set(link.held)) == 1  # the same bytes every time
    assert link.client.stats.retransmissions == 6


def test_udp_retransmission_recovers_a_lost_request() -> None:
    link = new_link()
    dropped: list[bytes] = []

    def drop_first(data: bytes) -> bytes | None:
        if not dropped:
            dropped.append(data)
            return None
        return data

    link.to_server = drop_first
    assert link.deliver(link.client.allocate(link.now)) == []
    events = link.step(0.5)
    assert len(events) == 1 and isinstance(events[0], Allocated)


def test_lost_allocate_response_is_answered_again_by_the_server() -> None:
    """The signed Allocate's success is lost; its retransmission gets the same bytes from
    the server (RFC 8656 section 7.2), and the client takes them."""
    link = new_link()
    answers: list[bytes] = []

    def drop_first_success(data: bytes) -> bytes | None:
        if data[0] < 0x40 and decode(data).cls is MessageClass.SUCCESS and not answers:
            answers.append(data)
            return None
        return data

    link.to_client = drop_first_success
    assert link.deliver(link.client.allocate(link.now)) == []
    events = link.step(0.5)
    assert len(events) == 1 and isinstance(events[0], Allocated)
    assert link.received[-1] == answers[0]


def test_tcp_sends_once_and_times_out_after_39_5_s() -> None:
    link = new_link(transport=Transport.TCP)
    link.hold = True
    link.deliver(link.client.allocate(link.now))
    assert link.client.next_deadline() == 39.5
    assert link.step(39.4) == []
    assert link.step(0.1) == [Failed("ALLOCATE timed out", None)]
    assert len(link.held) == 1
    assert link.client.stats.retransmissions == 0


def test_custom_policy() -> None:
    link = new_link(policy=RetransmitPolicy(rto=0.1, rc=2, rm=4))
    link.hold = True
    link.deliver(link.client.allocate(0.0))
    assert link.step(0.5) == [Failed("ALLOCATE timed out", None)]
    assert len(link.held) == 2


# --- response integrity ---------------------------------------------------------------------


def test_forged_success_is_ignored_and_the_real_one_taken() -> None:
    """A success whose integrity does not verify is dropped as if never received (RFC 8489
    section 9.2.5); the retransmission's genuine answer is then accepted."""
    link = new_link()
    tampered: list[bytes] = []

    def corrupt_first_success(data: bytes) -> bytes | None:
        if data[0] < 0x40 and decode(data).cls is MessageClass.SUCCESS and not tampered:
            forged = bytearray(data)
            forged[-1] ^= 1  # the last byte of MESSAGE-INTEGRITY-SHA256
            tampered.append(bytes(forged))
            return bytes(forged)
        return data

    link.to_client = corrupt_first_success
    assert link.deliver(link.client.allocate(link.now)) == []
    assert link.client.stats.integrity_failures == 1
    assert link.client.state is State.ALLOCATING
    events = link.step(0.5)
    assert len(events) == 1 and isinstance(events[0], Allocated)


def test_unsigned_success_to_a_signed_request_is_ignored() -> None:
    link = new_link()

    def strip_integrity(data: bytes) -> bytes | None:
        msg = decode(data)
        if msg.cls is not MessageClass.SUCCESS:
            return data
        msg.attributes = [
            a
            for a in msg.attributes
            if not isinstance(a, MessageIntegrity | MessageIntegritySha256)
        ]
        return msg.encode()

    link.to_client = strip_integrity
    assert link.deliver(link.client.allocate(link.now)) == []
    assert link.client.stats.integrity_failures == 1


# --- scripted challenges (a server that is not ours) ----------------------------------------


def _challenge(
    request: bytes, code: int, *attrs: object, realm: str | None = "r", nonce: str | None = "n"
) -> bytes:
    msg = decode(request)
    response = Message(msg.method, MessageClass.ERROR, msg.transaction_id)
    response.attributes.append(ErrorCode(code, "x"))
    if realm is not None:
        response.attributes.append(Realm(realm))
    if nonce is not None:
        response.attributes.append(Nonce(nonce))
    response.attributes += list(attrs)  # type: ignore[arg-type]
    return response.encode()


def _only_transmit(outputs: list[Output]) -> bytes:
    assert len(outputs) == 1 and isinstance(outputs[0], Transmit), outputs
    return outputs[0].data


def test_challenge_without_nonce_fails() -> None:
    client = TurnClientCore("alice", "pw")
    request = _only_transmit(client.allocate(0.0))
    events = client.receive(_challenge(request, 401, nonce=None), 0.0)
    assert events == [Failed("ALLOCATE: 401 401 without REALM or NONCE", 401)]


def test_rfc5389_nonce_without_cookie_uses_md5_even_if_algorithms_are_listed() -> None:
    """PASSWORD-ALGORITHMS counts only behind the nonce cookie (RFC 8489 section 9.2.5)."""
    client = TurnClientCore("alice", "pw")
    request = _only_transmit(client.allocate(0.0))
    offered = PasswordAlgorithms(((PASSWORD_ALGORITHM_SHA256, b""),))
    signed = decode(_only_transmit(client.receive(_challenge(request, 401, offered), 0.0)))
    assert signed.get(MessageIntegrity) is not None
    assert signed.get(PasswordAlgorithm) is None
    assert signed.get(Realm) == Realm("r") and signed.get(Nonce) == Nonce("n")


def test_password_algorithm_bid_down_is_refused() -> None:
    """Once SHA-256 was negotiated, a challenge without PASSWORD-ALGORITHMS is refused."""
    client = TurnClientCore("alice", "pw")
    request = _only_transmit(client.allocate(0.0))
    cookie = "obMatJos2gAAA" + "rest"
    offered = PasswordAlgorithms(((PASSWORD_ALGORITHM_SHA256, b""), (PASSWORD_ALGORITHM_MD5, b"")))
    signed = _only_transmit(client.receive(_challenge(request, 401, offered, nonce=cookie), 0.0))
    assert decode(signed).get(MessageIntegritySha256) is not None
    events = client.receive(_challenge(signed, 438, nonce="plain"), 0.0)
    assert len(events) == 1 and isinstance(events[0], Failed)
    assert "bid-down" in events[0].reason


def test_unsupported_password_algorithm_fails() -> None:
    client = TurnClientCore("alice", "pw")
    request = _only_transmit(client.allocate(0.0))
    offered = PasswordAlgorithms(((0x99, b""),))
    events = client.receive(_challenge(request, 401, offered, nonce="obMatJos2gAAAx"), 0.0)
    assert len(events) == 1 and isinstance(events[0], Failed)
    assert "no supported password algorithm" in events[0].reason


def test_endless_stale_nonces_give_up() -> None:
    client = TurnClientCore("alice", "pw")
    request = _only_transmit(client.allocate(0.0))
    request = _only_transmit(client.receive(_challenge(request, 401), 0.0))
    for _ in range(2):  # three challenges are answered in all
        request = _only_transmit(client.receive(_challenge(request, 438), 0.0))
    events = client.receive(_challenge(request, 438), 0.0)
    assert events == [Failed("ALLOCATE: 438 x", 438)]


def test_try_alternate_is_not_followed() -> None:
    client = TurnClientCore("alice", "pw")
    request = _only_transmit(client.allocate(0.0))
    events = client.receive(_challenge(request, 300, realm=None, nonce=None), 0.0)
    assert events == [Failed("ALLOCATE: 300 x", 300)]


# --- permissions ------------------------------------------------------------------------------


def test_explicit_permission_then_send_indication() -> None:
    link = allocated_link()
    assert link.create_permission(PEER[0], PEER2[0]) == [
        PermissionCreated(PEER[0]),
        PermissionCreated(PEER2[0]),
    ]
    assert len(link.requests(Method.CREATE_PERMISSION)) == 1  # both in one request
    assert link.client.permissions == {PEER[0], PEER2[0]}
    assert link.send(PEER, b"hello") == []
    relayed = link.client.relayed_address
    assert link.to_peer == [(relayed, PEER, b"hello")]
    assert link.sent[-1][:2] == b"\x00\x16"  # a Send indication


def test_lazy_permission_queues_and_flushes() -> None:
    """Data for a peer without a permission waits (at most 32 datagrams per IP; the rest is
    dropped and counted) while one CreatePermission is in flight, then goes out in order."""
    link = allocated_link()
    link.hold = True
    for i in range(QUEUE_PER_IP + 8):
        assert link.send(PEER, b"%d" % i) == []
    assert link.send(PEER2, b"other") == []
    assert len(link.held) == 2  # one CreatePermission per IP
    assert link.client.stats.queue_dropped == 8
    events = link.release()
    assert events == [PermissionCreated(PEER[0]), PermissionCreated(PEER2[0])]
    assert [d for _, p, d in link.to_peer if p == PEER] == [b"%d" % i for i in range(32)]
    assert [d for _, p, d in link.to_peer if p == PEER2] == [b"other"]


def test_permission_refreshed_while_used_and_lapses_when_idle() -> None:
    """Refreshed every 240 s while data flows; without traffic it lapses at both ends."""
    link = allocated_link(server=make_server(nonce_lifetime=1e6))  # no 438 retries to count
    link.send(PEER, b"first")
    for _ in range(17):  # 1020 s of traffic, one datagram a minute
        link.step(60)
        link.send(PEER, b"ping")
        assert ip_key(PEER[0]) in link.server.turn.allocations[link.five_tuple].permissions
    assert len(link.requests(Method.CREATE_PERMISSION)) == 1 + 4  # at 240, 480, 720, 960
    link.step(540)  # refreshed at 1200 (used since 960), not at 1440: lapses at 1500
    assert len(link.requests(Method.CREATE_PERMISSION)) == 6
    assert PEER[0] not in link.client.permissions
    assert ip_key(PEER[0]) not in link.server.turn.allocations[link.five_tuple].permissions
    # The next datagram installs it again.
    link.send(PEER, b"again")
    assert link.to_peer[-1][2] == b"again"


def test_received_data_keeps_a_permission_in_use() -> None:
    link = allocated_link()
    link.create_permission(PEER[0])
    for _ in range(8):
        link.step(60)
        assert link.from_peer(PEER, b"in") == [DataReceived(PEER, b"in")]
    assert len(link.requests(Method.CREATE_PERMISSION)) == 3  # 0, 240, 480


def test_denied_peer_surfaces_403() -> None:
    server = make_server(deny=["93.184.216.0/24"])
    link = allocated_link(server=server)
    events = link.create_permission(PEER[0])
    assert events == [PermissionFailed(PEER[0], "CREATE_PERMISSION: 403 Forbidden", 403)]
    # Data for it is dropped for a while instead of asking again for each datagram.
    assert link.send(PEER, b"a") == []
    assert link.send(PEER, b"b") == []
    assert len(link.requests(Method.CREATE_PERMISSION)) == 1
    assert link.client.stats.queue_dropped == 2
    link.step(10)
    events = link.send(PEER, b"c")
    assert events == [PermissionFailed(PEER[0], "CREATE_PERMISSION: 403 Forbidden", 403)]
    assert link.client.stats.queue_dropped == 3


def test_permission_timeout_drops_the_queue() -> None:
    link = allocated_link()
    link.hold = True
    link.send(PEER, b"a")
    link.send(PEER, b"b")
    events = link.step(40)
    assert events == [PermissionFailed(PEER[0], "CREATE_PERMISSION timed out", None)]
    assert link.client.stats.queue_dropped == 2


def test_data_indication_is_decoded() -> None:
    link = allocated_link()
    link.create_permission(PEER[0])
    assert link.from_peer(PEER, b"from the peer") == [DataReceived(PEER, b"from the peer")]
    assert link.from_peer(PEER2, b"no permission") == []


def test_icmp_in_a_data_indication() -> None:
    link = allocated_link()
    link.create_permission(PEER[0])
    relay = link.server.turn.allocations[link.five_tuple].relays[0]
    frame = link.server.turn.icmp_indication(relay, PEER, 3, 3, 0)
    assert frame is not None
    assert link.to_client_bytes(frame) == [IcmpReceived(PEER, 3, 3, 0)]


# --- channels -----------------------------------------------------------------------------


def test_channel_data_both_ways() -> None:
    link = allocated_link()
    assert link.bind_channel(PEER) == [ChannelBound(PEER, 0x4000)]
    assert link.client.channels == {PEER: 0x4000}
    assert link.client.channel_number(PEER) == 0x4000
    assert link.client.permissions == {PEER[0]}  # ChannelBind installs the permission
    bind = link.requests(Method.CHANNEL_BIND)[0]
    assert bind.get(ChannelNumber) == ChannelNumber(0x4000)
    assert bind.get(XorPeerAddress) == XorPeerAddress(*PEER)
    assert link.send(PEER, b"abcde") == []
    assert link.sent[-1] == b"\x40\x00\x00\x05abcde"  # no padding over UDP
    assert link.to_peer[-1] == (link.client.relayed_address, PEER, b"abcde")
    assert link.from_peer(PEER, b"reply") == [DataReceived(PEER, b"reply")]
    assert link.received[-1][:2] == b"\x40\x00"
    assert link.bind_channel(PEER2) == [ChannelBound(PEER2, 0x4001)]
    assert link.bind_channel(PEER) == [ChannelBound(PEER, 0x4000)]  # already bound: no request
    assert len(link.requests(Method.CHANNEL_BIND)) == 2


def test_channel_flushes_the_queue_of_a_pending_permission() -> None:
    link = allocated_link()
    link.hold = True
    link.send(PEER, b"queued")
    link.bind_channel(PEER)
    link.held.reverse()  # the ChannelBind is answered first
    events = link.release()
    assert events == [ChannelBound(PEER, 0x4000), PermissionCreated(PEER[0])]
    assert link.sent[-1] == b"\x40\x00\x00\x06queued"  # flushed through the new channel
    assert link.to_peer == [(link.client.relayed_address, PEER, b"queued")]


def test_channel_refreshed_while_used_and_lapses_when_idle() -> None:
    link = allocated_link(server=make_server(nonce_lifetime=1e6))  # no 438 retries to count
    link.bind_channel(PEER)
    for _ in range(12):  # 1200 s, a datagram every 100 s
        link.step(100)
        link.send(PEER, b"x")
    binds = link.requests(Method.CHANNEL_BIND)
    assert len(binds) == 3  # 0, 540, 1080
    alloc = link.server.turn.allocations[link.five_tuple]
    assert alloc.peer_channels == {address_key(PEER): 0x4000}
    link.step(1100)  # rebound at 1620 (used since 1080), not at 2160: lapses at 2220
    assert len(link.requests(Method.CHANNEL_BIND)) == 4
    assert link.client.channels == {}
    assert alloc.peer_channels == {}
    # Inside the 5-minute cooldown the same peer gets its old number back.
    assert link.bind_channel(PEER) == [ChannelBound(PEER, 0x4000)]


def test_unknown_channel_and_garbage_are_counted() -> None:
    link = allocated_link()
    assert link.to_client_bytes(b"\x40\x07\x00\x01x") == []
    assert link.to_client_bytes(b"\x00\x01\x00\x04garbage!") == []
    assert link.client.stats.ignored == 1
    assert link.client.stats.malformed == 1


def test_channel_bind_refused() -> None:
    """A peer the policy denies: 403 for ChannelBind too; the number is not handed out again
    to another peer during the cooldown."""
    server = make_server(deny=["93.184.216.0/24"])
    link = allocated_link(server=server)
    assert link.bind_channel(PEER) == [ChannelBindFailed(PEER, "CHANNEL_BIND: 403 Forbidden", 403)]
    assert link.bind_channel(PEER2) == [ChannelBound(PEER2, 0x4001)]


def test_peer_addresses_are_normalized() -> None:
    server = make_server(relay_ips=(RELAY_V4, RELAY_V6))
    link = new_link(server, family=FAMILY_IPV6)
    link.allocate()
    shouty = ("2606:4700:4700:0:0:0:0:1111", PEER6[1])
    assert normalize_peer(shouty) == PEER6
    assert link.bind_channel(shouty) == [ChannelBound(PEER6, 0x4000)]
    link.send(shouty, b"x")
    assert link.sent[-1][:2] == b"\x40\x00"
    with pytest.raises(ValueError, match="IP address"):
        link.client.send(("example.org", 1), b"x", link.now)


# --- TCP/TLS framing ------------------------------------------------------------------------


@pytest.mark.parametrize("transport", [Transport.TCP, Transport.TLS])
def test_stream_framing_pads_channel_data(transport: Transport) -> None:
    """RFC 8656 section 12.5: ChannelData is padded to 4 bytes over streams, both ways; the
    client frames a stream that arrives one byte at a time."""
    link = allocated_link(transport=transport)
    link.bind_channel(PEER)
    link.send(PEER, b"abcde")
    assert link.sent[-1] == b"\x40\x00\x00\x05abcde\x00\x00\x00"
    assert link.to_peer[-1][2] == b"abcde"
    assert link.from_peer(PEER, b"reply", split=True) == [DataReceived(PEER, b"reply")]
    assert link.received[-1] == b"\x00"  # the last byte of the padding came last
    link.create_permission(PEER2[0])
    assert link.from_peer(PEER2, b"indication", split=True) == [DataReceived(PEER2, b"indication")]


def test_broken_stream_fails_the_client() -> None:
    link = allocated_link(transport=Transport.TCP)
    events = link.to_client_bytes(b"\xff\xff\xff\xff")
    assert len(events) == 1 and isinstance(events[0], Failed)
    assert events[0].reason.startswith("TURN stream broken")


def test_connection_lost() -> None:
    link = allocated_link(transport=Transport.TCP)
    events = link.deliver(link.client.connection_lost(link.now))
    assert events == [Failed("connection to the TURN server closed", None)]
    assert link.deliver(link.client.connection_lost(link.now)) == []
    closing = allocated_link(transport=Transport.TLS)
    closing.hold = True
    closing.close()
    assert closing.deliver(closing.client.connection_lost(closing.now)) == [Closed()]


# --- API misuse -----------------------------------------------------------------------------


def test_api_misuse_raises() -> None:
    client = TurnClientCore("alice", "pw")
    with pytest.raises(TurnUsageError):
        client.send(PEER, b"x", 0.0)
    with pytest.raises(TurnUsageError):
        client.create_permission([PEER[0]], 0.0)
    with pytest.raises(TurnUsageError):
        client.bind_channel(PEER, 0.0)
    client.allocate(0.0)
    with pytest.raises(TurnUsageError):
        client.allocate(0.0)
    with pytest.raises(ValueError):
        TurnClientCore("alice", "pw", lifetime=0)
    with pytest.raises(ValueError):
        TurnClientCore("alice", "pw", family=7)
    with pytest.raises(ValueError):
        TurnClientCore("a" * 600, "pw")
    with pytest.raises(ValueError):
        TurnClientCore("alice\x00", "pw")


def test_oversized_data_is_refused() -> None:
    link = allocated_link()
    link.create_permission(PEER[0])
    with pytest.raises(ValueError, match="Send indication"):
        link.client.send(PEER, bytes(65520), link.now)
    link.client.send(PEER, bytes(65516), link.now)  # the largest that fits (IPv4 peer)
    link.bind_channel(PEER2)
    with pytest.raises(ValueError, match="ChannelData"):
        link.client.send(PEER2, bytes(65536), link.now)


def test_responses_after_close_are_ignored() -> None:
    link = allocated_link()
    link.hold = True
    link.create_permission(PEER[0])
    link.close()
    link.release()
    assert link.client.state is State.CLOSED
    assert link.events[-1] == Closed()
    assert link.client.stats.ignored == 1  # the CreatePermission's late answer


def test_mapped_and_relayed_attributes_used() -> None:
    """The Allocated event reports XOR-RELAYED-ADDRESS and XOR-MAPPED-ADDRESS as sent."""
    link = new_link()
    allocated = link.allocate()
    success = decode(link.received[-1])
    relayed_attr = success.get(XorRelayedAddress)
    mapped_attr = success.get(XorMappedAddress)
    assert relayed_attr is not None and mapped_attr is not None
    assert (allocated.relayed, allocated.mapped) == (relayed_attr.address, mapped_attr.address)
    assert success.get(Data) is None


def test_permission_refresh_answered_after_expiry() -> None:
    """A permission whose refresh is unanswered when it expires stops carrying data (which
    waits in the queue) until the refresh succeeds; then the queue is flushed."""
    link = allocated_link(server=make_server(nonce_lifetime=1e6))
    link.create_permission(PEER[0])
    link.hold = True
    link.step(240)  # the refresh goes out and is held (retransmitted while held)
    link.step(61)
    assert PEER[0] not in link.client.permissions
    assert link.send(PEER, b"waits") == []
    assert link.client.stats.send_indications_sent == 0
    assert PermissionCreated(PEER[0]) in link.release()
    assert link.to_peer == [(link.client.relayed_address, PEER, b"waits")]
    assert link.client.permissions == {PEER[0]}


def test_allocate_success_without_relayed_address_fails() -> None:
    client = TurnClientCore("alice", "pw")
    request = decode(_only_transmit(client.allocate(0.0)))
    response = Message(Method.ALLOCATE, MessageClass.SUCCESS, request.transaction_id)
    response.attributes.append(Lifetime(600))
    events = client.receive(response.encode(), 0.0)
    assert events == [Failed("Allocate success without XOR-RELAYED-ADDRESS", None)]


def test_md5_chosen_when_only_md5_is_offered() -> None:
    """RFC 8489: PASSWORD-ALGORITHMS offering only MD5: the client names MD5 and signs with
    MESSAGE-INTEGRITY-SHA256 under the MD5 key, as a negotiated RFC 8489 exchange."""
    client = TurnClientCore("alice", "pw")
    request = _only_transmit(client.allocate(0.0))
    offered = PasswordAlgorithms(((PASSWORD_ALGORITHM_MD5, b""),))
    challenge = _challenge(request, 401, offered, nonce="obMatJos2gAAAx")
    signed = decode(_only_transmit(client.receive(challenge, 0.0)))
    assert signed.get(PasswordAlgorithm) == PasswordAlgorithm(PASSWORD_ALGORITHM_MD5)
    assert signed.get(PasswordAlgorithms) == offered
    assert signed.get(MessageIntegritySha256) is not None
    assert client.key == long_term_key("alice", "r", "pw")


def test_stray_messages_are_ignored() -> None:
    """Requests, unknown indications, Data indications without a peer, and responses to
    nothing are counted and dropped."""
    link = allocated_link()
    stray = [
        Message(Method.BINDING, MessageClass.REQUEST).encode(),
        Message(Method.BINDING, MessageClass.INDICATION).encode(),
        Message(Method.DATA, MessageClass.INDICATION, attributes=[Data(b"x")]).encode(),
        Message(Method.REFRESH, MessageClass.SUCCESS).encode(),
        Message(Method.DATA, MessageClass.INDICATION, attributes=[XorPeerAddress(*PEER)]).encode(),
    ]
    for data in stray:
        assert link.to_client_bytes(data) == []
    assert link.client.stats.ignored == len(stray)
    assert link.client.channel_number(PEER) is None


def test_broken_stream_while_closing_just_closes() -> None:
    link = allocated_link(transport=Transport.TCP)
    link.hold = True
    link.close()
    assert link.to_client_bytes(b"\xff\xff\xff\xff") == [Closed()]
    assert link.client.state is State.CLOSED
