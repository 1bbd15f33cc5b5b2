"""What the sans-IO server core asks the I/O layer to do."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ..stun import Address


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
