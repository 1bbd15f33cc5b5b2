"""Which peers a TURN allocation may talk to.

Relaying into private networks is the first risk of running TURN in public: a client could use
the relay to reach the server's LAN, its cloud metadata service (169.254.169.254) or services on
the server host itself. So by default every IANA special-purpose range is denied, on every path
(CreatePermission, ChannelBind, Send), and so are the server's own addresses.

Decision order (first match wins):

1. ``deny-peer`` ranges: denied.
2. The server's own IPs: denied, except a port inside the relay port range on one of our relay
   IPs, so two clients of the same server can still reach each other relay-to-relay (that
   traffic lands on another allocation, which enforces its own permissions); that case goes on
   to the next rules.
3. ``allow-peer`` ranges (and ``--allow-loopback-peers``): allowed.
4. IANA special-purpose ranges: denied. IPv6 forms that embed an IPv4 address
   (IPv4-mapped, IPv4-compatible, NAT64 64:ff9b::/96 and 64:ff9b:1::/48, 6to4 2002::/16) are
   judged by the embedded IPv4 address, through these same rules.
5. Anything else: allowed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SPECIAL_V4: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "this network"),
    ("10.0.0.0/8", "private-use"),
    ("100.64.0.0/10", "shared address space (CGNAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private-use"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation (TEST-NET-1)"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private-use"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved (includes broadcast)"),
)

SPECIAL_V6: tuple[tuple[str, str], ...] = (
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("100::/64", "discard-only"),
    ("2001::/23", "IETF protocol assignments"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation (RFC 9637)"),
    ("5f00::/16", "SRv6 SIDs (RFC 9602)"),
    ("fc00::/7", "unique-local"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
)

LOOPBACK = ("127.0.0.0/8", "::1/128")

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_COMPAT = ipaddress.IPv6Network("::/96")
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_6TO4 = ipaddress.IPv6Network("2002::/16")


def _v4(value: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(value & 0xFFFFFFFF)


def _rfc6052_embeddings(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses ``ip`` can carry under the RFC 6052 layouts a /48 prefix allows.

    A local-use NAT64 prefix inside 64:ff9b:1::/48 may be /48, /56, /64 or /96 long and we
    cannot know which the operator chose. A layout is a possible reading when its "u" octet
    (bits 64-71) and its suffix bits are zero, as RFC 6052 section 2.2 requires. The /96
    reading is always possible. Every possible reading is judged; one bad reading denies.
    """
    b = int(ip).to_bytes(16, "big")
    readings = []
    for v4_bytes, suffix_start in ((b[6:8] + b[9:11], 11), (b[7:8] + b[9:12], 12)):
        if b[8] == 0 and not any(b[suffix_start:]):
            readings.append(ipaddress.IPv4Address(v4_bytes))
    if b[8] == 0 and not any(b[13:]):
        readings.append(ipaddress.IPv4Address(b[9:13]))
    readings.append(ipaddress.IPv4Address(b[12:16]))  # /96: always a possible reading
    return readings


def embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[list[ipaddress.IPv4Address], str] | None:
    """The IPv4 address(es) an IPv6 address stands for, and the name of the form."""
    if ip in _MAPPED:
        return [_v4(int(ip))], "IPv4-mapped"
    if ip in _COMPAT and int(ip) > 1:
        return [_v4(int(ip))], "IPv4-compatible"
    if ip in _NAT64_WELL_KNOWN:
        return [_v4(int(ip))], "NAT64 64:ff9b::/96"
    if ip in _NAT64_LOCAL:
        return _rfc6052_embeddings(ip), "NAT64 64:ff9b:1::/48"
    if ip in _6TO4:
        return [_v4(int(ip) >> 80)], "6to4 2002::/16"
    return None


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether a peer is allowed and the rule that decided."""

    allowed: bool
    rule: str

    def __str__(self) -> str:
        return f"{'allowed' if self.allowed else 'denied'} ({self.rule})"


def parse_networks(entries: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Parse CIDR strings (a bare address means /32 or /128).

    Raises ValueError naming the bad entry.
    """
    out: list[IPNetwork] = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP network (CIDR)") from None
    return tuple(out)


@dataclass(frozen=True, slots=True)
class PeerPolicy:
    """The peer policy; see the module docstring for the decision order."""

    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    own_ips: frozenset[str] = frozenset()
    relay_ips: frozenset[str] = frozenset()
    relay_ports: tuple[int, int] = (49152, 65535)
    _special: tuple[tuple[IPNetwork, str], ...] = field(
        default=tuple(
            (ipaddress.ip_network(net), f"special-purpose {net} ({name})")
            for net, name in SPECIAL_V4 + SPECIAL_V6
        ),
        repr=False,
    )

    def check(self, host: str, port: int | None = None) -> Decision:
        """Judge a peer. ``port`` None means any port (CreatePermission installs per IP)."""
        try:
            ip = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return Decision(False, f"not an IP address: {host!r}")
        return self._judge(ip, port, None)

    def allowed(self, host: str, port: int | None = None) -> bool:
        return self.check(host, port).allowed

    def _judge(self, ip: IPAddress, port: int | None, via: str | None) -> Decision:
        suffix = f" via {via}" if via else ""
        for net in self.deny:
            if ip.version == net.version and ip in net:
                return Decision(False, f"deny-peer {net}{suffix}")
        text = ip.compressed
        if text in self.own_ips:
            low, high = self.relay_ports
            relay_port = port is None or low <= port <= high
            if not (text in self.relay_ips and relay_port):
                return Decision(False, f"server's own address {text}{suffix}")
        for net in self.allow:
            if ip.version == net.version and ip in net:
                return Decision(True, f"allow-peer {net}{suffix}")
        if isinstance(ip, ipaddress.IPv6Address) and via is None:
            embedded = embedded_ipv4(ip)
            if embedded is not None:
                addresses, form = embedded
                for v4 in addresses:
                    decision = self._judge(v4, port, f"{form} {ip.compressed}")
                    if not decision.allowed:
                        return decision
                shown = ", ".join(str(a) for a in dict.fromkeys(addresses))
                return Decision(True, f"embedded IPv4 {shown} allowed ({form})")
        for net, rule in self._special:
            if ip.version == net.version and ip in net:
                return Decision(False, rule + suffix)
        return Decision(True, f"default allow (public address){suffix}")
