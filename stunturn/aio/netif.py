"""Local network interfaces and addresses (Linux), without third-party packages.

IPv4 addresses come from the ``SIOCGIFCONF`` ioctl, IPv6 from ``/proc/net/if_inet6``. Used to
know the server's own addresses (peer policy), to pick a default relay address, to tell "no
NAT" in natprobe and to gather host candidates.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import ipaddress
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

SIOCGIFCONF = 0x8912
_IFREQ_SIZE = 40


@dataclass(frozen=True, slots=True)
class InterfaceAddress:
    interface: str
    address: str

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.address).is_loopback

    @property
    def is_link_local(self) -> bool:
        return ipaddress.ip_address(self.address).is_link_local

    @property
    def v6(self) -> bool:
        return ":" in self.address


def _ipv4_addresses() -> list[InterfaceAddress]:
    out: list[InterfaceAddress] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        size = 64 * _IFREQ_SIZE
        buf = array.array("B", bytes(size))
        addr, _ = buf.buffer_info()
        ifconf = struct.pack("iL", size, addr)
        result = fcntl.ioctl(sock.fileno(), SIOCGIFCONF, ifconf)
        length = struct.unpack("iL", result)[0]
        data = buf.tobytes()[:length]
    for off in range(0, length, _IFREQ_SIZE):
        name = data[off : off + 16].split(b"\0", 1)[0].decode()
        ip = socket.inet_ntoa(data[off + 20 : off + 24])
        out.append(InterfaceAddress(name, ip))
    return out


def _ipv6_addresses() -> list[InterfaceAddress]:
    out: list[InterfaceAddress] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            parts = line.split()
            if len(parts) < 6:
                continue
            ip = ipaddress.IPv6Address(bytes.fromhex(parts[0])).compressed
            out.append(InterfaceAddress(parts[5], ip))
    return out


def interface_addresses() -> list[InterfaceAddress]:
    """Every address assigned to a local interface (both families)."""
    try:
        v4 = _ipv4_addresses()
    except OSError:
        v4 = []
    return v4 + _ipv6_addresses()


def route_source(family: int) -> str | None:
    """The source address the kernel would use towards the public Internet, if it has a route.

    Uses ``connect()`` on a UDP socket to a documentation address, which consults the routing
    table without sending anything.
    """
    target = ("192.0.2.1", 9) if family == socket.AF_INET else ("2001:db8::1", 9)
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(target)
            host: str = sock.getsockname()[0]
    except OSError:
        return None
    return host
