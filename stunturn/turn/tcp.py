"""RFC 6062 TCP allocations, the sans-IO half: peer data connections and their states.

A TCP allocation's relayed address is a listening TCP socket. Each TCP connection between the
relayed address and a peer is a :class:`PeerConnection` with a 32-bit CONNECTION-ID:

* the client asks for one with Connect; the I/O layer connects and reports the outcome
  (``TurnService.tcp_connected`` / ``tcp_connect_failed``), and only then does the client get
  its answer (success with CONNECTION-ID, or 447);
* a peer connects to the relayed address; if the client has a permission for the peer's IP
  (and the peer policy allows it), the client is told with a ConnectionAttempt indication;
* either way the connection then waits (``PENDING``) for the client to open a new TCP/TLS
  connection to the server and send ConnectionBind with the CONNECTION-ID; from then on
  (``BOUND``) the two TCP connections are spliced by the I/O layer, byte for byte.

A connection left unbound for :data:`BIND_TIMEOUT` seconds is closed (RFC 6062 section 5.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from ..stun import Address
from .allocation import Allocation, FiveTuple, RelayHandle

CONNECT_TIMEOUT = 30.0
"""Seconds the server tries to reach a peer for a Connect before answering 447."""
BIND_TIMEOUT = 30.0
"""RFC 6062 section 5.3: an unbound peer data connection is closed after 30 seconds."""


class PeerState(StrEnum):
    CONNECTING = "connecting"
    """Connect received; the server is connecting to the peer."""
    PENDING = "pending"
    """Connected to the peer; waiting for the client's ConnectionBind."""
    BOUND = "bound"
    """Spliced to a client data connection."""


@dataclass(slots=True, eq=False)
class PeerConnection:
    """One TCP connection between a relayed address and a peer."""

    id: int
    """The CONNECTION-ID (random, unique among this worker's live connections)."""
    allocation: Allocation
    peer: Address
    state: PeerState
    inbound: bool
    """True when the peer connected to us (ConnectionAttempt), False for a Connect."""
    deadline: float = 0.0
    """When a PENDING connection is closed unless bound."""
    transaction_id: bytes = b""
    """Of the Connect request, answered once the connection attempt ends."""
    fingerprint: bool = False
    """Whether the Connect request carried FINGERPRINT (its answer does too)."""
    client: FiveTuple | None = None
    """The client data connection it is bound to."""
    io: object = None
    """The I/O layer's object for this connection."""


class TcpRelayBinder(Protocol):
    """What the core needs from the I/O layer for TCP allocations (on top of RelayBinder)."""

    def bind_tcp(self, host: str, port: int, five_tuple: FiveTuple) -> RelayHandle | None:
        """Listen on ``host:port`` for peers of a TCP allocation; None if the port is taken."""
        ...

    def connect_tcp(self, conn: PeerConnection, relay: RelayHandle) -> None:
        """Start connecting from the relayed address to ``conn.peer``; report the outcome with
        ``TurnService.tcp_connected`` or ``tcp_connect_failed`` (within CONNECT_TIMEOUT)."""
        ...

    def close_tcp(self, conn: PeerConnection) -> None:
        """Close the peer connection (or abandon the attempt) and its client data connection."""
        ...


__all__ = [
    "BIND_TIMEOUT",
    "CONNECT_TIMEOUT",
    "PeerConnection",
    "PeerState",
    "TcpRelayBinder",
]
