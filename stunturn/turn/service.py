"""The TURN server's request handlers and its single timer (RFC 8656, RFC 6156).

Sans-IO: handlers take a decoded message, the client's 5-tuple and ``now``, and return the
response (or raise :class:`StunError`); relay sockets are obtained through the
:class:`RelayBinder` the I/O layer provides. Lifetimes live in one heap; :meth:`expire` is called
when :meth:`next_deadline` passes, and removes whatever lapsed, so the hot-path tables only hold
what is valid now.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import logging
import math
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..server.actions import RelayTo, SendTo, Transport
from ..server.errors import StunError
from ..server.keys import IPV6_KEY_BIT, address_key, ip_key
from ..stun import (
    FAMILY_IPV4,
    FAMILY_IPV6,
    REASONS,
    TRANSPORT_TCP,
    TRANSPORT_UDP,
    Address,
    Message,
    MessageClass,
    Method,
)
from ..stun.attributes import (
    AdditionalAddressFamily,
    AddressErrorCode,
    AlternateServer,
    ChannelNumber,
    ConnectionId,
    Data,
    DontFragment,
    ErrorCode,
    EvenPort,
    Fingerprint,
    Icmp,
    Lifetime,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    UnknownAttributes,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
)
from .allocation import (
    Allocation,
    Channel,
    ChannelRoute,
    FiveTuple,
    RelayBinder,
    RelayHandle,
)
from .auth import AuthResult, LongTermAuth
from .policy import PeerPolicy
from .ports import PortPool
from .quota import QuotaLimits, Quotas
from .tcp import BIND_TIMEOUT, PeerConnection, PeerState, TcpRelayBinder

log = logging.getLogger("stunturn.turn")

CHANNEL_MIN, CHANNEL_MAX = 0x4000, 0x7FFF
"""RFC 8656 section 12 gives clients 0x4000-0x4FFF; RFC 5766 gave 0x4000-0x7FFF, and RFC 5766
clients (coturn's turnutils_uclient among them) still pick numbers up to 0x7FFF. We accept the
older range: the server never multiplexes DTLS-SRTP, so 0x5000-0x7FFF is unambiguous here."""
PEERS_LOGGED = 10
"""The ``peers`` field of allocation_ended lists at most this many peer IPs (docs/logging.md)."""
PEERS_COUNTED = 1000
"""``peer_count`` counts distinct peer IPs up to this many (bounded memory per allocation)."""
CHANNEL_COOLDOWN = 300.0
"""RFC 8656 section 12.2: after a binding expires, neither its number nor its peer may be bound
to anything else for 5 minutes (so late ChannelData cannot reach the wrong peer)."""


@dataclass(frozen=True, slots=True)
class TurnConfig:
    """Lifetimes (seconds), relay addresses and limits."""

    relay_ips: tuple[str, ...]
    """At most one IPv4 and one IPv6 address to relay from."""
    relay_ports: tuple[int, int] = (49152, 65535)
    default_lifetime: int = 600
    max_lifetime: int = 3600
    permission_lifetime: int = 300
    channel_lifetime: int = 600
    limits: QuotaLimits = field(default_factory=QuotaLimits)
    alternate_servers: tuple[Address, ...] = ()
    """While draining, Allocate gets 300 Try Alternate naming the one of the client's family."""

    def relay_ip(self, family: int) -> str | None:
        v6 = family == FAMILY_IPV6
        for ip in self.relay_ips:
            if (":" in ip) == v6:
                return ip
        return None


def _family_of(host: str) -> int:
    return FAMILY_IPV6 if ":" in host else FAMILY_IPV4


class TurnService:
    """Allocations of one worker, their handlers and their timer."""

    def __init__(
        self,
        config: TurnConfig,
        auth: LongTermAuth,
        policy: PeerPolicy,
        binder: RelayBinder,
        ports: PortPool,
        quotas: Quotas,
    ) -> None:
        self.config = config
        self.auth = auth
        self.policy = policy
        self.binder = binder
        self.ports = ports
        self.quotas = quotas
        self.allocations: dict[FiveTuple, Allocation] = {}
        self.routes: dict[tuple[Transport, Address], dict[int, ChannelRoute]] = {}
        """(transport, server address) -> {address_key(client) << 16 | channel: route}."""
        self.clock_offset = 0.0
        """Unix time minus ``now``: REST credentials carry Unix expiry times."""
        self._timers: list[tuple[float, int, str, Allocation, int]] = []
        self._seq = itertools.count()
        self._ids = itertools.count(1)
        self.on_deleted: Callable[[Allocation], None] | None = None
        """Called once for each allocation that ends, however it ends (the I/O layer keeps
        totals of what ended allocations relayed there, never per packet)."""
        self.peer_conns: dict[int, PeerConnection] = {}
        """RFC 6062: CONNECTION-ID -> peer data connection, for ConnectionBind."""
        self.tcp_binder: TcpRelayBinder | None = (
            binder if hasattr(binder, "bind_tcp") else None  # type: ignore[assignment]
        )
        """The binder, when it can do TCP relays (else TCP allocations get 442)."""
        self.draining = False
        """Set by :meth:`start_drain`: Allocate is refused, everything else keeps working."""
        self.drain_deadline: float | None = None
        self.drained = False
        """Draining, and the last allocation has ended."""
        self.on_drained: Callable[[], None] | None = None
        """Called once when :attr:`drained` becomes true (the I/O layer then exits)."""
        self._drain_started = 0.0
        self._now = 0.0
        """The latest ``now`` seen (handlers, timer), which dates what :meth:`delete` logs."""
        self._peers: dict[int, dict[int, None]] = {}
        """Allocation id -> the ip_key of every peer permitted so far, in order (bounded)."""

    # --- dispatch -------------------------------------------------------------------------

    def handle_request(
        self, msg: Message, five_tuple: FiveTuple, now: float
    ) -> tuple[Message | bytes | None, AuthResult]:
        """Authenticate and handle Allocate, Refresh, CreatePermission, ChannelBind or Connect.

        Returns the success response (or, for a retransmitted Allocate, the bytes sent the first
        time; None for a Connect, answered when the connection attempt ends) and the
        authentication result to sign it with. Raises :class:`StunError`; after successful
        authentication the error carries the key so the response is signed.
        """
        self._now = now
        auth = self.auth.authenticate(msg, five_tuple[1], now)
        try:
            # RFC 8489 section 6.3: unknown comprehension-required attributes are checked after
            # authentication, so only an authenticated requester learns about them (420).
            unknown = msg.unknown_comprehension_required()
            if unknown:
                raise StunError(420, (UnknownAttributes(tuple(unknown)),))
            if msg.method == Method.ALLOCATE:
                return self._allocate(msg, five_tuple, auth, now), auth
            alloc = self.allocations.get(five_tuple)
            if alloc is None:
                raise StunError(437)
            if auth.username != alloc.username:
                raise StunError(441)
            if msg.method == Method.REFRESH:
                return self._refresh(msg, alloc, auth, now), auth
            if msg.method == Method.CREATE_PERMISSION:
                return self._create_permission(msg, alloc, now), auth
            if msg.method == Method.CONNECT:
                self._connect(msg, alloc, now)
                peer = msg.get(XorPeerAddress)
                if peer is not None:
                    self._note_peer(alloc, ip_key(peer.host))
                return None, auth
            return self._channel_bind(msg, alloc, now), auth
        except StunError as exc:
            exc.key, exc.sha256 = auth.key, auth.sha256
            raise

    def handle_send(self, msg: Message, five_tuple: FiveTuple, now: float) -> list[RelayTo]:
        """A Send indication: relay its DATA to its peer, or drop it silently (section 10.2)."""
        alloc = self.allocations.get(five_tuple)
        peer_attr = msg.get(XorPeerAddress)
        data = msg.get(Data)
        if alloc is None or peer_attr is None or data is None or alloc.tcp:
            return []
        relay = alloc.relay_for(peer_attr.host)
        if relay is None or not alloc.permitted(peer_attr.host):
            return []
        if not self.policy.allowed(peer_attr.host, peer_attr.port):
            return []
        if alloc.max_bps and not alloc.within_rate(len(data.value), False, now):
            return []
        alloc.bytes_to_peer += len(data.value)
        alloc.packets_to_peer += 1
        return [RelayTo(relay, data.value, peer_attr.address)]

    def route_table(self, transport: Transport, local: Address) -> dict[int, ChannelRoute]:
        """The channel routes of clients talking to ``local`` over ``transport``.

        The I/O layer keeps a reference and looks ChannelData up in it directly.
        """
        return self.routes.setdefault((transport, local), {})

    # --- Allocate (RFC 8656 section 7.2) --------------------------------------------------

    def _allocate(
        self, msg: Message, five_tuple: FiveTuple, auth: AuthResult, now: float
    ) -> Message | bytes:
        existing = self.allocations.get(five_tuple)
        if existing is not None:
            # 7.2: a retransmission of the request that created it gets the same answer.
            if existing.transaction_id == msg.transaction_id:
                return existing.response
            raise StunError(437)
        if self.draining:
            raise self._drain_refusal(five_tuple[1][0])
        transport = msg.get(RequestedTransport)
        if transport is None:
            raise StunError(400)
        token = msg.get(ReservationToken)
        even = msg.get(EvenPort)
        requested = msg.get(RequestedAddressFamily)
        additional = msg.get(AdditionalAddressFamily)
        dont_fragment = msg.get(DontFragment) is not None
        tcp = transport.value == TRANSPORT_TCP
        if tcp:
            # RFC 6062 section 5.1.
            if self.tcp_binder is None:
                raise StunError(442)
            if five_tuple[0] is Transport.UDP:
                raise StunError(400, detail="TCP allocations need a TCP or TLS connection")
            if token or even or dont_fragment or additional:
                raise StunError(400, detail="attribute not allowed in a TCP allocation")
        elif transport.value != TRANSPORT_UDP:
            raise StunError(442)
        if token is not None and (even or requested or additional):
            raise StunError(400)
        if requested is not None and additional is not None:
            raise StunError(400)
        if additional is not None and additional.value != FAMILY_IPV6:
            raise StunError(400)
        if even is not None and even.reserve and additional is not None:
            raise StunError(400)
        family = requested.value if requested is not None else FAMILY_IPV4
        if family not in (FAMILY_IPV4, FAMILY_IPV6):
            raise StunError(440)
        if token is None and self.config.relay_ip(family) is None:
            raise StunError(440)
        if self._credential_expired(auth, now):
            raise self.auth.challenge(five_tuple[1], now, detail="REST credential expired")
        client_ip = five_tuple[1][0]
        if not self.quotas.acquire(auth.username, client_ip):
            raise StunError(486)
        try:
            relays, reservation, address_error = self._bind_relays(
                five_tuple, family, additional is not None, even, token, dont_fragment, now, tcp
            )
        except StunError:
            self.quotas.release(auth.username, client_ip)
            raise
        lifetime = self._lifetime(msg)
        alloc = Allocation(
            id=next(self._ids),
            five_tuple=five_tuple,
            username=auth.username,
            key=auth.key,
            sha256=auth.sha256,
            relays=relays,
            expires=now + lifetime,
            created=now,
            transaction_id=msg.transaction_id,
            credential_expires=auth.expires,
            client_ip=client_ip,
            dont_fragment=dont_fragment,
            max_bps=self.config.limits.max_bps,
            tcp=tcp,
        )
        for relay in relays:
            relay.allocation = alloc
        self.allocations[five_tuple] = alloc
        self._schedule(alloc.expires, "allocation", alloc, 0)
        response = Message(Method.ALLOCATE, MessageClass.SUCCESS, msg.transaction_id)
        response.attributes += [XorRelayedAddress(*r.address) for r in relays]
        response.attributes.append(Lifetime(lifetime))
        if reservation is not None:
            response.attributes.append(ReservationToken(reservation))
        response.attributes.append(XorMappedAddress(*five_tuple[1]))
        if address_error is not None:
            response.attributes.append(address_error)
        if log.isEnabledFor(logging.INFO):
            self._log_created(alloc, five_tuple, relays, lifetime)
        return response

    def _log_created(
        self,
        alloc: Allocation,
        five_tuple: FiveTuple,
        relays: list[RelayHandle],
        lifetime: int,
    ) -> None:
        # The session fields are documented in docs/logging.md (tests/test_log_schema.py).
        log.info(
            "allocation created",
            extra={
                "event": "allocation_created",
                "session": alloc.id,
                "user": alloc.username,
                "client": _client_text(five_tuple),
                "relay": _relay_text(relays),
                "relay_transport": "tcp" if alloc.tcp else "udp",
                "lifetime": lifetime,
            },
        )

    def remember_response(self, five_tuple: FiveTuple, data: bytes) -> None:
        """Keep the encoded Allocate success so a retransmission gets the same bytes."""
        alloc = self.allocations.get(five_tuple)
        if alloc is not None and not alloc.response:
            alloc.response = data

    def _bind_relays(
        self,
        five_tuple: FiveTuple,
        family: int,
        dual: bool,
        even: EvenPort | None,
        token: ReservationToken | None,
        dont_fragment: bool,
        now: float,
        tcp: bool = False,
    ) -> tuple[list[RelayHandle], bytes | None, AddressErrorCode | None]:
        """Bind the relay socket(s); raises 508 when the first one cannot be had."""
        if token is not None:
            relay = self._redeem(token.value, five_tuple, dont_fragment, now)
            if relay is None:
                raise StunError(508)
            return [relay], None, None
        host = self.config.relay_ip(family)
        assert host is not None
        relay, reservation = self._bind_new(
            host, five_tuple, dont_fragment, even is not None, bool(even and even.reserve), now, tcp
        )
        if relay is None:
            raise StunError(508)
        relays = [relay]
        address_error = None
        if dual:
            v6_host = self.config.relay_ip(FAMILY_IPV6)
            v6_relay = None
            if v6_host is not None:
                v6_relay, _ = self._bind_new(v6_host, five_tuple, dont_fragment, False, False, now)
            if v6_relay is None:
                code = 440 if v6_host is None else 508
                address_error = AddressErrorCode(FAMILY_IPV6, code, REASONS[code])
            else:
                relays.append(v6_relay)
        return relays, reservation, address_error

    def _bind_new(
        self,
        host: str,
        five_tuple: FiveTuple,
        dont_fragment: bool,
        even: bool,
        reserve: bool,
        now: float,
        tcp: bool = False,
    ) -> tuple[RelayHandle | None, bytes | None]:
        for port in self.ports.candidates(host, even=even, pair=reserve):
            if reserve and not self.binder.available(host, port + 1):
                continue  # port+1 is taken outside our pool: the token could never be redeemed
            if tcp:
                assert self.tcp_binder is not None
                relay = self.tcp_binder.bind_tcp(host, port, five_tuple)
            else:
                relay = self.binder.bind(host, port, five_tuple, dont_fragment)
            if relay is None:
                continue  # taken by something outside this pool; try the next one
            self.ports.take(host, port)
            token = None
            if reserve:
                token = self.ports.reserve(host, port + 1, now)
                self._schedule_reservations()
            return relay, token
        return None, None

    def _redeem(
        self, token: bytes, five_tuple: FiveTuple, dont_fragment: bool, now: float
    ) -> RelayHandle | None:
        for host in self.config.relay_ips:
            port = self.ports.redeem(token, host, now)
            if port is None:
                continue
            relay = self.binder.bind(host, port, five_tuple, dont_fragment)
            if relay is not None:
                self.ports.take(host, port)
            return relay
        return None

    def _lifetime(self, msg: Message) -> int:
        """RFC 8656 section 7.2 step 8: max(default, min(requested, maximum))."""
        cfg = self.config
        requested = msg.get(Lifetime)
        if requested is None:
            return cfg.default_lifetime
        return max(cfg.default_lifetime, min(requested.seconds, cfg.max_lifetime))

    def _credential_expired(self, auth: AuthResult, now: float) -> bool:
        return auth.expires is not None and auth.expires < now + self.clock_offset

    # --- Refresh (section 7.3) ------------------------------------------------------------

    def _refresh(self, msg: Message, alloc: Allocation, auth: AuthResult, now: float) -> Message:
        requested = msg.get(RequestedAddressFamily)
        lifetime_attr = msg.get(Lifetime)
        zero = lifetime_attr is not None and lifetime_attr.seconds == 0
        if requested is not None:
            relay = next(
                (r for r in alloc.relays if _family_of(r.address[0]) == requested.value), None
            )
            if relay is None:
                raise StunError(443)
            if zero and len(alloc.relays) > 1:
                # Dual allocation: delete only the family asked for, with its peers' state.
                self._drop_family(alloc, relay, now)
                return self._lifetime_response(msg, int(alloc.expires - now))
        if zero:
            self.delete(alloc, "refreshed to 0")
            return self._lifetime_response(msg, 0)
        # Expired REST credentials may still delete (above), not extend.
        if self._credential_expired(auth, now):
            raise self.auth.challenge(alloc.client, now, detail="REST credential expired")
        lifetime = self._lifetime(msg)
        if self.drain_deadline is not None:
            # Draining: the allocation ends at the drain deadline at the latest; the granted
            # LIFETIME says so, so the client can move elsewhere in time.
            lifetime = min(lifetime, max(1, math.ceil(self.drain_deadline - now)))
        alloc.expires = now + lifetime
        self._schedule(alloc.expires, "allocation", alloc, 0)
        return self._lifetime_response(msg, lifetime)

    def _drop_family(self, alloc: Allocation, relay: RelayHandle, now: float) -> None:
        v6 = ":" in relay.address[0]
        for channel in [c for c in alloc.channels.values() if (":" in c.peer[0]) == v6]:
            self._unbind(alloc, channel, now)
        for key in [k for k in alloc.permissions if (k >= IPV6_KEY_BIT) == v6]:
            del alloc.permissions[key]
        alloc.relays.remove(relay)
        self._close_relay(relay)

    @staticmethod
    def _lifetime_response(msg: Message, lifetime: int) -> Message:
        response = Message(Method.REFRESH, MessageClass.SUCCESS, msg.transaction_id)
        response.attributes.append(Lifetime(max(0, lifetime)))
        return response

    # --- CreatePermission (section 9) -----------------------------------------------------

    def _create_permission(self, msg: Message, alloc: Allocation, now: float) -> Message:
        peers = msg.get_all(XorPeerAddress)
        if not peers:
            raise StunError(400)
        keys = []
        for peer in peers:
            if alloc.relay_for(peer.host) is None:
                raise StunError(443)
            if not self.policy.allowed(peer.host):
                raise StunError(403)
            keys.append(ip_key(peer.host))
        limit = self.config.limits.permissions
        if limit and len(alloc.permissions.keys() | set(keys)) > limit:
            raise StunError(508, detail="permission quota reached")
        # All or nothing: every peer was checked before any permission is installed.
        expires = now + self.config.permission_lifetime
        for key in keys:
            self._permit(alloc, key, expires)
        return Message(Method.CREATE_PERMISSION, MessageClass.SUCCESS, msg.transaction_id)

    def _permit(self, alloc: Allocation, key: int, expires: float) -> None:
        alloc.permissions[key] = expires
        self._schedule(expires, "permission", alloc, key)
        self._note_peer(alloc, key)

    def _note_peer(self, alloc: Allocation, key: int) -> None:
        """Remember a peer IP for the allocation_ended log (control plane only)."""
        peers = self._peers.get(alloc.id)
        if peers is None:
            peers = self._peers[alloc.id] = {}
        if len(peers) < PEERS_COUNTED:
            peers[key] = None

    # --- ChannelBind (section 11.2) -------------------------------------------------------

    def _channel_bind(self, msg: Message, alloc: Allocation, now: float) -> Message:
        if alloc.tcp:
            raise StunError(400, detail="no channels on a TCP allocation")
        number_attr = msg.get(ChannelNumber)
        peer_attr = msg.get(XorPeerAddress)
        if number_attr is None or peer_attr is None:
            raise StunError(400, detail="CHANNEL-NUMBER or XOR-PEER-ADDRESS missing")
        number = number_attr.number
        if not CHANNEL_MIN <= number <= CHANNEL_MAX:
            raise StunError(400, detail=f"channel {number:#06x} outside 0x4000-0x7FFF")
        relay = alloc.relay_for(peer_attr.host)
        if relay is None:
            raise StunError(443)
        if not self.policy.allowed(peer_attr.host, peer_attr.port):
            raise StunError(403)
        peer = peer_attr.address
        peer_key = address_key(peer)
        bound = alloc.channels.get(number)
        if bound is not None and bound.peer != peer:
            raise StunError(400, detail=f"channel {number:#06x} is bound to {bound.peer}")
        if bound is None:
            if peer_key in alloc.peer_channels:
                raise StunError(400, detail=f"{peer} already has another channel")
            for cooling_number, (cooling_peer, until) in alloc.cooldown.items():
                if until > now and (cooling_number == number) != (cooling_peer == peer_key):
                    raise StunError(400, detail="number or peer cooling down with another")
            limit = self.config.limits.channels
            if limit and len(alloc.channels) >= limit:
                raise StunError(508, detail="channel quota reached")
            limit = self.config.limits.permissions
            peer_ip = ip_key(peer_attr.host)
            if limit and peer_ip not in alloc.permissions and len(alloc.permissions) >= limit:
                raise StunError(508, detail="permission quota reached")
            bound = Channel(number, peer, 0.0)
            alloc.channels[number] = bound
            alloc.peer_channels[peer_key] = number
            alloc.cooldown.pop(number, None)
            transport, client, local = alloc.five_tuple
            route = ChannelRoute(relay, peer, ip_key(peer[0]), alloc)
            self.route_table(transport, local)[(address_key(client) << 16) | number] = route
        bound.expires = now + self.config.channel_lifetime
        self._schedule(bound.expires, "channel", alloc, number)
        # 11.2: a ChannelBind also installs or refreshes the permission for the peer's IP.
        self._permit(alloc, ip_key(peer_attr.host), now + self.config.permission_lifetime)
        return Message(Method.CHANNEL_BIND, MessageClass.SUCCESS, msg.transaction_id)

    def _unbind(self, alloc: Allocation, channel: Channel, now: float) -> None:
        peer_key = address_key(channel.peer)
        del alloc.channels[channel.number]
        alloc.peer_channels.pop(peer_key, None)
        transport, client, local = alloc.five_tuple
        routes = self.routes.get((transport, local))
        if routes is not None:
            routes.pop((address_key(client) << 16) | channel.number, None)
        until = now + CHANNEL_COOLDOWN
        alloc.cooldown[channel.number] = (peer_key, until)
        self._schedule(until, "cooldown", alloc, channel.number)

    # --- RFC 6062 TCP allocations ------------------------------------------------------------

    def _connect(self, msg: Message, alloc: Allocation, now: float) -> None:
        """Connect (RFC 6062 section 5.2): start connecting to the peer; answered later."""
        if not alloc.tcp:
            raise StunError(400, detail="Connect needs a TCP allocation")
        peer_attr = msg.get(XorPeerAddress)
        if peer_attr is None:
            raise StunError(400, detail="XOR-PEER-ADDRESS missing")
        relay = alloc.relay_for(peer_attr.host)
        if relay is None:
            raise StunError(443)
        if not self.policy.allowed(peer_attr.host, peer_attr.port):
            raise StunError(403)
        peer = peer_attr.address
        if peer in alloc.peer_conns:
            raise StunError(446)
        limit = self.config.limits.peer_connections
        if limit and len(alloc.peer_conns) >= limit:
            raise StunError(508, detail="peer connection quota reached")
        conn = self._new_peer(alloc, peer, PeerState.CONNECTING, inbound=False)
        conn.transaction_id = msg.transaction_id
        conn.fingerprint = msg.get(Fingerprint) is not None
        assert self.tcp_binder is not None
        self.tcp_binder.connect_tcp(conn, relay)

    def _new_peer(
        self, alloc: Allocation, peer: Address, state: PeerState, inbound: bool
    ) -> PeerConnection:
        while True:
            conn_id = secrets.randbits(32)
            if conn_id and conn_id not in self.peer_conns:
                break
        conn = PeerConnection(conn_id, alloc, peer, state, inbound)
        self.peer_conns[conn_id] = conn
        alloc.peer_conns[peer] = conn
        return conn

    def _pending(self, conn: PeerConnection, now: float) -> None:
        conn.state = PeerState.PENDING
        conn.deadline = now + BIND_TIMEOUT
        self._schedule(conn.deadline, "tcp", conn.allocation, conn.id)

    def _live(self, conn: PeerConnection) -> bool:
        alloc = conn.allocation
        return (
            self.peer_conns.get(conn.id) is conn and self.allocations.get(alloc.five_tuple) is alloc
        )

    def tcp_connected(self, conn: PeerConnection, now: float) -> list[SendTo]:
        """The I/O layer reached the peer of a Connect: answer it with the CONNECTION-ID."""
        if not self._live(conn) or conn.state is not PeerState.CONNECTING:
            return []
        self._pending(conn, now)
        response = Message(Method.CONNECT, MessageClass.SUCCESS, conn.transaction_id)
        response.attributes.append(ConnectionId(conn.id))
        return [self._to_client(conn.allocation, response, conn.fingerprint)]

    def tcp_connect_failed(self, conn: PeerConnection, now: float) -> list[SendTo]:
        """The connection attempt of a Connect failed or timed out: 447."""
        if not self._live(conn) or conn.state is not PeerState.CONNECTING:
            return []
        self._forget_peer(conn)
        response = Message(Method.CONNECT, MessageClass.ERROR, conn.transaction_id)
        response.attributes.append(ErrorCode(447, REASONS[447]))
        return [self._to_client(conn.allocation, response, conn.fingerprint)]

    def tcp_incoming(
        self, relay: RelayHandle, peer: Address, now: float
    ) -> tuple[PeerConnection | None, list[SendTo]]:
        """A peer connected to a TCP relayed address (RFC 6062 section 5.3).

        Accepted (and the client told with a ConnectionAttempt indication) only when the
        client has a permission for the peer's IP, the peer policy allows it, no connection
        with that peer exists and the allocation's quota has room; otherwise (None, []) and
        the I/O layer closes the connection at once.
        """
        alloc = relay.allocation
        if alloc is None or not alloc.tcp or self.allocations.get(alloc.five_tuple) is not alloc:
            return None, []
        limit = self.config.limits.peer_connections
        if (
            not alloc.permitted(peer[0])
            or not self.policy.allowed(peer[0], peer[1])
            or peer in alloc.peer_conns
            or (limit and len(alloc.peer_conns) >= limit)
        ):
            return None, []
        conn = self._new_peer(alloc, peer, PeerState.CONNECTING, inbound=True)
        self._pending(conn, now)
        indication = Message(Method.CONNECTION_ATTEMPT, MessageClass.INDICATION)
        indication.attributes += [XorPeerAddress(*peer), ConnectionId(conn.id)]
        transport, client, local = alloc.five_tuple
        return conn, [SendTo(indication.encode(), local, client, transport)]

    def connection_bind(
        self, msg: Message, five_tuple: FiveTuple, now: float
    ) -> tuple[Message, AuthResult, PeerConnection]:
        """ConnectionBind (RFC 6062 section 5.4) on a new client connection.

        On success the I/O layer sends the response, then splices this client connection to
        the peer connection (no STUN on it any more). Raises :class:`StunError`.
        """
        auth = self.auth.authenticate(msg, five_tuple[1], now)
        try:
            if five_tuple[0] is Transport.UDP or five_tuple in self.allocations:
                raise StunError(400, detail="ConnectionBind needs a new TCP/TLS connection")
            attr = msg.get(ConnectionId)
            if attr is None:
                raise StunError(400, detail="CONNECTION-ID missing")
            conn = self.peer_conns.get(attr.value)
            if conn is None or conn.state is not PeerState.PENDING or not self._live(conn):
                raise StunError(400, detail="unknown CONNECTION-ID")
            if auth.username != conn.allocation.username:
                raise StunError(441)
        except StunError as exc:
            exc.key, exc.sha256 = auth.key, auth.sha256
            raise
        conn.state = PeerState.BOUND
        conn.client = five_tuple
        return Message(Method.CONNECTION_BIND, MessageClass.SUCCESS, msg.transaction_id), auth, conn

    def tcp_closed(self, conn: PeerConnection) -> None:
        """The I/O layer saw the peer or the client data connection close."""
        if self.peer_conns.get(conn.id) is conn:
            self._forget_peer(conn)

    def _forget_peer(self, conn: PeerConnection) -> None:
        self.peer_conns.pop(conn.id, None)
        alloc = conn.allocation
        if alloc.peer_conns.get(conn.peer) is conn:
            del alloc.peer_conns[conn.peer]

    def _drop_peer(self, conn: PeerConnection, reason: str) -> None:
        self._forget_peer(conn)
        log.debug("peer connection %d to %s closed: %s", conn.id, conn.peer, reason)
        if self.tcp_binder is not None:
            self.tcp_binder.close_tcp(conn)

    @staticmethod
    def _to_client(alloc: Allocation, response: Message, fingerprint: bool) -> SendTo:
        data = response.encode(
            alloc.key, sha1=not alloc.sha256, sha256=alloc.sha256, fingerprint=fingerprint
        )
        transport, client, local = alloc.five_tuple
        return SendTo(data, local, client, transport)

    # --- ICMP (section 11.4) -------------------------------------------------------------

    def icmp_indication(
        self, relay: RelayHandle, peer: Address, icmp_type: int, icmp_code: int, info: int
    ) -> bytes | None:
        """A Data indication reporting an ICMP error from ``peer``, if the client has a
        permission for it (else None: nothing is said about peers the client cannot reach)."""
        alloc = relay.allocation
        if alloc is None or not alloc.permitted(peer[0]):
            return None
        msg = Message(Method.DATA, MessageClass.INDICATION)
        msg.attributes += [XorPeerAddress(*peer), Icmp(icmp_type, icmp_code, info)]
        return msg.encode()

    # --- lifetimes ---------------------------------------------------------------------------

    def _schedule(self, when: float, kind: str, alloc: Allocation, key: int) -> None:
        heapq.heappush(self._timers, (when, next(self._seq), kind, alloc, key))

    def _schedule_reservations(self) -> None:
        when = self.ports.next_expiry()
        if when is not None:
            heapq.heappush(self._timers, (when, next(self._seq), "reservation", _NO_ALLOC, 0))

    def next_deadline(self) -> float | None:
        """When :meth:`expire` next has work (None: nothing scheduled)."""
        return self._timers[0][0] if self._timers else None

    def expire(self, now: float) -> None:
        """Remove everything whose lifetime has passed. Stale heap entries are skipped."""
        self._now = now
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, kind, alloc, key = heapq.heappop(timers)
            if kind == "reservation":
                for host, port in self.ports.expire(now):
                    log.debug("reservation of %s:%d lapsed", host, port)
                self._schedule_reservations()
                continue
            if kind == "drain":
                for live in list(self.allocations.values()):
                    self.delete(live, "drain timeout")
                continue
            if self.allocations.get(alloc.five_tuple) is not alloc:
                continue  # deleted already
            if kind == "tcp":
                conn = self.peer_conns.get(key)
                if (
                    conn is not None
                    and conn.allocation is alloc
                    and conn.deadline <= now
                    and conn.state is PeerState.PENDING
                ):
                    self._drop_peer(conn, "not bound in time")
                continue
            if kind == "cooldown":
                cooling = alloc.cooldown.get(key)
                if cooling is not None and cooling[1] <= now:
                    del alloc.cooldown[key]
                continue
            if kind == "allocation":
                if alloc.expires <= now:
                    self.delete(alloc, "expired")
            elif kind == "permission":
                if alloc.permissions.get(key, now + 1) <= now:
                    del alloc.permissions[key]
            elif kind == "channel":
                channel = alloc.channels.get(key)
                if channel is not None and channel.expires <= now:
                    self._unbind(alloc, channel, now)

    def delete(self, alloc: Allocation, reason: str, now: float | None = None) -> None:
        """End an allocation: close its relays, free its quota, drop its routes.

        The log's ``duration`` ends at ``now`` when the caller gives it (the I/O layer does
        when a client's TCP or TLS connection closes), else at the latest ``now`` the service
        was given.
        """
        if self.allocations.get(alloc.five_tuple) is not alloc:
            return
        if self.on_deleted is not None:
            self.on_deleted(alloc)
        if now is not None and now > self._now:
            self._now = now
        now = self._now
        del self.allocations[alloc.five_tuple]
        peers = self._peers.pop(alloc.id, {})
        transport, client, local = alloc.five_tuple
        routes = self.routes.get((transport, local))
        if routes is not None:
            base = address_key(client) << 16
            for number in alloc.channels:
                routes.pop(base | number, None)
        alloc.channels.clear()
        alloc.peer_channels.clear()
        alloc.permissions.clear()
        for conn in list(alloc.peer_conns.values()):
            self._drop_peer(conn, "allocation ended")
        for relay in alloc.relays:
            self._close_relay(relay)
        self.quotas.release(alloc.username, alloc.client_ip)
        alloc.cooldown.clear()
        if log.isEnabledFor(logging.INFO):
            self._log_ended(alloc, reason, now, peers)
        if self.draining:
            self._check_drained(now)

    @staticmethod
    def _log_ended(alloc: Allocation, reason: str, now: float, peers: dict[int, None]) -> None:
        # The session fields are documented in docs/logging.md (tests/test_log_schema.py).
        log.info(
            "allocation ended",
            extra={
                "event": "allocation_ended",
                "session": alloc.id,
                "user": alloc.username,
                "client": _client_text(alloc.five_tuple),
                "relay": _relay_text(alloc.relays),
                "relay_transport": "tcp" if alloc.tcp else "udp",
                "reason": reason,
                "duration": round(max(0.0, now - alloc.created), 3),
                "peers": [_ip_text(key) for key in itertools.islice(peers, PEERS_LOGGED)],
                "peer_count": len(peers),
                "bytes_to_peer": alloc.bytes_to_peer,
                "bytes_to_client": alloc.bytes_to_client,
                "packets_to_peer": alloc.packets_to_peer,
                "packets_to_client": alloc.packets_to_client,
            },
        )

    # --- drain ---------------------------------------------------------------------------------

    def start_drain(self, now: float, deadline: float | None = None) -> None:
        """Stop taking new allocations; live ones keep working until they end or ``deadline``.

        Allocate gets 300 Try Alternate (with the ALTERNATE-SERVER of the client's family, when
        configured) or else 508 Insufficient Capacity; Refresh is granted up to the deadline at
        most; at the deadline what is left is deleted ("drain timeout"). :attr:`on_drained` is
        called once no allocation is left. A second call changes nothing.
        """
        if self.draining:
            return
        self._now = now
        self.draining = True
        self.drain_deadline = deadline
        self._drain_started = now
        if deadline is not None:
            self._schedule(deadline, "drain", _NO_ALLOC, 0)
        log.info(
            "drain started",
            extra={
                "event": "drain_started",
                "allocations": len(self.allocations),
                "timeout": None if deadline is None else round(deadline - now, 3),
            },
        )
        self._check_drained(now)

    def _check_drained(self, now: float) -> None:
        if self.drained or self.allocations:
            return
        self.drained = True
        log.info(
            "drain finished",
            extra={"event": "drain_finished", "duration": round(now - self._drain_started, 3)},
        )
        if self.on_drained is not None:
            self.on_drained()

    def _drain_refusal(self, client_host: str) -> StunError:
        """RFC 8656 section 7.2 lets a server redirect an Allocate (RFC 8489 section 10, 300
        with ALTERNATE-SERVER of the request's address family, section 14.15), or refuse it
        for lack of capacity (508). The request was authenticated, so the error is signed."""
        v6 = ":" in client_host
        alternate = next((a for a in self.config.alternate_servers if (":" in a[0]) == v6), None)
        if alternate is None:
            return StunError(508, detail="draining")
        return StunError(300, (AlternateServer(*alternate),), detail="draining")

    def _close_relay(self, relay: RelayHandle) -> None:
        relay.allocation = None
        host, port = relay.address
        self.ports.release(host, port)
        self.binder.close(relay)

    def close_all(self, reason: str = "server stopping") -> None:
        for alloc in list(self.allocations.values()):
            self.delete(alloc, reason)

    def __iter__(self) -> Iterator[Allocation]:
        return iter(self.allocations.values())


def _client_text(five_tuple: FiveTuple) -> str:
    transport, (host, port), _ = five_tuple
    return f"{transport.value}:{host}:{port}"


def _relay_text(relays: list[RelayHandle]) -> str:
    return ",".join(f"{h}:{p}" for h, p in (r.address for r in relays))


def _ip_text(key: int) -> str:
    if key >= IPV6_KEY_BIT:
        return ipaddress.IPv6Address(key - IPV6_KEY_BIT).compressed
    return ipaddress.IPv4Address(key).compressed


class _NoAllocation:
    """Placeholder in timer entries that belong to no allocation."""

    id = -1
    five_tuple: FiveTuple = (Transport.UDP, ("", 0), ("", 0))


_NO_ALLOC: Allocation = _NoAllocation()  # type: ignore[assignment]


__all__ = [
    "CHANNEL_MAX",
    "CHANNEL_MIN",
    "RelayTo",
    "TurnConfig",
    "TurnService",
]
