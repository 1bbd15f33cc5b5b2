"""Integer keys for addresses, used by the rate limiter and the TURN hot-path tables.

The I/O layer can build them straight from raw ``sockaddr`` bytes, without making strings: an
IP address is its integer value (IPv6 offset by 2**128 so families never collide), a transport
address is ``ip_key << 16 | port``.
"""

from __future__ import annotations

import socket

from ..stun import Address

IPV6_KEY_BIT = 1 << 128


def ip_key(host: str) -> int:
    """An IP address as an integer."""
    if ":" in host:
        return IPV6_KEY_BIT | int.from_bytes(socket.inet_pton(socket.AF_INET6, host), "big")
    return int.from_bytes(socket.inet_aton(host), "big")


def address_key(addr: Address) -> int:
    """A transport address as an integer: ``ip_key(host) << 16 | port``."""
    return (ip_key(addr[0]) << 16) | addr[1]
