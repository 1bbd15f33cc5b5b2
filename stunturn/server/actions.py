"""What the sans-IO server core asks the I/O layer to do."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from ..stun import Address

if TYPE_CHECKING:
    from ..turn.allocation import RelayHandle


class Transport(StrEnum):
    """Client-facing transport of a request."""

    UDP = "udp"
    TCP = "tcp"
    TLS = "tls"


@dataclass(frozen=True, slots=True)
class SendTo:
    """Send ``data`` from the listener bound to ``local`` to ``remote``.

    For stream transports ``local``/``remote`` name the connection the data goes out on.
    """

    data: bytes
    local: Address
    remote: Address
    transport: Transport = Transport.UDP


@dataclass(frozen=True, slots=True)
class RelayTo:
    """Send ``data`` from a TURN relay socket to ``peer``."""

    relay: RelayHandle
    data: bytes
    peer: Address


@dataclass(frozen=True, slots=True)
class Splice:
    """After the ConnectionBind success before it: join the client connection ``remote`` ->
    ``local`` to the peer connection ``peer_connection`` (RFC 6062); no STUN on it after."""

    peer_connection: object
    local: Address
    remote: Address
    transport: Transport


Action = SendTo | RelayTo
StreamAction = SendTo | RelayTo | Splice
"""What a frame from a TCP/TLS connection may lead to."""
