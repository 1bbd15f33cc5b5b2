"""An in-memory ICE world: two :class:`IceAgent`\\ s behind simulated NATs, a STUN server and a
TURN server (our own :class:`ServerCore`, with a :class:`TurnService` for TURN), on a simulated
network with a one-way delay and random loss. Time only moves when the harness steps it; nothing
opens a socket or sleeps.

What happens for real, end to end:

* server-reflexive candidates come from a Binding request sent from the host socket through the
  NAT to the STUN server core (the answer's XOR-MAPPED-ADDRESS);
* relayed candidates come from an Allocate (long-term credentials: unsigned request, 401, signed
  retry) to the TURN core; relay endpoints are public addresses on the simulated network, so
  peers reach them through their NATs like any other address. The harness speaks TURN for the
  agent: it creates a permission (or binds a channel) the first time the agent sends to a peer
  from the relayed base, queues what the agent sends until the server confirmed, then wraps it
  in Send indications (or ChannelData); Data indications and ChannelData from the server are
  unwrapped and handed to the agent as arriving on the relayed base from the peer;
* candidates are signalled as SDP lines (``to_sdp`` / ``from_sdp``), all at once after
  gathering or trickled with a signalling delay.

The network is this module's own small router rather than :class:`stunturn.nat.sim.SimNetwork`
(whose NAT model, :class:`SimNat`, it uses unchanged): SimNetwork delivers datagrams addressed
to a LAN address from anywhere on the "internet" and translates traffic between two hosts on
the same LAN, so host candidates behind different NATs would reach each other and two hosts
behind one NAT would not see each other's host addresses (see ``test_ice_matrix.py``). Here a
LAN address is reachable only from its own LAN, and LAN-local traffic bypasses the NAT.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from stunturn.auth import Credentials, NonceManager, StaticUsers
from stunturn.ice import (
    Candidate,
    CandidateType,
    IceAgent,
    IceState,
    LocalCandidate,
    Pair,
    PairState,
    SendDatagram,
    candidate_priority,
    foundation,
    from_sdp,
    local_preference,
)
from stunturn.nat.classify import Behaviour
from stunturn.nat.sim import SimNat
from stunturn.server import CoreConfig, SendTo, ServerCore
from stunturn.server.actions import Action, RelayTo
from stunturn.stun import (
    TRANSPORT_UDP,
    Address,
    Attribute,
    Message,
    MessageClass,
    Method,
    StunParseError,
    check_integrity,
    decode,
    long_term_key,
    looks_like_stun,
)
from stunturn.stun.attributes import (
    ChannelNumber,
    Data,
    ErrorCode,
    Lifetime,
    Nonce,
    Realm,
    RequestedTransport,
    UseCandidate,
    Username,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
)
from stunturn.stun.transaction import ClientTransaction, RetransmitPolicy
from stunturn.turn import (
    Allocation,
    FiveTuple,
    LocalQuotas,
    LongTermAuth,
    PeerPolicy,
    PortPool,
    QuotaLimits,
    TurnConfig,
    TurnService,
    address_key,
    channel_data,
    data_indication,
    parse_networks,
)

HOST_BASE = 0
"""``base_id`` of the host socket (host and server-reflexive candidates)."""
RELAY_BASE = 1
"""``base_id`` of the TURN allocation (the relayed candidate)."""

STUN_SERVER: Address = ("203.0.113.1", 3478)
TURN_SERVER: Address = ("203.0.113.2", 3478)
RELAY_IP = "203.0.113.3"
RELAY_PORTS = (50000, 50999)
REALM = "sim.example"
TURN_USER, TURN_PASSWORD = "ice", "ice-secret"
ALLOWED_PEERS = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
"""The simulation's "public internet" uses documentation ranges, which TURN's default peer
policy denies; private (LAN) addresses stay denied, as on a real server."""

HOST_PORT = 5000
GATHER_POLICY = RetransmitPolicy(rto=0.5, rc=7, rm=16)
"""STUN and TURN requests from the harness: RFC 8489's defaults."""

Receiver = Callable[[Address, bytes, float], None]
"""A socket's receive callback: (source, data, now)."""


class Flavour(StrEnum):
    """NAT types in the classic naming, as RFC 4787 (mapping, filtering) behaviours."""

    NONE = "no-nat"
    FULL = "full-cone"
    RESTRICTED = "restricted-cone"
    PORT_RESTRICTED = "port-restricted"
    SYMMETRIC = "symmetric"


EIM, ADM, APDM = (
    Behaviour.ENDPOINT_INDEPENDENT,
    Behaviour.ADDRESS_DEPENDENT,
    Behaviour.ADDRESS_AND_PORT_DEPENDENT,
)
BEHAVIOURS: dict[Flavour, tuple[Behaviour, Behaviour] | None] = {
    Flavour.NONE: None,
    Flavour.FULL: (EIM, EIM),
    Flavour.RESTRICTED: (EIM, ADM),
    Flavour.PORT_RESTRICTED: (EIM, APDM),
    Flavour.SYMMETRIC: (APDM, APDM),
}


def direct_path_exists(a: Flavour, b: Flavour) -> bool:
    """Whether UDP hole punching can work between the two (with server-reflexive candidates).

    A symmetric NAT uses a new external port towards the peer, so the peer's NAT must accept a
    port it has never sent to: only no NAT, full cone or restricted cone (address-dependent
    filtering) do.
    """
    open_to_new_ports = {Flavour.NONE, Flavour.FULL, Flavour.RESTRICTED}
    if Flavour.SYMMETRIC in (a, b):
        other = b if a is Flavour.SYMMETRIC else a
        return other in open_to_new_ports
    return True


class BusyLoop(AssertionError):
    """A timer kept asking to run at a time that running it did not move past."""


# --- network ----------------------------------------------------------------------------------


@dataclass(order=True, slots=True)
class _Datagram:
    when: float
    seq: int
    source: Address = field(compare=False)
    destination: Address = field(compare=False)
    data: bytes = field(compare=False)
    local: bool = field(compare=False)
    """Already routed to its final socket (same LAN, or looped back by the NAT)."""


class Network:
    """Sockets on LAN hosts behind :class:`SimNat`\\ s or on the public internet.

    Every datagram takes ``delay`` seconds per hop and is lost with probability ``loss``.
    """

    def __init__(self, delay: float = 0.01, loss: float = 0.0, seed: int = 0) -> None:
        self.delay = delay
        self.loss = loss
        self.rng = random.Random(seed)
        self._queue: list[_Datagram] = []
        self._seq = itertools.count()
        self._sockets: dict[Address, tuple[Receiver, SimNat | None]] = {}
        self._nats: dict[str, SimNat] = {}
        self.sent = 0
        self.lost = 0
        self.dropped = 0
        """Datagrams with nowhere to go: filtered by a NAT, unroutable or to a closed port."""
        self.blocked: set[Address] = set()
        """Sockets whose traffic (both ways) silently vanishes, e.g. to cut a path."""
        self.log: list[tuple[float, Address, Address, bytes]] | None = None
        """Set to a list to record every datagram sent: (time, source socket, destination,
        data), the source before any NAT translation."""

    def add_nat(self, nat: SimNat) -> SimNat:
        self._nats[nat.public_ip] = nat
        return nat

    def attach(self, address: Address, receiver: Receiver, nat: SimNat | None = None) -> None:
        """A socket at ``address``: on a LAN behind ``nat``, or public when ``nat`` is None."""
        self._sockets[address] = (receiver, nat)

    def detach(self, address: Address) -> None:
        self._sockets.pop(address, None)

    def send(self, source: Address, destination: Address, data: bytes, now: float) -> None:
        self.sent += 1
        if self.log is not None:
            self.log.append((now, source, destination, data))
        if self.loss and self.rng.random() < self.loss:
            self.lost += 1
            return
        if source in self.blocked or destination in self.blocked:
            self.dropped += 1
            return
        entry = self._sockets.get(source)
        nat = entry[1] if entry is not None else None
        local = False
        if nat is not None:
            target = self._sockets.get(destination)
            if target is not None and target[1] is nat:
                local = True  # same LAN: straight there, no translation
            elif destination[0] == nat.public_ip:
                if not nat.hairpin:
                    self.dropped += 1
                    return
                external = nat.outbound(source, destination, now)
                inside = nat.inbound(external, destination[1], now)
                if inside is None:
                    self.dropped += 1
                    return
                source = source if nat.hairpin_internal_source else external
                destination, local = inside, True
            else:
                source = nat.outbound(source, destination, now)
        heapq.heappush(
            self._queue,
            _Datagram(now + self.delay, next(self._seq), source, destination, data, local),
        )

    def next_time(self) -> float | None:
        return self._queue[0].when if self._queue else None

    def run_until(self, now: float) -> int:
        """Deliver every datagram due by ``now``; returns how many arrived."""
        delivered = 0
        while self._queue and self._queue[0].when <= now:
            delivered += self._deliver(heapq.heappop(self._queue))
        return delivered

    def _deliver(self, dgram: _Datagram) -> int:
        destination = dgram.destination
        if not dgram.local:
            nat = self._nats.get(destination[0])
            if nat is not None:
                inside = nat.inbound(dgram.source, destination[1], dgram.when)
                if inside is None:
                    self.dropped += 1
                    return 0
                destination = inside
            else:
                target = self._sockets.get(destination)
                if target is not None and target[1] is not None:
                    self.dropped += 1  # a LAN address is not routable from outside its LAN
                    return 0
        entry = self._sockets.get(destination)
        if entry is None:
            self.dropped += 1
            return 0
        entry[0](dgram.source, dgram.data, dgram.when)
        return 1


# --- servers ----------------------------------------------------------------------------------


class Clock:
    """The harness's current time, readable by objects that are not handed ``now``."""

    def __init__(self) -> None:
        self.now = 0.0


@dataclass(eq=False)
class SimRelay:
    """A TURN relay endpoint (a :class:`RelayHandle`) living on the simulated internet.

    Peer-to-client traffic does here what the asyncio layer's relay socket does: drop what has
    no permission, ChannelData when the peer has a channel, a Data indication otherwise.
    """

    address: Address
    five_tuple: FiveTuple
    net: Network
    clock: Clock
    allocation: Allocation | None = None

    def sendto(self, data: bytes | memoryview, peer: Address, /) -> int:
        self.net.send(self.address, peer, bytes(data), self.clock.now)
        return len(data)

    def from_peer(self, source: Address, data: bytes, now: float) -> None:
        alloc = self.allocation
        if alloc is None:
            return
        key = address_key(source)
        if key >> 16 not in alloc.permissions:
            return  # RFC 8656 section 11.3: no permission, no delivery
        number = alloc.peer_channels.get(key)
        frame = data_indication(source, data) if number is None else channel_data(number, data)
        alloc.bytes_to_client += len(data)
        alloc.packets_to_client += 1
        _, client, listener = self.five_tuple
        self.net.send(listener, client, frame, now)


class SimRelayBinder:
    """Binds relay endpoints as public addresses on the simulated network."""

    def __init__(self, net: Network, clock: Clock) -> None:
        self.net = net
        self.clock = clock
        self.bound: dict[Address, SimRelay] = {}

    def bind(self, host: str, port: int, five_tuple: FiveTuple, dont_fragment: bool) -> SimRelay:
        relay = SimRelay((host, port), five_tuple, self.net, self.clock)
        self.bound[relay.address] = relay
        self.net.attach(relay.address, relay.from_peer)
        return relay

    def available(self, host: str, port: int) -> bool:
        return (host, port) not in self.bound

    def close(self, handle: object) -> None:
        assert isinstance(handle, SimRelay)
        self.bound.pop(handle.address, None)
        self.net.detach(handle.address)


class SimServer:
    """A :class:`ServerCore` listening on one public UDP address (STUN, and TURN if given)."""

    def __init__(self, net: Network, address: Address, turn: TurnService | None = None) -> None:
        self.net = net
        self.address = address
        self.core = ServerCore(CoreConfig(response_rate=0), turn)
        net.attach(address, self.on_datagram)

    def on_datagram(self, source: Address, data: bytes, now: float) -> None:
        self.execute(self.core.handle_udp(data, self.address, source, now), now)

    def execute(self, actions: list[Action], now: float) -> None:
        for action in actions:
            if isinstance(action, SendTo):
                self.net.send(action.local, action.remote, action.data, now)
            else:
                assert isinstance(action, RelayTo)
                self.net.send(action.relay.address, action.peer, action.data, now)

    def next_deadline(self) -> float | None:
        return self.core.next_deadline()

    def on_timer(self, now: float) -> None:
        self.core.on_timer(now)


def turn_server(net: Network, clock: Clock, seed: int = 0) -> tuple[SimServer, TurnService]:
    """Our TURN core at :data:`TURN_SERVER`, relaying from :data:`RELAY_IP`."""
    limits = QuotaLimits()
    auth = LongTermAuth(
        REALM,
        Credentials([StaticUsers([(TURN_USER, TURN_PASSWORD)])]),
        NonceManager(b"ice-sim-nonce-secret-0123456789!", 600.0),
    )
    policy = PeerPolicy(
        allow=parse_networks(ALLOWED_PEERS),
        own_ips=frozenset({TURN_SERVER[0], RELAY_IP}),
        relay_ips=frozenset({RELAY_IP}),
        relay_ports=RELAY_PORTS,
    )
    config = TurnConfig(relay_ips=(RELAY_IP,), relay_ports=RELAY_PORTS, limits=limits)
    ports = PortPool(*RELAY_PORTS, b"ice-sim-port-secret-0123456789!!", rng=random.Random(seed))
    service = TurnService(
        config, auth, policy, SimRelayBinder(net, clock), ports, LocalQuotas(limits)
    )
    return SimServer(net, TURN_SERVER, service), service


# --- the TURN client --------------------------------------------------------------------------


@dataclass(eq=False)
class _Request:
    method: int
    attributes: list[Attribute]
    done: Callable[[Message | None, float], None]
    """Called with the verified success response, or None (error or timeout)."""
    tx: ClientTransaction
    retries: int = 0


@dataclass(eq=False)
class _PeerState:
    """A permission (per peer IP) or a channel (per peer address) and what waits for it."""

    ready: bool = False
    failed: bool = False
    refreshed: float = 0.0
    queued: list[tuple[Address, bytes]] = field(default_factory=list)
    number: int = 0


REFRESH_PERMISSION = 240.0
"""Permissions last 300 s (channels 600 s): refresh when sending after 4 minutes."""


class SimTurnClient:
    """The client side of one TURN allocation, speaking for an ICE agent's relayed base."""

    def __init__(
        self,
        net: Network,
        host: Address,
        server: Address = TURN_SERVER,
        *,
        username: str = TURN_USER,
        password: str = TURN_PASSWORD,
        channels: bool = False,
    ) -> None:
        self.net = net
        self.host = host
        self.server = server
        self.username = username
        self.password = password
        self.channels = channels
        self.realm: str | None = None
        self.nonce: str | None = None
        self.relayed: Address | None = None
        self.mapped: Address | None = None
        self.failed = False
        self.refresh_at = float("inf")
        self.on_allocated: Callable[[SimTurnClient, float], None] | None = None
        self._requests: dict[bytes, _Request] = {}
        self._permissions: dict[str, _PeerState] = {}
        self._channels: dict[Address, _PeerState] = {}
        self._by_number: dict[int, Address] = {}
        self._next_number = 0x4000
        self.sent_to_peers = 0

    @property
    def key(self) -> bytes:
        assert self.realm is not None
        return long_term_key(self.username, self.realm, self.password)

    # requests

    def _request(
        self,
        method: int,
        attributes: list[Attribute],
        done: Callable[[Message | None, float], None],
        now: float,
        retries: int = 0,
    ) -> None:
        msg = Message(method, MessageClass.REQUEST, attributes=list(attributes))
        if self.nonce is not None and self.realm is not None:
            msg.attributes += [Username(self.username), Realm(self.realm), Nonce(self.nonce)]
            data = msg.encode(self.key)
        else:
            data = msg.encode()
        tx = ClientTransaction(msg.transaction_id, data, self.server, GATHER_POLICY)
        self._requests[tx.tid] = _Request(method, attributes, done, tx, retries)
        self.net.send(self.host, self.server, tx.start(now), now)

    def allocate(self, now: float) -> None:
        self._request(Method.ALLOCATE, [RequestedTransport(TRANSPORT_UDP)], self._allocated, now)

    def _allocated(self, response: Message | None, now: float) -> None:
        relayed = response.get(XorRelayedAddress) if response is not None else None
        if response is None or relayed is None:
            self.failed = True
        else:
            self.relayed = relayed.address
            mapped = response.get(XorMappedAddress)
            self.mapped = mapped.address if mapped is not None else None
            lifetime = response.get(Lifetime)
            self.refresh_at = now + (lifetime.seconds if lifetime is not None else 600) - 60
        if self.on_allocated is not None:
            self.on_allocated(self, now)

    def _refresh(self, now: float) -> None:
        def refreshed(response: Message | None, when: float) -> None:
            lifetime = response.get(Lifetime) if response is not None else None
            self.refresh_at = when + (lifetime.seconds - 60 if lifetime is not None else 30)

        self.refresh_at = float("inf")
        self._request(Method.REFRESH, [Lifetime(600)], refreshed, now)

    # client -> peer

    def send(self, peer: Address, data: bytes, now: float) -> None:
        """What the agent sends from the relayed base to ``peer``."""
        if self.relayed is None:
            return
        if self.channels:
            state = self._channels.get(peer)
            if state is None:
                state = self._channels[peer] = _PeerState(number=self._next_number)
                self._by_number[state.number] = peer
                self._next_number += 1
                self._bind(peer, state, now)
        else:
            state = self._permissions.get(peer[0])
            if state is None:
                state = self._permissions[peer[0]] = _PeerState()
                self._permit(peer, state, now)
        if state.failed:
            return
        if not state.ready:
            state.queued.append((peer, data))
            return
        if now - state.refreshed > REFRESH_PERMISSION:
            state.refreshed = now
            if self.channels:
                self._bind(peer, state, now)
            else:
                self._permit(peer, state, now)
        self._relay(peer, data, state, now)

    def _relay(self, peer: Address, data: bytes, state: _PeerState, now: float) -> None:
        self.sent_to_peers += 1
        if self.channels:
            frame = channel_data(state.number, data)
        else:
            msg = Message(Method.SEND, MessageClass.INDICATION)
            msg.attributes += [XorPeerAddress(*peer), Data(data)]
            frame = msg.encode()
        self.net.send(self.host, self.server, frame, now)

    def _confirmed(self, state: _PeerState) -> Callable[[Message | None, float], None]:
        def done(response: Message | None, now: float) -> None:
            if state.ready:
                return  # a refresh: a failure will show as lost traffic
            if response is None:
                state.failed = True
                state.queued.clear()
                return
            state.ready, state.refreshed = True, now
            queued, state.queued = state.queued, []
            for peer, data in queued:
                self._relay(peer, data, state, now)

        return done

    def _permit(self, peer: Address, state: _PeerState, now: float) -> None:
        attrs: list[Attribute] = [XorPeerAddress(*peer)]
        self._request(Method.CREATE_PERMISSION, attrs, self._confirmed(state), now)

    def _bind(self, peer: Address, state: _PeerState, now: float) -> None:
        attrs: list[Attribute] = [ChannelNumber(state.number), XorPeerAddress(*peer)]
        self._request(Method.CHANNEL_BIND, attrs, self._confirmed(state), now)

    # server -> client

    def on_datagram(self, data: bytes, now: float) -> tuple[Address, bytes] | None:
        """A datagram from the server: returns (peer, payload) for the agent, if it is one."""
        if data and 0x40 <= data[0] < 0x80:
            if len(data) < 4:
                return None
            peer = self._by_number.get(int.from_bytes(data[:2], "big"))
            length = int.from_bytes(data[2:4], "big")
            return None if peer is None else (peer, data[4 : 4 + length])
        if not looks_like_stun(data):
            return None
        try:
            msg = decode(data)
        except StunParseError:
            return None
        if msg.cls is MessageClass.INDICATION and msg.method == Method.DATA:
            peer_attr, payload = msg.get(XorPeerAddress), msg.get(Data)
            if peer_attr is None or payload is None:
                return None
            return peer_attr.address, payload.value
        request = self._requests.pop(msg.transaction_id, None)
        if request is None:
            return None
        if msg.cls is MessageClass.ERROR:
            error = msg.get(ErrorCode)
            code = error.code if error is not None else 0
            realm, nonce = msg.get(Realm), msg.get(Nonce)
            if code in (401, 438) and nonce is not None and request.retries < 2:
                if realm is not None:
                    self.realm = realm.value
                self.nonce = nonce.value
                self._request(
                    request.method, request.attributes, request.done, now, request.retries + 1
                )
                return None
            request.done(None, now)
            return None
        if msg.cls is MessageClass.SUCCESS and self.realm is not None:
            request.done(msg if check_integrity(msg, self.key) else None, now)
        return None

    # timers

    def next_deadline(self) -> float | None:
        times = [r.tx.deadline for r in self._requests.values()]
        times.append(self.refresh_at)
        finite = [t for t in times if t != float("inf")]
        return min(finite, default=None)

    def on_timer(self, now: float) -> None:
        for tid, request in list(self._requests.items()):
            if now < request.tx.deadline:
                continue
            data = request.tx.on_timer(now)
            if data is not None:
                self.net.send(self.host, self.server, data, now)
            elif request.tx.timed_out(now):
                del self._requests[tid]
                request.done(None, now)
        if now >= self.refresh_at and self.relayed is not None:
            self._refresh(now)


# --- a peer: host socket, gathering, agent ------------------------------------------------------


def relayed(pair: Pair) -> bool:
    """The pair goes through the TURN server: our relayed base, or a relay address remotely."""
    return pair.local.base_id == RELAY_BASE or pair.remote.host == RELAY_IP


@dataclass(frozen=True, slots=True)
class Path:
    """The selected pair of one agent, as seen by that agent."""

    local_type: CandidateType
    local: Address
    remote_type: CandidateType
    remote: Address
    relayed: bool
    """Through the TURN server on either end (our relayed base, or a relay address remotely)."""

    def describe(self) -> str:
        return f"{self.local_type}->{self.remote_type}"


class SimPeer:
    """One endpoint: a host socket (behind ``nat`` or public), its gathering and its agent."""

    def __init__(
        self,
        sim: IceSim,
        name: str,
        host: Address,
        nat: SimNat | None,
        agent: IceAgent,
    ) -> None:
        self.sim = sim
        self.name = name
        self.host = host
        self.nat = nat
        self.agent = agent
        self.gathered: list[LocalCandidate] = []
        self.gathering_done = False
        self.started = False
        self.turn: SimTurnClient | None = None
        self._stun_tx: ClientTransaction | None = None
        self.received: list[bytes] = []
        """Application data the agent passed up."""
        self.connected_at: float | None = None
        self.failed_at: float | None = None
        self.on_candidate: Callable[[SimPeer, LocalCandidate, float], None] | None = None
        self.on_gathered: Callable[[SimPeer, float], None] | None = None
        self.direct_valid_at_nomination: bool | None = None
        """Whether a direct pair was valid when this agent sent its first USE-CANDIDATE."""
        sim.net.attach(host, self.on_datagram, nat)

    # gathering

    def gather(self, now: float, *, stun: bool, turn: bool, channels: bool) -> None:
        ip, port = self.host
        host = Candidate(
            foundation(CandidateType.HOST, ip),
            1,
            "udp",
            candidate_priority(CandidateType.HOST, local_preference(ip)),
            ip,
            port,
            CandidateType.HOST,
        )
        self._found(LocalCandidate(host, HOST_BASE, self.host), now)
        if stun:
            msg = Message(Method.BINDING, MessageClass.REQUEST)
            self._stun_tx = ClientTransaction(
                msg.transaction_id, msg.encode(), STUN_SERVER, GATHER_POLICY
            )
            self.sim.net.send(self.host, STUN_SERVER, self._stun_tx.start(now), now)
        if turn:
            self.turn = SimTurnClient(self.sim.net, self.host, channels=channels)
            self.turn.on_allocated = self._allocated
            self.turn.allocate(now)
        self._maybe_done(now)

    def _found(self, local: LocalCandidate, now: float) -> None:
        self.gathered.append(local)
        if self.on_candidate is not None:
            self.on_candidate(self, local, now)

    def _stun_answered(self, msg: Message | None, now: float) -> None:
        self._stun_tx = None
        mapped = msg.get(XorMappedAddress) if msg is not None else None
        if mapped is not None and mapped.address != self.host:
            ip, port = self.host
            srflx = Candidate(
                foundation(CandidateType.SRFLX, ip, STUN_SERVER[0]),
                1,
                "udp",
                candidate_priority(CandidateType.SRFLX, local_preference(ip)),
                mapped.host,
                mapped.port,
                CandidateType.SRFLX,
                ip,
                port,
            )
            self._found(LocalCandidate(srflx, HOST_BASE, self.host), now)
        self._maybe_done(now)

    def _allocated(self, client: SimTurnClient, now: float) -> None:
        if client.relayed is not None:
            ip = self.host[0]
            mapped = client.mapped or self.host
            relay = Candidate(
                foundation(CandidateType.RELAY, ip, TURN_SERVER[0]),
                1,
                "udp",
                candidate_priority(CandidateType.RELAY, local_preference(ip)),
                client.relayed[0],
                client.relayed[1],
                CandidateType.RELAY,
                mapped[0],
                mapped[1],
            )
            self._found(LocalCandidate(relay, RELAY_BASE, client.relayed), now)
        self._maybe_done(now)

    def _maybe_done(self, now: float) -> None:
        if self.gathering_done or self._stun_tx is not None:
            return
        if self.turn is not None and self.turn.relayed is None and not self.turn.failed:
            return
        self.gathering_done = True
        if self.on_gathered is not None:
            self.on_gathered(self, now)

    # I/O

    def execute(self, actions: list[SendDatagram], now: float) -> None:
        for action in actions:
            if self.direct_valid_at_nomination is None and looks_like_stun(action.data):
                msg = decode(action.data)
                if msg.cls is MessageClass.REQUEST and msg.get(UseCandidate) is not None:
                    self.direct_valid_at_nomination = any(
                        p.state is PairState.SUCCEEDED and not relayed(p)
                        for p in self.agent.pairs.values()
                    )
            if action.base_id == HOST_BASE:
                self.sim.net.send(self.host, action.destination, action.data, now)
            else:
                assert action.base_id == RELAY_BASE and self.turn is not None
                self.turn.send(action.destination, action.data, now)

    def on_datagram(self, source: Address, data: bytes, now: float) -> None:
        if source == TURN_SERVER and self.turn is not None:
            relayed = self.turn.on_datagram(data, now)
            if relayed is not None:
                self._to_agent(RELAY_BASE, relayed[0], relayed[1], now)
            return
        if source == STUN_SERVER:
            tx = self._stun_tx
            if tx is not None and looks_like_stun(data):
                try:
                    msg = decode(data)
                except StunParseError:
                    return
                if msg.transaction_id == tx.tid and msg.cls is MessageClass.SUCCESS:
                    self._stun_answered(msg, now)
            return
        self._to_agent(HOST_BASE, source, data, now)

    def _to_agent(self, base_id: int, source: Address, data: bytes, now: float) -> None:
        if not self.started:
            return
        actions, app = self.agent.on_datagram(base_id, source, data, now)
        if app is not None:
            self.received.append(app)
        self.execute(actions, now)
        self._note_state(now)

    def _note_state(self, now: float) -> None:
        if self.agent.state is IceState.CONNECTED and self.connected_at is None:
            self.connected_at = now
        if self.agent.state is IceState.FAILED and self.failed_at is None:
            self.failed_at = now

    # timers

    def deadlines(self) -> list[float]:
        times: list[float] = []
        if self.started:
            agent_deadline = self.agent.next_deadline()
            if agent_deadline is not None:
                times.append(agent_deadline)
        if self._stun_tx is not None:
            times.append(self._stun_tx.deadline)
        if self.turn is not None:
            turn_deadline = self.turn.next_deadline()
            if turn_deadline is not None:
                times.append(turn_deadline)
        return times

    def on_timer(self, now: float) -> None:
        tx = self._stun_tx
        if tx is not None and now >= tx.deadline:
            data = tx.on_timer(now)
            if data is not None:
                self.sim.net.send(self.host, STUN_SERVER, data, now)
            elif tx.timed_out(now):
                self._stun_answered(None, now)
        if self.turn is not None:
            turn_deadline = self.turn.next_deadline()
            if turn_deadline is not None and now >= turn_deadline:
                self.turn.on_timer(now)
        if self.started:
            agent_deadline = self.agent.next_deadline()
            if agent_deadline is not None and now >= agent_deadline:
                self.execute(self.agent.on_timer(now), now)
                self._note_state(now)

    # results

    def path(self) -> Path | None:
        pair: Pair | None = self.agent.selected
        if pair is None:
            return None
        local = pair.valid_local or pair.local
        return Path(
            local.candidate.type,
            local.candidate.address,
            pair.remote.type,
            pair.remote.address,
            relayed(pair),
        )


# --- the whole world ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SideOutcome:
    state: IceState
    path: Path | None
    connected_after: float | None
    """Seconds from the start of checks to CONNECTED."""
    failed_after: float | None
    failure_reason: str | None
    received: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a run produced."""

    a: SideOutcome
    b: SideOutcome
    started: float
    """Simulated time the checks started (after gathering, unless trickling)."""
    ended: float
    datagrams: int
    """Datagrams handed to the network (STUN, TURN, checks and data)."""
    lost: int

    @property
    def connected(self) -> bool:
        return self.a.state is IceState.CONNECTED and self.b.state is IceState.CONNECTED

    @property
    def failed(self) -> bool:
        return self.a.state is IceState.FAILED and self.b.state is IceState.FAILED

    @property
    def relayed(self) -> bool:
        return any(s.path is not None and s.path.relayed for s in (self.a, self.b))

    @property
    def time_to_connect(self) -> float | None:
        if not self.connected:
            return None
        assert self.a.connected_after is not None and self.b.connected_after is not None
        return max(self.a.connected_after, self.b.connected_after)

    @property
    def data_ok(self) -> bool:
        """Each side received exactly the other's test message."""
        return self.a.received == (DATA_B,) and self.b.received == (DATA_A,)

    def describe(self) -> str:
        if not self.connected:
            return f"{self.a.state}/{self.b.state} ({self.a.failure_reason})"
        assert self.a.path is not None and self.b.path is not None
        kind = "relayed" if self.relayed else "direct"
        return f"{kind} {self.a.path.describe()} t={self.time_to_connect:.2f}s"


DATA_A = b"application data from A"
DATA_B = b"application data from B"


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Knobs of a run."""

    delay: float = 0.01
    """One-way delay per hop (seconds)."""
    loss: float = 0.0
    """Probability that any datagram is lost."""
    seed: int = 1
    stun: bool = True
    turn: bool = True
    channels: bool = False
    """Relay with ChannelBind + ChannelData instead of CreatePermission + Send indications."""
    trickle: bool = False
    """Start checking at once and signal candidates as they are gathered."""
    signal_delay: float = 0.05
    """Signalling latency when trickling."""
    same_nat: bool = False
    """Both hosts on one LAN behind A's NAT (B's flavour is ignored)."""
    controlling_b: bool = False
    """Make B controlling too (a role conflict)."""
    tie_breakers: tuple[int | None, int | None] = (None, None)
    """Tie-breakers of A and B (None: drawn from the seeded generator)."""
    max_time: float = 40.0
    """Give up this long after the checks started."""
    exchange_data: bool = True
    """Once both are connected, send one datagram each way over the selected pair."""
    nomination_wait: float = 1.0
    """The agents' ``nomination_wait``."""
    nat_timeout: float | None = None
    """NAT mappings expire after this many seconds without outbound traffic (None: never)."""


class IceSim:
    """Two agents, their NATs, a STUN server and a TURN server; time moves only in :meth:`step`."""

    def __init__(
        self, flavour_a: Flavour, flavour_b: Flavour, config: SimConfig | None = None
    ) -> None:
        self.config = cfg = config or SimConfig()
        self.clock = Clock()
        self.net = Network(cfg.delay, cfg.loss, cfg.seed)
        self.stun_server = SimServer(self.net, STUN_SERVER)
        self.turn_server, self.turn_service = turn_server(self.net, self.clock, cfg.seed)
        rng = random.Random(cfg.seed)
        nat_a = self._nat(flavour_a, "198.51.100.1", rng)
        nat_b = nat_a if cfg.same_nat else self._nat(flavour_b, "198.51.100.2", rng)
        if cfg.same_nat:
            host_a: Address = ("10.0.1.2" if nat_a else "192.0.2.1", HOST_PORT)
            host_b: Address = ("10.0.1.3" if nat_a else "192.0.2.2", HOST_PORT)
        else:
            host_a = ("10.0.1.2" if nat_a else "192.0.2.1", HOST_PORT)
            host_b = ("10.0.2.2" if nat_b else "192.0.2.2", HOST_PORT)
        tb_a, tb_b = (tb if tb is not None else rng.getrandbits(64) for tb in cfg.tie_breakers)
        agent_a = IceAgent(
            True,
            tie_breaker=tb_a,
            rng=random.Random(rng.random()),
            nomination_wait=cfg.nomination_wait,
        )
        agent_b = IceAgent(
            cfg.controlling_b,
            tie_breaker=tb_b,
            rng=random.Random(rng.random()),
            nomination_wait=cfg.nomination_wait,
        )
        self.a = SimPeer(self, "A", host_a, nat_a, agent_a)
        self.b = SimPeer(self, "B", host_b, nat_b, agent_b)
        self.started: float | None = None
        self._signals: list[tuple[float, int, Callable[[float], None]]] = []
        self._seq = itertools.count()
        self._stalled = 0

    @property
    def now(self) -> float:
        return self.clock.now

    def _nat(self, flavour: Flavour, public_ip: str, rng: random.Random) -> SimNat | None:
        behaviours = BEHAVIOURS[flavour]
        if behaviours is None:
            return None
        mapping, filtering = behaviours
        nat = SimNat(
            public_ip,
            mapping,
            filtering,
            timeout=self.config.nat_timeout,
            rng=random.Random(rng.random()),
        )
        return self.net.add_nat(nat)

    def peers(self) -> tuple[SimPeer, SimPeer]:
        return self.a, self.b

    def other(self, peer: SimPeer) -> SimPeer:
        return self.b if peer is self.a else self.a

    # signalling

    def signal(self, delay: float, action: Callable[[float], None]) -> None:
        heapq.heappush(self._signals, (self.now + delay, next(self._seq), action))

    def _send_candidate(self, peer: SimPeer, local: LocalCandidate, now: float) -> None:
        """Trickle: the candidate goes to our agent now and, as SDP, to the other side later."""
        if peer.started:
            peer.execute(peer.agent.add_local_candidate(local, now), now)
        line = "a=" + local.candidate.to_sdp()
        other = self.other(peer)

        def deliver(when: float) -> None:
            other.execute(other.agent.add_remote_candidate(from_sdp(line), when), when)

        self.signal(self.config.signal_delay, deliver)

    def _send_end_of_candidates(self, peer: SimPeer, now: float) -> None:
        peer.agent.end_of_local_candidates()
        other = self.other(peer)
        self.signal(self.config.signal_delay, lambda _: other.agent.end_of_remote_candidates())

    # running

    def start(self) -> None:
        """Gather (and, unless trickling, run until gathering is done), signal, start checks."""
        cfg = self.config
        for peer in self.peers():
            other = self.other(peer)
            peer.agent.set_remote_credentials(other.agent.local_ufrag, other.agent.local_password)
        if cfg.trickle:
            for peer in self.peers():
                peer.on_candidate = self._send_candidate
                peer.on_gathered = self._send_end_of_candidates
            self._start_checks()
            for peer in self.peers():
                peer.gather(self.now, stun=cfg.stun, turn=cfg.turn, channels=cfg.channels)
            return
        for peer in self.peers():
            peer.gather(self.now, stun=cfg.stun, turn=cfg.turn, channels=cfg.channels)
        self.run_until(lambda: self.a.gathering_done and self.b.gathering_done, 60.0)
        assert self.a.gathering_done and self.b.gathering_done, "gathering did not finish"
        now = self.now
        for peer in self.peers():
            other = self.other(peer)
            for local in peer.gathered:
                peer.execute(peer.agent.add_local_candidate(local, now), now)
            for local in other.gathered:
                remote = from_sdp("a=" + local.candidate.to_sdp())
                peer.execute(peer.agent.add_remote_candidate(remote, now), now)
            peer.agent.end_of_local_candidates()
            peer.agent.end_of_remote_candidates()
        self._start_checks()

    def _start_checks(self) -> None:
        now = self.now
        self.started = now
        for peer in self.peers():
            peer.started = True
            peer.execute(peer.agent.start(now), now)

    def next_time(self) -> float | None:
        times = [t for peer in self.peers() for t in peer.deadlines()]
        for server in (self.stun_server, self.turn_server):
            deadline = server.next_deadline()
            if deadline is not None:
                times.append(deadline)
        net = self.net.next_time()
        if net is not None:
            times.append(net)
        if self._signals:
            times.append(self._signals[0][0])
        return min(times, default=None)

    def step(self, limit: float) -> bool:
        """Move to the next thing due (not past ``limit``) and do it; False when idle."""
        when = self.next_time()
        if when is None or when > limit:
            self.clock.now = max(self.now, limit)
            return False
        if when <= self.now:
            self._stalled += 1
            if self._stalled > 1000:
                raise BusyLoop(f"timers keep asking for t={when} at t={self.now}")
        else:
            self._stalled = 0
            self.clock.now = when
        now = self.now
        self.net.run_until(now)
        while self._signals and self._signals[0][0] <= now:
            heapq.heappop(self._signals)[2](now)
        for server in (self.stun_server, self.turn_server):
            deadline = server.next_deadline()
            if deadline is not None and deadline <= now:
                server.on_timer(now)
        for peer in self.peers():
            peer.on_timer(now)
        return True

    def run_until(self, done: Callable[[], bool], limit: float) -> None:
        """Step until ``done()`` or simulated time ``limit``."""
        while not done() and self.step(limit):
            pass

    def run_for(self, seconds: float) -> None:
        end = self.now + seconds
        while self.step(end):
            pass

    def settled(self) -> bool:
        final = (IceState.CONNECTED, IceState.FAILED)
        return self.a.agent.state in final and self.b.agent.state in final

    def run(self) -> Outcome:
        """The whole story: gather, signal, check until both settle, exchange data."""
        self.start()
        assert self.started is not None
        self.run_until(self.settled, self.started + self.config.max_time)
        if self.config.exchange_data and all(
            p.agent.state is IceState.CONNECTED for p in self.peers()
        ):
            for peer, data in ((self.a, DATA_A), (self.b, DATA_B)):
                peer.execute(peer.agent.send(data), self.now)
            self.run_for(1.0)
        return self.outcome()

    def outcome(self) -> Outcome:
        start = self.started if self.started is not None else 0.0

        def side(peer: SimPeer) -> SideOutcome:
            agent = peer.agent
            return SideOutcome(
                agent.state,
                peer.path(),
                None if peer.connected_at is None else peer.connected_at - start,
                None if peer.failed_at is None else peer.failed_at - start,
                agent.failure_reason,
                tuple(peer.received),
            )

        return Outcome(side(self.a), side(self.b), start, self.now, self.net.sent, self.net.lost)


def simulate(a: Flavour, b: Flavour, config: SimConfig | None = None) -> Outcome:
    """Run one scenario from scratch and return its outcome."""
    return IceSim(a, b, config).run()
