"""In-memory kit for the TURN core tests: fake relay sockets, a signing client, a server factory.

Nothing here opens a socket or reads a clock. :class:`Harness` holds a :class:`ServerCore`
wired to a :class:`TurnService` whose relay sockets come from :class:`FakeBinder` (an in-memory
port table that can be told some ports are taken by somebody else), and the current time, which
only moves when a test calls :meth:`Harness.step`. :class:`TurnClient` speaks to the core as a
real client would: its first request goes out unsigned, the 401 gives it REALM, NONCE and
PASSWORD-ALGORITHMS, and it retries signed (RFC 5389 style: MESSAGE-INTEGRITY with the MD5 key;
RFC 8489 style: PASSWORD-ALGORITHMS echoed, PASSWORD-ALGORITHM SHA-256 and
MESSAGE-INTEGRITY-SHA256 with the SHA-256 key; optionally USERHASH instead of USERNAME).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from stunturn.auth import (
    Credentials,
    CredentialSource,
    NonceManager,
    RestCredentials,
    RestSecrets,
    StaticUsers,
)
from stunturn.server import CoreConfig, SendTo, ServerCore, Transport
from stunturn.server.actions import Action, Splice
from stunturn.stun import (
    PASSWORD_ALGORITHM_MD5,
    PASSWORD_ALGORITHM_SHA256,
    TRANSPORT_UDP,
    Address,
    Attribute,
    Message,
    MessageClass,
    Method,
    StreamFramer,
    check_integrity,
    check_integrity_sha256,
    decode,
    long_term_key,
    new_transaction_id,
    userhash,
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
    RequestedTransport,
    Userhash,
    Username,
    XorPeerAddress,
    XorRelayedAddress,
)
from stunturn.turn import (
    Allocation,
    FiveTuple,
    LocalQuotas,
    LongTermAuth,
    PeerPolicy,
    PortPool,
    QuotaLimits,
    Quotas,
    RelayHandle,
    TurnConfig,
    TurnService,
    parse_networks,
)
from stunturn.turn.tcp import PeerConnection
from stunturn.turn.wire import channel_data

REALM = "example.org"
USERS: tuple[tuple[str, str], ...] = (("alice", "alice-secret"), ("bob", "bob-secret"))

SERVER: Address = ("192.0.2.1", 3478)
"""The listener the clients talk to."""
SERVER6: Address = ("2001:db8::1", 3478)
RELAY_V4 = "192.0.2.100"
RELAY_V6 = "2001:db8::100"
RELAY_PORTS = (50000, 50063)

CLIENT: Address = ("198.51.100.7", 40000)
CLIENT2: Address = ("198.51.100.8", 40000)

# Public addresses the default peer policy allows.
PEER: Address = ("93.184.216.34", 5000)
PEER2: Address = ("1.1.1.1", 6000)
PEER3: Address = ("8.8.8.8", 7000)
PEER6: Address = ("2606:4700:4700::1111", 8000)

NONCE_SECRET = b"nonce-secret-for-tests-32-bytes!"
PORT_SECRET = b"port-secret-for-tests-32-bytes!!"


# --- fake relay sockets -------------------------------------------------------------------------


@dataclass(eq=False)
class FakeRelay:
    """A relay "socket": records what it was asked to send (implements RelayHandle)."""

    address: Address
    five_tuple: FiveTuple
    dont_fragment: bool
    allocation: Allocation | None = None
    closed: bool = False
    sent: list[tuple[bytes, Address]] = field(default_factory=list)

    def sendto(self, data: bytes | memoryview, peer: Address, /) -> int:
        self.sent.append((bytes(data), peer))
        return len(data)


class FakeBinder:
    """An in-memory port table standing in for the I/O layer's relay binder."""

    def __init__(self) -> None:
        self.bound: dict[Address, FakeRelay] = {}
        self.taken: set[Address] = set()
        """Ports held by something outside the TURN pool: bind() fails on them."""
        self.closed: list[FakeRelay] = []
        self.attempts: list[Address] = []

    def bind(
        self, host: str, port: int, five_tuple: FiveTuple, dont_fragment: bool
    ) -> FakeRelay | None:
        self.attempts.append((host, port))
        if (host, port) in self.taken or (host, port) in self.bound:
            return None
        relay = FakeRelay((host, port), five_tuple, dont_fragment)
        self.bound[(host, port)] = relay
        return relay

    def available(self, host: str, port: int) -> bool:
        return (host, port) not in self.taken and (host, port) not in self.bound

    def close(self, handle: RelayHandle) -> None:
        relay = self.bound.pop(handle.address)
        relay.closed = True
        self.closed.append(relay)

    def take(self, host: str, ports: Iterable[int]) -> None:
        """Mark ports as taken by another program."""
        self.taken.update((host, p) for p in ports)


class FakeTcpBinder(FakeBinder):
    """Also does RFC 6062 TCP relays: records connection attempts and closes."""

    def __init__(self) -> None:
        super().__init__()
        self.tcp_bound: list[FakeRelay] = []
        self.connecting: list[PeerConnection] = []
        self.closed_tcp: list[PeerConnection] = []

    def bind_tcp(self, host: str, port: int, five_tuple: FiveTuple) -> FakeRelay | None:
        relay = self.bind(host, port, five_tuple, False)
        if relay is not None:
            self.tcp_bound.append(relay)
        return relay

    def connect_tcp(self, conn: PeerConnection, relay: RelayHandle) -> None:
        self.connecting.append(conn)

    def close_tcp(self, conn: PeerConnection) -> None:
        self.closed_tcp.append(conn)


# --- server -------------------------------------------------------------------------------------


@dataclass(eq=False)
class Harness:
    """A core, its TURN service and fakes, and the current time (moved only by :meth:`step`)."""

    core: ServerCore
    turn: TurnService
    binder: FakeBinder
    quotas: Quotas
    now: float = 0.0

    def step(self, seconds: float) -> None:
        """Let ``seconds`` pass and run the core's timer."""
        self.now += seconds
        self.core.on_timer(self.now)

    def step_to(self, when: float) -> None:
        self.now = when
        self.core.on_timer(when)

    @property
    def unix_time(self) -> float:
        return self.now + self.turn.clock_offset

    def client(
        self,
        username: str = "alice",
        password: str | None = None,
        *,
        address: Address = CLIENT,
        local: Address = SERVER,
        transport: Transport = Transport.UDP,
        sha256: bool = False,
        use_userhash: bool = False,
        fingerprint: bool = False,
        realm: str = REALM,
    ) -> TurnClient:
        if password is None:
            password = dict(USERS).get(username, "no-such-password")
        return TurnClient(
            self,
            username,
            password,
            realm=realm,
            address=address,
            local=local,
            transport=transport,
            sha256=sha256,
            use_userhash=use_userhash,
            fingerprint=fingerprint,
        )

    def allocation(self, client: TurnClient) -> Allocation:
        return self.turn.allocations[client.five_tuple]


def make_server(
    *,
    users: Iterable[tuple[str, str]] = USERS,
    rest: RestSecrets | None = None,
    sources: Sequence[CredentialSource] | None = None,
    relay_ips: tuple[str, ...] = (RELAY_V4,),
    relay_ports: tuple[int, int] = RELAY_PORTS,
    limits: QuotaLimits | None = None,
    quotas: Quotas | None = None,
    allow: Sequence[str] = (),
    deny: Sequence[str] = (),
    default_lifetime: int = 600,
    max_lifetime: int = 3600,
    nonce_lifetime: float = 600.0,
    worker: int = 0,
    workers: int = 1,
    start: float = 0.0,
    clock_offset: float = 0.0,
    seed: int = 1,
    tcp: bool = False,
) -> Harness:
    """A ServerCore with a TurnService wired to the fakes (no response rate limit)."""
    if sources is None:
        chain: list[CredentialSource] = [StaticUsers(users)]
        if rest is not None:
            chain.append(RestCredentials(rest))
        sources = chain
    limits = limits or QuotaLimits()
    auth = LongTermAuth(REALM, Credentials(sources), NonceManager(NONCE_SECRET, nonce_lifetime))
    policy = PeerPolicy(
        allow=parse_networks(allow),
        deny=parse_networks(deny),
        own_ips=frozenset({SERVER[0], SERVER6[0], *relay_ips}),
        relay_ips=frozenset(relay_ips),
        relay_ports=relay_ports,
    )
    config = TurnConfig(
        relay_ips=relay_ips,
        relay_ports=relay_ports,
        default_lifetime=default_lifetime,
        max_lifetime=max_lifetime,
        limits=limits,
    )
    binder = FakeTcpBinder() if tcp else FakeBinder()
    ports = PortPool(
        *relay_ports, PORT_SECRET, worker=worker, workers=workers, rng=random.Random(seed)
    )
    quotas = quotas if quotas is not None else LocalQuotas(limits)
    turn = TurnService(config, auth, policy, binder, ports, quotas)
    turn.clock_offset = clock_offset
    core = ServerCore(CoreConfig(response_rate=0), turn)
    return Harness(core, turn, binder, quotas, start)


# --- client -------------------------------------------------------------------------------------


class TurnClient:
    """Builds (signed) requests for one 5-tuple and feeds them to the core."""

    def __init__(
        self,
        server: Harness,
        username: str,
        password: str,
        *,
        realm: str = REALM,
        address: Address = CLIENT,
        local: Address = SERVER,
        transport: Transport = Transport.UDP,
        sha256: bool = False,
        use_userhash: bool = False,
        fingerprint: bool = False,
    ) -> None:
        self.server = server
        self.username = username
        self.password = password
        self.realm = realm
        self.address = address
        self.local = local
        self.transport = transport
        self.sha256 = sha256
        self.use_userhash = use_userhash
        self.fingerprint = fingerprint
        self.nonce: str | None = None
        self.offered: PasswordAlgorithms | None = None
        self.last_raw = b""
        """The bytes of the last response received."""
        self.framer = StreamFramer()
        self.spliced: list[Splice] = []
        """ConnectionBind successes: the core asked to splice this connection to a peer."""

    @property
    def five_tuple(self) -> FiveTuple:
        return (self.transport, self.address, self.local)

    @property
    def key(self) -> bytes:
        algorithm = PASSWORD_ALGORITHM_SHA256 if self.sha256 else PASSWORD_ALGORITHM_MD5
        return long_term_key(self.username, self.realm, self.password, algorithm)

    def auth_attributes(self) -> list[Attribute]:
        """USERNAME (or USERHASH), REALM, NONCE and, RFC 8489 style, the password algorithm."""
        assert self.nonce is not None, "login() first"
        who: Attribute = (
            Userhash(userhash(self.username, self.realm))
            if self.use_userhash
            else Username(self.username)
        )
        attrs: list[Attribute] = [who, Realm(self.realm), Nonce(self.nonce)]
        if self.sha256:
            assert self.offered is not None
            attrs += [self.offered, PasswordAlgorithm(PASSWORD_ALGORITHM_SHA256)]
        return attrs

    def encode(
        self,
        method: int,
        *attrs: Attribute,
        tid: bytes | None = None,
        sign: bool = True,
        key: bytes | None = None,
    ) -> bytes:
        """A request; signed with the current nonce unless ``sign`` is False."""
        msg = Message(method, MessageClass.REQUEST, tid or new_transaction_id(), list(attrs))
        if not sign:
            return msg.encode(fingerprint=self.fingerprint)
        msg.attributes += self.auth_attributes()
        return msg.encode(
            key if key is not None else self.key,
            sha1=not self.sha256,
            sha256=self.sha256,
            fingerprint=self.fingerprint,
        )

    def send(self, data: bytes) -> list[Action]:
        """Hand bytes to the core as if they arrived on this client's 5-tuple.

        Over TCP/TLS the bytes go through a :class:`StreamFramer` first, as the I/O layer
        does (which also strips ChannelData padding).
        """
        core, now = self.server.core, self.server.now
        if self.transport is Transport.UDP:
            return core.handle_udp(data, self.local, self.address, now)
        actions: list[Action] = []
        for frame in self.framer.feed(data):
            for action in core.handle_stream_frame(
                frame, self.local, self.address, self.transport, now
            ):
                if isinstance(action, Splice):
                    self.spliced.append(action)  # RFC 6062: recorded apart
                else:
                    actions.append(action)
        return actions

    def exchange(self, data: bytes) -> Message:
        """Send a request; exactly one response must come back to us. Returns it decoded."""
        actions = self.send(data)
        assert len(actions) == 1, actions
        action = actions[0]
        assert isinstance(action, SendTo)
        assert (action.local, action.remote, action.transport) == (
            self.local,
            self.address,
            self.transport,
        )
        self.last_raw = action.data
        return decode(action.data)

    def login(self) -> Message:
        """An unsigned request; keeps REALM, NONCE and PASSWORD-ALGORITHMS of the 401."""
        response = self.exchange(self.encode(Method.REFRESH, sign=False))
        assert error_code(response) == 401, response
        self.learn(response)
        return response

    def learn(self, response: Message) -> None:
        nonce = response.get(Nonce)
        assert nonce is not None
        self.nonce = nonce.value
        self.offered = response.get(PasswordAlgorithms)

    def request(self, method: int, *attrs: Attribute, tid: bytes | None = None) -> Message:
        """A signed request, logging in first and retrying once on 438 (RFC 8489 9.2.5)."""
        if self.nonce is None:
            self.login()
        response = self.exchange(self.encode(method, *attrs, tid=tid))
        if error_code(response) == 438:
            self.learn(response)
            response = self.exchange(self.encode(method, *attrs, tid=tid))
        return response

    def verified(self, response: Message) -> bool:
        """The response carries MI (or MI-SHA256 for an RFC 8489 client) valid under our key."""
        if self.sha256:
            return response.get(MessageIntegrity) is None and check_integrity_sha256(
                response, self.key
            )
        return response.get(MessageIntegritySha256) is None and check_integrity(response, self.key)

    # --- TURN requests ------------------------------------------------------------------------

    def allocate(self, *attrs: Attribute, tid: bytes | None = None) -> Message:
        return self.request(Method.ALLOCATE, RequestedTransport(TRANSPORT_UDP), *attrs, tid=tid)

    def refresh(self, lifetime: int | None = None, *attrs: Attribute) -> Message:
        more = [] if lifetime is None else [Lifetime(lifetime)]
        return self.request(Method.REFRESH, *more, *attrs)

    def create_permission(self, *peers: Address) -> Message:
        return self.request(Method.CREATE_PERMISSION, *(XorPeerAddress(*p) for p in peers))

    def channel_bind(self, number: int, peer: Address) -> Message:
        return self.request(Method.CHANNEL_BIND, ChannelNumber(number), XorPeerAddress(*peer))

    def send_indication(self, peer: Address | None, data: bytes | None) -> list[Action]:
        attrs: list[Attribute] = []
        if peer is not None:
            attrs.append(XorPeerAddress(*peer))
        if data is not None:
            attrs.append(Data(data))
        return self.send(Message(Method.SEND, MessageClass.INDICATION, attributes=attrs).encode())

    def channel_data(self, number: int, data: bytes) -> list[Action]:
        stream = self.transport is not Transport.UDP
        return self.send(channel_data(number, data, stream=stream))


# --- response helpers ---------------------------------------------------------------------------


def error_code(msg: Message) -> int | None:
    """The ERROR-CODE of an error response (None for a success)."""
    attr = msg.get(ErrorCode)
    return None if attr is None else attr.code


def is_success(msg: Message) -> bool:
    return msg.cls is MessageClass.SUCCESS


def relayed(msg: Message) -> list[Address]:
    """The XOR-RELAYED-ADDRESS values of an Allocate success."""
    return [a.address for a in msg.get_all(XorRelayedAddress)]


def attribute_types(msg: Message) -> list[type[Attribute]]:
    return [type(a) for a in msg.attributes]
