"""TURN allocations, permissions and channels: the data the control plane keeps current.

The I/O layer's relay hot path reads these structures and never checks a clock: the core's
timer removes permissions, channels and allocations the moment they expire, so "present in
the dict" means "valid now".

Addresses in the hot-path tables are integer keys (:mod:`stunturn.server.keys`), so the I/O
layer can build them straight from raw ``sockaddr`` bytes without making strings; a channel
route for a client is ``address_key(client) << 16 | channel``.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..server.actions import Transport
from ..server.keys import ip_key
from ..stun import Address

if TYPE_CHECKING:
    from .tcp import PeerConnection

FiveTuple = tuple[Transport, Address, Address]
"""(client transport, client address, server address the client talks to)."""


class RelayHandle(Protocol):
    """A relay socket bound by the I/O layer for one allocation and address family."""

    address: Address
    """The relayed transport address (XOR-RELAYED-ADDRESS)."""
    allocation: Allocation | None
    """Set by the core once the allocation exists; the I/O layer's peer path reads it."""

    def sendto(self, data: bytes | memoryview, peer: Address, /) -> int:
        """Send a datagram from the relay address to a peer (may raise OSError)."""
        ...


class RelayBinder(Protocol):
    """The I/O layer's side of relay sockets; the core never touches a socket itself."""

    def bind(
        self, host: str, port: int, five_tuple: FiveTuple, dont_fragment: bool
    ) -> RelayHandle | None:
        """Bind ``host:port`` for the allocation of ``five_tuple``; None if the port is taken."""
        ...

    def close(self, handle: RelayHandle) -> None:
        """Release a relay socket."""
        ...

    def available(self, host: str, port: int) -> bool:
        """Whether ``host:port`` could be bound right now (for EVEN-PORT reservations)."""
        ...


@dataclass(slots=True, eq=False)
class Channel:
    """A channel binding (RFC 8656 section 12)."""

    number: int
    peer: Address
    expires: float


@dataclass(slots=True, eq=False)
class ChannelRoute:
    """What the client-to-peer hot path needs for one channel: where to send, and counters."""

    relay: RelayHandle
    peer: Address
    peer_ip: int
    """ip_key of the peer: ChannelData is relayed only while its permission lasts."""
    allocation: Allocation
    io_cache: object = None
    """Free for the I/O layer to keep its own form of the route (e.g. a raw sockaddr)."""


@dataclass(slots=True, eq=False)
class Allocation:
    """One allocation, keyed by its 5-tuple (RFC 8656 section 2.2)."""

    id: int
    five_tuple: FiveTuple
    username: str
    key: bytes
    sha256: bool
    relays: list[RelayHandle]
    expires: float
    created: float
    transaction_id: bytes = b""
    response: bytes = b""
    """The success response of the Allocate that created it, resent on retransmission."""
    credential_expires: int | None = None
    client_ip: str = ""
    dont_fragment: bool = False
    permissions: dict[int, float] = field(default_factory=dict)
    """ip_key(peer IP) -> expiry."""
    channels: dict[int, Channel] = field(default_factory=dict)
    """Channel number -> binding."""
    peer_channels: dict[int, int] = field(default_factory=dict)
    """address_key(peer) -> channel number, for the peer-to-client hot path."""
    cooldown: dict[int, tuple[int, float]] = field(default_factory=dict)
    """Expired channel number -> (address_key(peer), until): not re-bindable to others yet."""
    bytes_to_peer: int = 0
    packets_to_peer: int = 0
    bytes_to_client: int = 0
    packets_to_client: int = 0
    max_bps: int = 0
    """Bytes per second allowed each way (0: unlimited); see :meth:`within_rate`."""
    tcp: bool = False
    """An RFC 6062 TCP allocation: its relays listen for and connect to TCP peers."""
    peer_conns: dict[Address, PeerConnection] = field(default_factory=dict)
    """TCP allocations: peer address -> its connection (connecting, pending or bound)."""
    _tokens: list[float] = field(default_factory=lambda: [0.0, 0.0, -1.0])
    """Token buckets for ``max_bps``: [to peer, to client, last refill time]."""

    @property
    def client(self) -> Address:
        return self.five_tuple[1]

    @property
    def families(self) -> set[int]:
        """Address families of the relays (socket.AF_INET / AF_INET6)."""
        return {socket.AF_INET6 if ":" in r.address[0] else socket.AF_INET for r in self.relays}

    def relay_for(self, peer_host: str) -> RelayHandle | None:
        """The relay of the peer's family, or None (443 Peer Address Family Mismatch)."""
        v6 = ":" in peer_host
        for relay in self.relays:
            if (":" in relay.address[0]) == v6:
                return relay
        return None

    def permitted(self, peer_host: str) -> bool:
        return ip_key(peer_host) in self.permissions

    def within_rate(self, nbytes: int, to_client: bool, now: float) -> bool:
        """Spend ``nbytes`` of the ``max_bps`` budget in one direction; False: drop the datagram.

        A token bucket per direction holding at most one second of traffic. Only called by the
        I/O layer when ``max_bps`` is set, so unlimited allocations pay nothing for it.
        """
        tokens = self._tokens
        # The bucket holds a second of traffic, and at least one largest datagram.
        rate = float(self.max_bps)
        capacity = max(rate, 65536.0)
        if tokens[2] < 0:
            tokens[0] = tokens[1] = capacity
        else:
            gained = (now - tokens[2]) * rate
            tokens[0] = min(capacity, tokens[0] + gained)
            tokens[1] = min(capacity, tokens[1] + gained)
        tokens[2] = now
        side = 1 if to_client else 0
        if tokens[side] < nbytes:
            return False
        tokens[side] -= nbytes
        return True
