"""A sans-IO TURN client (RFC 8656, RFC 6156) with long-term credentials (RFC 8489 section 9.2).

:class:`TurnClientCore` never touches a socket or a clock. It is driven by three inputs, each
taking ``now``: bytes from the server (:meth:`~TurnClientCore.receive`), the timer
(:meth:`~TurnClientCore.on_timer`, due at :meth:`~TurnClientCore.next_deadline`) and the API
user (:meth:`~TurnClientCore.allocate`, :meth:`~TurnClientCore.send`, ...). Each call returns a
list of outputs: :class:`Transmit` (bytes for the server) and events (:class:`Allocated`,
:class:`PermissionCreated`, :class:`ChannelBound`, :class:`DataReceived`, :class:`Failed`, ...).

What it does for the user:

* answers the 401 challenge (REALM, NONCE; SHA-256 when an RFC 8489 server offers it in
  PASSWORD-ALGORITHMS behind the nonce cookie, else MD5 with MESSAGE-INTEGRITY) and 438 Stale
  Nonce, and checks the integrity of every response to a signed request;
* refreshes the allocation before it expires (at lifetime - 60 s, or half the lifetime when
  that is later), permissions every 240 s and channels every 540 s while they carry traffic
  (data sent or received since the previous refresh; an explicit create/bind counts as use);
* installs permissions lazily: data for a peer whose IP has none starts a CreatePermission and
  waits in a bounded queue (:data:`QUEUE_PER_IP` datagrams per IP, the rest dropped and
  counted) until it succeeds;
* frames data as ChannelData when a channel is bound for the peer (padded over TCP/TLS), else
  as a Send indication, and decodes Data indications and ChannelData;
* retransmits requests over UDP (RFC 8489 section 6.2.1) and sends them once over TCP/TLS.

Errors are split as h11 does: calling the API in a state that does not allow it raises
:class:`TurnUsageError`; whatever the server does wrong or refuses becomes an event
(:class:`Failed`, :class:`PermissionFailed`, :class:`ChannelBindFailed`). Input that does not
parse is counted in :attr:`TurnClientCore.stats` and dropped.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import socket
import struct
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from ..auth.nonce import FEATURE_PASSWORD_ALGORITHMS, NONCE_COOKIE_PREFIX, features_of
from ..server.actions import Transport
from ..stun import (
    FAMILY_IPV4,
    FAMILY_IPV6,
    PASSWORD_ALGORITHM_MD5,
    PASSWORD_ALGORITHM_SHA256,
    REASONS,
    TRANSPORT_UDP,
    Address,
    Attribute,
    Message,
    MessageClass,
    Method,
    StreamFramer,
    StunParseError,
    check_integrity,
    check_integrity_sha256,
    decode,
    long_term_key,
    new_transaction_id,
    opaque_string,
)
from ..stun.attributes import (
    ChannelNumber,
    Data,
    ErrorCode,
    Icmp,
    Lifetime,
    MessageIntegrity,
    MessageIntegritySha256,
    Nonce,
    PasswordAlgorithm,
    PasswordAlgorithms,
    Realm,
    RequestedAddressFamily,
    RequestedTransport,
    Username,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
)
from ..stun.transaction import RFC8489_DEFAULT, ClientTransaction, RetransmitPolicy

log = logging.getLogger("stunturn.turn.client")

PERMISSION_LIFETIME = 300.0
"""RFC 8656 section 9: a permission lasts 300 s (not negotiable)."""
PERMISSION_REFRESH = 240.0
CHANNEL_LIFETIME = 600.0
"""RFC 8656 section 12: a channel binding lasts 600 s."""
CHANNEL_REFRESH = 540.0
CHANNEL_COOLDOWN = 300.0
"""RFC 8656 section 12.2: a number or peer may not be rebound to another for 5 minutes."""
ALLOCATION_MARGIN = 60.0
"""Refresh the allocation this long before it expires (or at half its lifetime if later)."""
QUEUE_PER_IP = 32
"""Datagrams kept per peer IP while its permission is being installed."""
RETRY_AFTER_FAILURE = 10.0
"""Seconds a refused permission is not retried for data sent to it (an explicit
:meth:`TurnClientCore.create_permission` always retries)."""
MAX_AUTH_RETRIES = 3
"""401/438 challenges answered per request before giving up."""
CHANNEL_FIRST, CHANNEL_LAST = 0x4000, 0x4FFF
"""RFC 8656 section 12: the channel numbers a client uses."""

_SERVER: Address = ("", 0)
"""ClientTransaction wants a destination; the I/O layer talks to one server only."""
_CHANNEL_HEAD = struct.Struct("!HH")
_PAD = (b"", b"\x00\x00\x00", b"\x00\x00", b"\x00")


class TurnUsageError(RuntimeError):
    """The API was called in a state that does not allow it (e.g. send before Allocated)."""


# --- outputs ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transmit:
    """Bytes to send to the server (one datagram over UDP; stream bytes over TCP/TLS)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Allocated:
    """The allocation exists: the relayed address peers send to, our address as the server
    saw it, and the lifetime granted (seconds)."""

    relayed: Address
    mapped: Address | None
    lifetime: int


@dataclass(frozen=True, slots=True)
class Refreshed:
    """A Refresh succeeded; the allocation now lasts ``lifetime`` more seconds."""

    lifetime: int


@dataclass(frozen=True, slots=True)
class PermissionCreated:
    """A permission for ``ip`` was installed or refreshed."""

    ip: str


@dataclass(frozen=True, slots=True)
class PermissionFailed:
    """CreatePermission for ``ip`` was refused or timed out; data queued for it was dropped."""

    ip: str
    reason: str
    error_code: int | None = None


@dataclass(frozen=True, slots=True)
class ChannelBound:
    """Channel ``number`` is bound (or was rebound) to ``peer``."""

    peer: Address
    number: int


@dataclass(frozen=True, slots=True)
class ChannelBindFailed:
    """ChannelBind for ``peer`` was refused or timed out."""

    peer: Address
    reason: str
    error_code: int | None = None


@dataclass(frozen=True, slots=True)
class DataReceived:
    """``data`` from ``peer``, relayed by the server (Data indication or ChannelData)."""

    peer: Address
    data: bytes


@dataclass(frozen=True, slots=True)
class IcmpReceived:
    """The server reports an ICMP error from ``peer`` (RFC 8656 section 11.4 ICMP attribute)."""

    peer: Address
    icmp_type: int
    icmp_code: int
    error_data: int


@dataclass(frozen=True, slots=True)
class Failed:
    """The allocation is unusable (Allocate or Refresh refused or timed out, stream closed or
    broken). ``error_code`` is the server's ERROR-CODE, or None when there was no answer."""

    reason: str
    error_code: int | None = None


@dataclass(frozen=True, slots=True)
class Closed:
    """:meth:`TurnClientCore.close` finished (the release was answered, refused or timed out)."""


Event = (
    Allocated
    | Refreshed
    | PermissionCreated
    | PermissionFailed
    | ChannelBound
    | ChannelBindFailed
    | DataReceived
    | IcmpReceived
    | Failed
    | Closed
)
Output = Transmit | Event


@dataclass(slots=True)
class ClientStats:
    """What was dropped, and why."""

    queue_dropped: int = 0
    """Datagrams dropped from (or never admitted to) a permission queue."""
    malformed: int = 0
    """Input that did not parse."""
    ignored: int = 0
    """Well-formed input that matched nothing (late responses, unknown channels, ...)."""
    integrity_failures: int = 0
    """Responses dropped because their MESSAGE-INTEGRITY(-SHA256) did not verify."""
    retransmissions: int = 0
    channel_data_sent: int = 0
    send_indications_sent: int = 0
    channel_data_received: int = 0
    data_indications_received: int = 0


# --- the allocation's state table ---------------------------------------------------------------


class State(StrEnum):
    """Allocation lifecycle."""

    IDLE = "idle"
    ALLOCATING = "allocating"
    ALLOCATED = "allocated"
    CLOSING = "closing"
    CLOSED = "closed"
    FAILED = "failed"


_TRANSITIONS: dict[tuple[State, str], State] = {
    (State.IDLE, "allocate"): State.ALLOCATING,
    (State.IDLE, "close"): State.CLOSED,
    (State.IDLE, "fail"): State.FAILED,
    (State.ALLOCATING, "allocated"): State.ALLOCATED,
    (State.ALLOCATING, "fail"): State.FAILED,
    (State.ALLOCATING, "release"): State.CLOSING,
    (State.ALLOCATING, "close"): State.CLOSED,
    (State.ALLOCATED, "fail"): State.FAILED,
    (State.ALLOCATED, "release"): State.CLOSING,
    (State.CLOSING, "closed"): State.CLOSED,
    (State.CLOSING, "fail"): State.CLOSED,
    (State.FAILED, "close"): State.CLOSED,
}
"""Every allowed (state, trigger) -> next state. Anything else is refused."""


# --- internal bookkeeping -----------------------------------------------------------------------


class _Kind(StrEnum):
    ALLOCATE = "allocate"
    REFRESH = "refresh"
    RELEASE = "release"
    PERMISSION = "permission"
    CHANNEL = "channel"


_METHODS = {
    _Kind.ALLOCATE: Method.ALLOCATE,
    _Kind.REFRESH: Method.REFRESH,
    _Kind.RELEASE: Method.REFRESH,
    _Kind.PERMISSION: Method.CREATE_PERMISSION,
    _Kind.CHANNEL: Method.CHANNEL_BIND,
}


@dataclass(slots=True, eq=False)
class _Request:
    kind: _Kind
    attributes: list[Attribute]
    """Without the authentication attributes, which are added per transmission."""
    ips: tuple[str, ...] = ()
    peer: Address = _SERVER
    number: int = 0
    signed: bool = False
    sha256: bool = False
    challenges: int = 0
    transaction: ClientTransaction | None = None


@dataclass(slots=True, eq=False)
class _Permission:
    ip: str
    installed: bool = False
    pending: bool = False
    """A CreatePermission (first or refresh) for this IP is in flight."""
    since: float = 0.0
    """When the request that last installed it was sent: the server's lifetime starts then."""
    used: float = float("-inf")
    retry_at: float = 0.0
    """Refused: data sent before this time is dropped instead of retrying."""
    queue: deque[tuple[Address, bytes]] = field(default_factory=deque)

    @property
    def expires(self) -> float:
        return self.since + PERMISSION_LIFETIME


@dataclass(slots=True, eq=False)
class _Channel:
    peer: Address
    number: int
    bound: bool = False
    pending: bool = False
    since: float = 0.0
    used: float = float("-inf")


class TurnClientCore:
    """One TURN allocation, seen from the client.

    Args:
        username: long-term credential user (prepared with OpaqueString, RFC 8489 14.3).
        password: its password.
        transport: how we reach the server: ``udp``, ``tcp`` or ``tls``.
        lifetime: LIFETIME to ask for in Allocate and Refresh (None: the server's default).
        family: REQUESTED-ADDRESS-FAMILY (``FAMILY_IPV4``/``FAMILY_IPV6``); None asks for
            nothing (IPv4).
        realm: a realm known in advance; the 401 challenge still supplies the nonce.
        nonce: a nonce known in advance (with ``realm``): the first request is signed.
        policy: retransmission timing over UDP and the one timeout over TCP/TLS.
        queue_per_ip: datagrams kept per IP while its permission is being installed.
    """

    def __init__(
        self,
        username: str,
        password: str,
        *,
        transport: Transport | str = Transport.UDP,
        lifetime: int | None = None,
        family: int | None = None,
        realm: str | None = None,
        nonce: str | None = None,
        policy: RetransmitPolicy = RFC8489_DEFAULT,
        queue_per_ip: int = QUEUE_PER_IP,
    ) -> None:
        self.username = opaque_string(username)
        Username(self.username).encode_value(b"")  # raises ValueError when too long
        self.password = password
        opaque_string(password)
        self.transport = Transport(transport)
        self.stream = self.transport is not Transport.UDP
        if lifetime is not None and not 0 < lifetime <= 0xFFFFFFFF:
            raise ValueError(f"lifetime must be positive, not {lifetime}")
        self.requested_lifetime = lifetime
        if family not in (None, FAMILY_IPV4, FAMILY_IPV6):
            raise ValueError(f"family must be FAMILY_IPV4 or FAMILY_IPV6, not {family}")
        self.family = family
        self.policy = policy
        self.queue_per_ip = queue_per_ip
        self.realm = realm
        self.nonce = nonce if realm is not None else None
        self.offered: PasswordAlgorithms | None = None
        """PASSWORD-ALGORITHMS of the last challenge, echoed when an algorithm is chosen."""
        self.password_algorithm = PASSWORD_ALGORITHM_MD5
        self._negotiated = False
        self._keys: dict[tuple[str, int], bytes] = {}
        self.state = State.IDLE
        self.relayed_address: Address | None = None
        self.mapped_address: Address | None = None
        self.lifetime = 0
        """Seconds granted by the last Allocate or Refresh."""
        self.expires = 0.0
        """When the server will drop the allocation unless refreshed (in ``now`` units)."""
        self.stats = ClientStats()
        self._framer = StreamFramer() if self.stream else None
        self._requests: dict[bytes, _Request] = {}
        self._refresh_in_flight = False
        self._permissions: dict[str, _Permission] = {}
        self._channels: dict[Address, _Channel] = {}
        self._bound: dict[Address, _Channel] = {}
        """The hot path's table: peer -> channel, bound channels only."""
        self._by_number: dict[int, _Channel] = {}
        self._cooldown: dict[int, tuple[Address, float]] = {}
        """Numbers of lapsed or failed bindings: number -> (peer, free for others after)."""
        self._next_number = CHANNEL_FIRST
        # One timer: a heap of (when, seq, kind, key); an entry is live while _due[(kind, key)]
        # holds the same time, so rescheduling is a push and stale entries are skipped.
        self._heap: list[tuple[float, int, str, object]] = []
        self._due: dict[tuple[str, object], float] = {}
        self._seq = itertools.count()

    # --- properties ------------------------------------------------------------------------

    @property
    def channels(self) -> dict[Address, int]:
        """Bound channels: peer -> number."""
        return {peer: ch.number for peer, ch in self._bound.items()}

    @property
    def permissions(self) -> frozenset[str]:
        """Peer IPs with an installed permission."""
        return frozenset(ip for ip, p in self._permissions.items() if p.installed)

    @property
    def key(self) -> bytes | None:
        """The long-term key in use (None before the first challenge)."""
        if self.realm is None:
            return None
        cache_key = (self.realm, self.password_algorithm)
        key = self._keys.get(cache_key)
        if key is None:
            key = long_term_key(self.username, self.realm, self.password, self.password_algorithm)
            self._keys[cache_key] = key
        return key

    def _advance(self, trigger: str) -> None:
        new = _TRANSITIONS.get((self.state, trigger))
        if new is None:
            raise TurnUsageError(f"cannot {trigger} while {self.state}")
        log.debug("TURN client %s -> %s (%s)", self.state, new, trigger)
        self.state = new

    # --- API: allocation --------------------------------------------------------------------

    # RFC 8656 section 7.1: Allocate with REQUESTED-TRANSPORT (UDP), optionally
    # REQUESTED-ADDRESS-FAMILY and LIFETIME; the first attempt is usually challenged (401).
    def allocate(self, now: float) -> list[Output]:
        """Start the Allocate transaction."""
        self._advance("allocate")
        attrs: list[Attribute] = [RequestedTransport(TRANSPORT_UDP)]
        if self.family is not None:
            attrs.append(RequestedAddressFamily(self.family))
        if self.requested_lifetime is not None:
            attrs.append(Lifetime(self.requested_lifetime))
        return self._start(_Request(_Kind.ALLOCATE, attrs), now)

    # RFC 8656 section 7.3: Refresh with the desired LIFETIME.
    def refresh(self, now: float) -> list[Output]:
        """Refresh the allocation now (it is also refreshed automatically)."""
        self._require_allocated("refresh")
        return self._start_refresh(now)

    # RFC 8656 section 7.3: a Refresh with LIFETIME 0 deletes the allocation.
    def close(self, now: float) -> list[Output]:
        """Release the allocation (Refresh LIFETIME 0); :class:`Closed` follows.

        Pending requests are abandoned and queued data dropped. Idempotent.
        """
        if self.state in (State.CLOSING, State.CLOSED):
            return []
        releasable = self.state is State.ALLOCATED or (
            self.state is State.ALLOCATING and self.nonce is not None
        )
        self._clear()
        if not releasable:
            self._advance("close")
            return [Closed()]
        self._advance("release")
        return self._start(_Request(_Kind.RELEASE, [Lifetime(0)]), now)

    def connection_lost(self, now: float, reason: str = "") -> list[Output]:
        """The TCP/TLS connection ended (RFC 8656 section 3.1: so did the allocation)."""
        if self.state in (State.CLOSED, State.FAILED):
            return []
        if self.state is State.CLOSING:
            self._clear()
            self._advance("closed")
            return [Closed()]
        detail = f": {reason}" if reason else ""
        return self._fail(f"connection to the TURN server closed{detail}", None)

    # --- API: permissions and channels ------------------------------------------------------

    # RFC 8656 section 9.1: one CreatePermission may carry several XOR-PEER-ADDRESSes.
    def create_permission(self, ips: list[str] | tuple[str, ...], now: float) -> list[Output]:
        """Install (or refresh) permissions for ``ips``; one :class:`PermissionCreated` or
        :class:`PermissionFailed` per IP follows. IPs already being installed are not asked
        for twice."""
        self._require_allocated("create a permission")
        wanted: list[str] = []
        for raw in ips:
            ip = normalize_ip(raw)
            perm = self._permissions.get(ip)
            if perm is None:
                perm = self._permissions[ip] = _Permission(ip)
            perm.used = now
            perm.retry_at = 0.0
            if not perm.pending and ip not in wanted:
                wanted.append(ip)
        if not wanted:
            return []
        return self._request_permissions(wanted, now)

    # RFC 8656 section 11.1: ChannelBind with a number in 0x4000-0x4FFF and the peer.
    def bind_channel(self, peer: Address, now: float) -> list[Output]:
        """Bind a channel to ``peer``; :class:`ChannelBound` (or :class:`ChannelBindFailed`)
        follows. Returns no request when the peer already has a channel or one is pending
        (for a bound channel the :class:`ChannelBound` is repeated at once)."""
        self._require_allocated("bind a channel")
        peer = normalize_peer(peer)
        channel = self._channels.get(peer)
        if channel is not None:
            channel.used = now
            if channel.bound and not channel.pending:
                return [ChannelBound(peer, channel.number)]
            return []
        channel = _Channel(peer, self._pick_number(peer, now), used=now)
        self._channels[peer] = channel
        self._by_number[channel.number] = channel
        return self._request_channel(channel, now)

    def channel_number(self, peer: Address) -> int | None:
        """The bound channel of ``peer``, if any."""
        channel = self._bound.get(peer) or self._bound.get(normalize_peer(peer))
        return channel.number if channel is not None else None

    # --- API: data ----------------------------------------------------------------------------

    def send(self, peer: Address, data: bytes, now: float) -> list[Output]:
        """Send ``data`` to ``peer`` through the relay.

        ChannelData when a channel is bound for the peer; else a Send indication when its IP
        has a permission; else the datagram waits while a CreatePermission is started (or is
        dropped when the queue is full or the IP was just refused).
        """
        # RFC 8656 section 12.4: ChannelData, the hot path: one lookup and one pack.
        channel = self._bound.get(peer)
        if channel is not None:
            channel.used = now
            self.stats.channel_data_sent += 1
            return [Transmit(self._channel_data(channel.number, data))]
        if self.state is not State.ALLOCATED:
            raise TurnUsageError(f"cannot send while {self.state}")
        peer = normalize_peer(peer)
        channel = self._bound.get(peer)
        if channel is not None:
            channel.used = now
            self.stats.channel_data_sent += 1
            return [Transmit(self._channel_data(channel.number, data))]
        ip = peer[0]
        # The Send indication's body (XOR-PEER-ADDRESS, DATA header, padded data) must fit
        # in 65535 bytes.
        if len(data) > (0xFFFF - (28 if ":" in ip else 16)) & ~3:
            raise ValueError(f"{len(data)} bytes do not fit in a Send indication")
        perm = self._permissions.get(ip)
        if perm is None:
            perm = self._permissions[ip] = _Permission(ip)
        perm.used = now
        if perm.installed:
            self.stats.send_indications_sent += 1
            return [Transmit(_send_indication(peer, data))]
        if not perm.pending and now < perm.retry_at:
            self.stats.queue_dropped += 1
            return []
        if len(perm.queue) >= self.queue_per_ip:
            self.stats.queue_dropped += 1
        else:
            perm.queue.append((peer, bytes(data)))
        if perm.pending:
            return []
        return self._request_permissions([ip], now)

    def _channel_data(self, number: int, data: bytes) -> bytes:
        n = len(data)
        if n > 0xFFFF:
            raise ValueError(f"{n} bytes do not fit in ChannelData")
        frame = _CHANNEL_HEAD.pack(number, n) + data
        # RFC 8656 section 12.5: over TCP/TLS ChannelData is padded to a multiple of 4.
        return frame + _PAD[n & 3] if self.stream else frame

    # --- input ----------------------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> list[Output]:
        """A datagram from the server (UDP), or the next bytes of the stream (TCP/TLS)."""
        if self._framer is None:
            return self._frame(data, now)
        if self.state in (State.CLOSED, State.FAILED):
            return []
        try:
            frames = self._framer.feed(data)
        except StunParseError as exc:
            self.stats.malformed += 1
            if self.state is State.CLOSING:
                self._clear()
                self._advance("closed")
                return [Closed()]
            return self._fail(f"TURN stream broken: {exc}", None)
        out: list[Output] = []
        for frame in frames:
            out += self._frame(frame, now)
        return out

    def _frame(self, data: bytes, now: float) -> list[Output]:
        if len(data) >= 4 and 0x40 <= data[0] < 0x80:
            # RFC 8656 section 12.6: ChannelData from the server.
            channel = self._by_number.get((data[0] << 8) | data[1])
            length = (data[2] << 8) | data[3]
            if channel is None or length > len(data) - 4:
                self.stats.ignored += 1
                return []
            channel.used = now
            self.stats.channel_data_received += 1
            return [DataReceived(channel.peer, data[4 : 4 + length])]
        try:
            msg = decode(data)
        except StunParseError:
            self.stats.malformed += 1
            return []
        if msg.cls is MessageClass.INDICATION:
            if msg.method == Method.DATA:
                return self._data_indication(msg, now)
            self.stats.ignored += 1
            return []
        if msg.cls is MessageClass.REQUEST:
            self.stats.ignored += 1
            return []
        return self._response(msg, now)

    # RFC 8656 section 11.6: a Data indication carries XOR-PEER-ADDRESS and DATA (or ICMP).
    def _data_indication(self, msg: Message, now: float) -> list[Output]:
        peer_attr = msg.get(XorPeerAddress)
        data = msg.get(Data)
        if peer_attr is None or self.state is not State.ALLOCATED:
            self.stats.ignored += 1
            return []
        peer = peer_attr.address
        perm = self._permissions.get(peer[0])
        if perm is not None:
            perm.used = now
        if data is not None:
            self.stats.data_indications_received += 1
            return [DataReceived(peer, data.value)]
        icmp = msg.get(Icmp)
        if icmp is not None:
            return [IcmpReceived(peer, icmp.icmp_type, icmp.icmp_code, icmp.error_data)]
        self.stats.ignored += 1
        return []

    # --- timer ------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` next has work (None: nothing scheduled)."""
        heap, due = self._heap, self._due
        while heap:
            when, _, kind, key = heap[0]
            if due.get((kind, key)) == when:
                return when
            heapq.heappop(heap)
        return None

    def on_timer(self, now: float) -> list[Output]:
        """Retransmit, time out, refresh and expire whatever is due at ``now``."""
        out: list[Output] = []
        refresh_ips: list[str] = []
        heap, due = self._heap, self._due
        while heap and heap[0][0] <= now:
            when, _, kind, key = heapq.heappop(heap)
            if due.get((kind, key)) != when:
                continue
            del due[(kind, key)]
            if kind == "tx":
                assert isinstance(key, bytes)
                out += self._transaction_timer(key, now)
            elif kind == "allocation":
                if self.state is State.ALLOCATED and not self._refresh_in_flight:
                    out += self._start_refresh(now)
            elif kind == "permission":
                assert isinstance(key, str)
                if self._permission_timer(key, now):
                    refresh_ips.append(key)
            elif kind == "channel":
                assert isinstance(key, tuple)
                out += self._channel_timer((key[0], key[1]), now)
            elif kind == "cooldown":
                assert isinstance(key, int)
                cooling = self._cooldown.get(key)
                if cooling is not None and cooling[1] <= now:
                    del self._cooldown[key]
        if refresh_ips and self.state is State.ALLOCATED:
            out += self._request_permissions(refresh_ips, now)
        return out

    def _schedule(self, kind: str, key: object, when: float) -> None:
        self._due[(kind, key)] = when
        heapq.heappush(self._heap, (when, next(self._seq), kind, key))

    def _cancel(self, kind: str, key: object) -> None:
        self._due.pop((kind, key), None)

    # --- transactions ---------------------------------------------------------------------------

    def _start(self, request: _Request, now: float) -> list[Output]:
        """Sign (when a nonce is known), encode and send a request in a new transaction."""
        msg = Message(
            _METHODS[request.kind],
            MessageClass.REQUEST,
            new_transaction_id(),
            list(request.attributes),
        )
        key = self.key if self.nonce is not None else None
        request.signed = key is not None
        request.sha256 = self._negotiated
        if key is None:
            data = msg.encode()
        else:
            assert self.realm is not None and self.nonce is not None
            msg.attributes += [Username(self.username), Realm(self.realm), Nonce(self.nonce)]
            if self._negotiated:
                # RFC 8489 section 9.2.3.2: echo PASSWORD-ALGORITHMS, name the chosen one.
                assert self.offered is not None
                msg.attributes += [self.offered, PasswordAlgorithm(self.password_algorithm)]
            data = msg.encode(key, sha1=not self._negotiated, sha256=self._negotiated)
        tx = ClientTransaction(msg.transaction_id, data, _SERVER, self.policy, reliable=self.stream)
        request.transaction = tx
        self._requests[tx.tid] = request
        first = tx.start(now)
        self._schedule("tx", tx.tid, tx.deadline)
        return [Transmit(first)]

    def _transaction_timer(self, tid: bytes, now: float) -> list[Output]:
        request = self._requests.get(tid)
        if request is None or request.transaction is None:
            return []
        tx = request.transaction
        again = tx.on_timer(now)
        if again is not None:
            self.stats.retransmissions += 1
            self._schedule("tx", tid, tx.deadline)
            return [Transmit(again)]
        if not tx.timed_out(now):
            self._schedule("tx", tid, tx.deadline)
            return []
        del self._requests[tid]
        name = Method(_METHODS[request.kind]).name
        return self._request_failed(request, f"{name} timed out", None, now)

    def _response(self, msg: Message, now: float) -> list[Output]:
        request = self._requests.get(msg.transaction_id)
        if request is None or msg.method != _METHODS[request.kind]:
            self.stats.ignored += 1  # a late or duplicate answer
            return []
        if not self._authentic(msg, request):
            self.stats.integrity_failures += 1
            return []  # as if never received (RFC 8489 section 9.2.5); keep waiting
        del self._requests[msg.transaction_id]
        self._cancel("tx", msg.transaction_id)
        if msg.cls is MessageClass.SUCCESS:
            return self._success(request, msg, now)
        error = msg.get(ErrorCode)
        code = error.code if error is not None else 400
        reason = (error.reason if error is not None else "") or REASONS.get(code, "")
        if code in (401, 438) and request.challenges < MAX_AUTH_RETRIES:
            problem = self._challenge(msg, code, request)
            if problem is None:
                request.challenges += 1
                return self._start(request, now)
            reason = problem
        name = Method(_METHODS[request.kind]).name
        return self._request_failed(request, f"{name}: {code} {reason}".rstrip(), code, now)

    def _authentic(self, msg: Message, request: _Request) -> bool:
        """RFC 8489 section 9.2.5: a response to a signed request must carry the same kind of
        integrity attribute and verify under our key. Unsigned error responses (401, 438 and
        servers that do not sign errors) are accepted; unsigned successes are not."""
        if not request.signed:
            return True
        key = self.key
        assert key is not None
        if request.sha256:
            if msg.get(MessageIntegritySha256) is None:
                return msg.cls is MessageClass.ERROR and msg.get(MessageIntegrity) is None
            return check_integrity_sha256(msg, key)
        if msg.get(MessageIntegrity) is None:
            return msg.cls is MessageClass.ERROR and msg.get(MessageIntegritySha256) is None
        return check_integrity(msg, key)

    # RFC 8489 sections 9.2.5 and 9.2.3: learn REALM and NONCE from 401/438, and the password
    # algorithm from PASSWORD-ALGORITHMS when the nonce cookie announces it.
    def _challenge(self, msg: Message, code: int, request: _Request) -> str | None:
        """Take what a 401/438 says; returns why we cannot retry, or None to retry."""
        if code == 401 and request.signed:
            return "credentials refused (401 to a signed request)"
        nonce = msg.get(Nonce)
        realm = msg.get(Realm)
        if nonce is None or (realm is None and self.realm is None):
            return f"{code} without REALM or NONCE"
        offered = msg.get(PasswordAlgorithms)
        algorithms = (
            offered
            if offered is not None
            and nonce.value.startswith(NONCE_COOKIE_PREFIX)
            and features_of(nonce.value) & FEATURE_PASSWORD_ALGORITHMS
            else None
        )
        if algorithms is None and self._negotiated:
            # RFC 8489 section 9.2.5: the server announced algorithms before and no longer
            # does: a bid-down attack, or a changed server; do not fall back to MD5 silently.
            return "server stopped offering PASSWORD-ALGORITHMS (bid-down?)"
        if algorithms is not None:
            choices = [algorithm for algorithm, _ in algorithms.algorithms]
            if PASSWORD_ALGORITHM_SHA256 in choices:
                self.password_algorithm = PASSWORD_ALGORITHM_SHA256
            elif PASSWORD_ALGORITHM_MD5 in choices:
                self.password_algorithm = PASSWORD_ALGORITHM_MD5
            else:
                return f"no supported password algorithm in {choices}"
            self._negotiated = True
            self.offered = algorithms
        if realm is not None:
            self.realm = realm.value
        self.nonce = nonce.value
        return None

    def _request_failed(
        self, request: _Request, reason: str, code: int | None, now: float
    ) -> list[Output]:
        kind = request.kind
        if kind is _Kind.ALLOCATE or kind is _Kind.REFRESH:
            self._refresh_in_flight = False
            if self.state in (State.ALLOCATING, State.ALLOCATED):
                return self._fail(reason, code)
            return []
        if kind is _Kind.RELEASE:
            if self.state is State.CLOSING:
                self._advance("closed")
                return [Closed()]
            return []
        if kind is _Kind.PERMISSION:
            out: list[Output] = []
            for ip in request.ips:
                perm = self._permissions.get(ip)
                if perm is None:
                    continue
                perm.pending = False
                self.stats.queue_dropped += len(perm.queue)
                perm.queue.clear()
                perm.installed = False
                perm.retry_at = now + RETRY_AFTER_FAILURE
                self._schedule("permission", ip, perm.retry_at)
                out.append(PermissionFailed(ip, reason, code))
            return out
        channel = self._channels.get(request.peer)
        if channel is None or channel.number != request.number:
            return []
        self._drop_channel(channel, now + CHANNEL_LIFETIME)
        return [ChannelBindFailed(channel.peer, reason, code)]

    def _success(self, request: _Request, msg: Message, now: float) -> list[Output]:
        assert request.transaction is not None
        sent = request.transaction.started
        kind = request.kind
        if kind is _Kind.ALLOCATE:
            return self._allocated(msg, sent)
        if kind is _Kind.REFRESH:
            self._refresh_in_flight = False
            if self.state is not State.ALLOCATED:
                return []
            lifetime = msg.get(Lifetime)
            self._granted(lifetime.seconds if lifetime is not None else self.lifetime, sent)
            return [Refreshed(self.lifetime)]
        if kind is _Kind.RELEASE:
            if self.state is State.CLOSING:
                self._advance("closed")
                return [Closed()]
            return []
        if kind is _Kind.PERMISSION:
            out: list[Output] = []
            for ip in request.ips:
                perm = self._permissions.get(ip)
                if perm is None:
                    continue
                perm.pending = False
                out.append(PermissionCreated(ip))
                out += self._installed(perm, sent)
            return out
        return self._channel_bound(request, sent)

    # --- allocation -----------------------------------------------------------------------------

    # RFC 8656 section 7.3: the success carries XOR-RELAYED-ADDRESS, LIFETIME and (usually)
    # XOR-MAPPED-ADDRESS.
    def _allocated(self, msg: Message, sent: float) -> list[Output]:
        if self.state is not State.ALLOCATING:
            return []
        relayed = msg.get(XorRelayedAddress)
        if relayed is None:
            return self._fail("Allocate success without XOR-RELAYED-ADDRESS", None)
        mapped = msg.get(XorMappedAddress)
        lifetime = msg.get(Lifetime)
        self.relayed_address = relayed.address
        self.mapped_address = mapped.address if mapped is not None else None
        self._advance("allocated")
        self._granted(lifetime.seconds if lifetime is not None else 600, sent)
        return [Allocated(relayed.address, self.mapped_address, self.lifetime)]

    def _granted(self, lifetime: int, sent: float) -> None:
        """Remember a granted lifetime; refresh at lifetime - 60 s, or half of it if later."""
        self.lifetime = lifetime
        self.expires = sent + lifetime
        self._schedule("allocation", 0, sent + max(lifetime - ALLOCATION_MARGIN, lifetime / 2))

    def _start_refresh(self, now: float) -> list[Output]:
        if self._refresh_in_flight:
            return []
        self._refresh_in_flight = True
        attrs: list[Attribute] = []
        if self.requested_lifetime is not None:
            attrs.append(Lifetime(self.requested_lifetime))
        return self._start(_Request(_Kind.REFRESH, attrs), now)

    # --- permissions --------------------------------------------------------------------------

    def _request_permissions(self, ips: list[str], now: float) -> list[Output]:
        for ip in ips:
            self._permissions[ip].pending = True
        attrs: list[Attribute] = [XorPeerAddress(ip, 0) for ip in ips]
        return self._start(_Request(_Kind.PERMISSION, attrs, ips=tuple(ips)), now)

    def _installed(self, perm: _Permission, sent: float) -> list[Output]:
        """The server installed (or refreshed) ``perm`` at ``sent``: flush what waited."""
        perm.installed = True
        perm.retry_at = 0.0
        if sent >= perm.since:
            perm.since = sent
            self._schedule("permission", perm.ip, sent + PERMISSION_REFRESH)
        out: list[Output] = []
        while perm.queue:
            peer, data = perm.queue.popleft()
            channel = self._bound.get(peer)
            if channel is not None:
                self.stats.channel_data_sent += 1
                out.append(Transmit(self._channel_data(channel.number, data)))
            else:
                self.stats.send_indications_sent += 1
                out.append(Transmit(_send_indication(peer, data)))
        return out

    def _permission_timer(self, ip: str, now: float) -> bool:
        """A permission's refresh time or expiry came; True when it should be refreshed."""
        perm = self._permissions.get(ip)
        if perm is None:
            return False
        if not perm.installed:
            if not perm.pending and now >= perm.retry_at:
                del self._permissions[ip]  # the refusal is forgotten
            return False
        if now >= perm.expires:
            if not perm.pending:
                log.debug("TURN permission for %s lapsed", ip)
                del self._permissions[ip]
            else:
                perm.installed = False  # the refresh in flight reinstalls it
            return False
        self._schedule("permission", ip, perm.expires)
        if perm.pending:
            return False
        in_use = perm.used >= perm.since or any(
            ch.used >= perm.since for ch in self._channels.values() if ch.peer[0] == ip
        )
        return in_use

    # --- channels -----------------------------------------------------------------------------

    def _pick_number(self, peer: Address, now: float) -> int:
        """A channel number for ``peer``: its previous one if it had one, else a fresh one,
        else one whose 5-minute cooldown has passed."""
        for number, (cooling_peer, _) in self._cooldown.items():
            if cooling_peer == peer:
                del self._cooldown[number]
                self._cancel("cooldown", number)
                return number
        if self._next_number <= CHANNEL_LAST:
            number = self._next_number
            self._next_number += 1
            return number
        for number, (_, until) in self._cooldown.items():
            if until <= now:
                del self._cooldown[number]
                self._cancel("cooldown", number)
                return number
        raise TurnUsageError("all channel numbers 0x4000-0x4FFF are in use or cooling down")

    def _request_channel(self, channel: _Channel, now: float) -> list[Output]:
        channel.pending = True
        attrs: list[Attribute] = [ChannelNumber(channel.number), XorPeerAddress(*channel.peer)]
        request = _Request(_Kind.CHANNEL, attrs, peer=channel.peer, number=channel.number)
        return self._start(request, now)

    def _channel_bound(self, request: _Request, sent: float) -> list[Output]:
        channel = self._channels.get(request.peer)
        if channel is None or channel.number != request.number:
            return []
        channel.pending = False
        channel.bound = True
        channel.since = max(channel.since, sent)
        self._bound[channel.peer] = channel
        self._schedule("channel", channel.peer, channel.since + CHANNEL_REFRESH)
        out: list[Output] = [ChannelBound(channel.peer, channel.number)]
        # RFC 8656 section 11.2: a successful ChannelBind installs or refreshes the permission
        # for the peer's IP too.
        ip = channel.peer[0]
        perm = self._permissions.get(ip)
        if perm is None:
            perm = self._permissions[ip] = _Permission(ip)
        out += self._installed(perm, sent)
        return out

    def _channel_timer(self, peer: Address, now: float) -> list[Output]:
        channel = self._channels.get(peer)
        if channel is None or not channel.bound:
            return []
        expires = channel.since + CHANNEL_LIFETIME
        if now >= expires:
            if channel.pending:
                channel.bound = False  # the refresh in flight rebinds it
                self._bound.pop(peer, None)
                return []
            log.debug("TURN channel %#06x for %s lapsed", channel.number, peer)
            self._drop_channel(channel, expires)
            return []
        self._schedule("channel", peer, expires)
        if channel.pending or channel.used < channel.since or self.state is not State.ALLOCATED:
            return []
        return self._request_channel(channel, now)

    def _drop_channel(self, channel: _Channel, expired: float) -> None:
        """Forget a channel; its number stays with its peer for the cooldown after ``expired``
        (RFC 8656 section 12.2)."""
        self._channels.pop(channel.peer, None)
        self._bound.pop(channel.peer, None)
        self._by_number.pop(channel.number, None)
        self._cancel("channel", channel.peer)
        until = expired + CHANNEL_COOLDOWN
        self._cooldown[channel.number] = (channel.peer, until)
        self._schedule("cooldown", channel.number, until)

    # --- endings ------------------------------------------------------------------------------

    def _require_allocated(self, what: str) -> None:
        if self.state is not State.ALLOCATED:
            raise TurnUsageError(f"cannot {what} while {self.state}")

    def _clear(self) -> None:
        """Abandon requests, timers and queued data (the allocation is ending)."""
        self._requests.clear()
        self._heap.clear()
        self._due.clear()
        self._refresh_in_flight = False
        for perm in self._permissions.values():
            self.stats.queue_dropped += len(perm.queue)
        self._permissions.clear()
        self._channels.clear()
        self._bound.clear()
        self._by_number.clear()

    def _fail(self, reason: str, code: int | None) -> list[Output]:
        log.debug("TURN client failed: %s", reason)
        self._clear()
        self._advance("fail")
        if self.state is State.CLOSED:
            return [Closed()]
        return [Failed(reason, code)]


# --- helpers ------------------------------------------------------------------------------------


def normalize_ip(host: str) -> str:
    """The canonical text of an IP literal (as the codec decodes it); ValueError otherwise."""
    text = host.partition("%")[0]
    family = socket.AF_INET6 if ":" in text else socket.AF_INET
    try:
        return socket.inet_ntop(family, socket.inet_pton(family, text))
    except (OSError, ValueError):
        raise ValueError(f"peer must be an IP address, not {host!r}") from None


def normalize_peer(peer: Address) -> Address:
    """``(ip, port)`` with the IP in canonical form; ValueError for anything else."""
    host, port = peer
    if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"bad peer port {port!r}")
    return (normalize_ip(host), port)


# RFC 8656 section 10.1: a Send indication carries XOR-PEER-ADDRESS and DATA.
def _send_indication(peer: Address, data: bytes) -> bytes:
    msg = Message(Method.SEND, MessageClass.INDICATION, new_transaction_id())
    msg.attributes += [XorPeerAddress(*peer), Data(bytes(data))]
    return msg.encode()


__all__ = [
    "CHANNEL_FIRST",
    "CHANNEL_LAST",
    "QUEUE_PER_IP",
    "Allocated",
    "ChannelBindFailed",
    "ChannelBound",
    "ClientStats",
    "Closed",
    "DataReceived",
    "Event",
    "Failed",
    "IcmpReceived",
    "Output",
    "PermissionCreated",
    "PermissionFailed",
    "Refreshed",
    "State",
    "Transmit",
    "TurnClientCore",
    "TurnUsageError",
    "normalize_ip",
    "normalize_peer",
]
