"""The TURN peer policy (stunturn/turn/policy.py): which peers a client may relay to.

A table of addresses with the expected decision and rule text, then the operator overrides
(--allow-peer, --deny-peer, --allow-loopback-peers), the server's own addresses, and a sweep over
every special-purpose range the module lists (first and last address inside; the neighbours
just outside are judged by some other rule).
"""

from __future__ import annotations

import ipaddress

import pytest

from stunturn.turn import Decision, PeerPolicy, parse_networks
from stunturn.turn.policy import LOOPBACK, SPECIAL_V4, SPECIAL_V6

DEFAULT = PeerPolicy()


def special(net: str, name: str) -> str:
    return f"special-purpose {net} ({name})"


PUBLIC = "default allow (public address)"
LOOP4 = special("127.0.0.0/8", "loopback")
THIS_NET = special("0.0.0.0/8", "this network")

# (address, allowed, exact rule text)
TABLE: list[tuple[str, bool, str]] = [
    # public addresses
    ("8.8.8.8", True, PUBLIC),
    ("1.1.1.1", True, PUBLIC),
    ("93.184.216.34", True, PUBLIC),
    ("2606:4700:4700::1111", True, PUBLIC),
    ("2001:4860:4860::8888", True, PUBLIC),
    ("2a00:1450:4001:81b::200e", True, PUBLIC),
    # unspecified, loopback and friends
    ("0.0.0.0", False, THIS_NET),
    ("0.255.255.255", False, THIS_NET),
    ("1.0.0.0", True, PUBLIC),
    ("127.0.0.1", False, LOOP4),
    ("127.255.255.254", False, LOOP4),
    ("126.255.255.255", True, PUBLIC),
    ("128.0.0.1", True, PUBLIC),
    ("::", False, special("::/128", "unspecified")),
    ("::1", False, special("::1/128", "loopback")),
    # IPv6 forms that embed an IPv4 address are judged by it
    ("::ffff:127.0.0.1", False, LOOP4 + " via IPv4-mapped ::ffff:7f00:1"),
    ("::ffff:0:0", False, THIS_NET + " via IPv4-mapped ::ffff:0:0"),
    (
        "::ffff:10.1.2.3",
        False,
        special("10.0.0.0/8", "private-use") + " via IPv4-mapped ::ffff:a01:203",
    ),
    ("::ffff:8.8.8.8", True, "embedded IPv4 8.8.8.8 allowed (IPv4-mapped)"),
    ("::127.0.0.1", False, LOOP4 + " via IPv4-compatible ::7f00:1"),
    ("::2", False, THIS_NET + " via IPv4-compatible ::2"),
    ("::8.8.8.8", True, "embedded IPv4 8.8.8.8 allowed (IPv4-compatible)"),
    ("64:ff9b::7f00:1", False, LOOP4 + " via NAT64 64:ff9b::/96 64:ff9b::7f00:1"),
    (
        "64:ff9b::a9fe:a9fe",
        False,
        special("169.254.0.0/16", "link-local") + " via NAT64 64:ff9b::/96 64:ff9b::a9fe:a9fe",
    ),
    ("64:ff9b::808:808", True, "embedded IPv4 8.8.8.8 allowed (NAT64 64:ff9b::/96)"),
    ("2002:7f00:1::", False, LOOP4 + " via 6to4 2002::/16 2002:7f00:1::"),
    (
        "2002:c0a8:101::1",
        False,
        special("192.168.0.0/16", "private-use") + " via 6to4 2002::/16 2002:c0a8:101::1",
    ),
    ("2002:808:808::1", True, "embedded IPv4 8.8.8.8 allowed (6to4 2002::/16)"),
    # NAT64 local-use 64:ff9b:1::/48: every RFC 6052 reading the prefix allows is judged
    ("64:ff9b:1::808:808", True, "embedded IPv4 8.8.8.8 allowed (NAT64 64:ff9b:1::/48)"),
    ("64:ff9b:1::7f00:1", False, LOOP4 + " via NAT64 64:ff9b:1::/48 64:ff9b:1::7f00:1"),
    ("64:ff9b:1:7f00:0:100::", False, LOOP4 + " via NAT64 64:ff9b:1::/48 64:ff9b:1:7f00:0:100::"),
    (
        "64:ff9b:1:0:a:0:100:0",
        False,
        special("10.0.0.0/8", "private-use") + " via NAT64 64:ff9b:1::/48 64:ff9b:1:0:a:0:100:0",
    ),
    (
        "64:ff9b:1:0:8:808:800:0",
        True,
        "embedded IPv4 8.8.8.8, 8.0.0.0 allowed (NAT64 64:ff9b:1::/48)",
    ),
    # a /48-layout public address still has the /96 reading 0.0.0.0: denied (conservative)
    ("64:ff9b:1:808:8:800::", False, THIS_NET + " via NAT64 64:ff9b:1::/48 64:ff9b:1:808:8:800::"),
    # IPv4 special-purpose ranges, inside and just outside
    ("10.0.0.1", False, special("10.0.0.0/8", "private-use")),
    ("10.255.255.255", False, special("10.0.0.0/8", "private-use")),
    ("9.255.255.255", True, PUBLIC),
    ("11.0.0.0", True, PUBLIC),
    ("100.64.0.1", False, special("100.64.0.0/10", "shared address space (CGNAT)")),
    ("100.127.255.255", False, special("100.64.0.0/10", "shared address space (CGNAT)")),
    ("100.63.255.255", True, PUBLIC),
    ("100.128.0.0", True, PUBLIC),
    ("169.254.169.254", False, special("169.254.0.0/16", "link-local")),
    ("169.253.255.255", True, PUBLIC),
    ("169.255.0.0", True, PUBLIC),
    ("172.16.0.1", False, special("172.16.0.0/12", "private-use")),
    ("172.31.255.255", False, special("172.16.0.0/12", "private-use")),
    ("172.15.255.255", True, PUBLIC),
    ("172.32.0.0", True, PUBLIC),
    ("192.0.0.8", False, special("192.0.0.0/24", "IETF protocol assignments")),
    ("192.0.1.0", True, PUBLIC),
    ("192.0.2.1", False, special("192.0.2.0/24", "documentation (TEST-NET-1)")),
    ("192.0.3.0", True, PUBLIC),
    ("192.88.99.1", False, special("192.88.99.0/24", "6to4 relay anycast")),
    ("192.88.98.255", True, PUBLIC),
    ("192.88.100.0", True, PUBLIC),
    ("192.168.1.1", False, special("192.168.0.0/16", "private-use")),
    ("192.167.255.255", True, PUBLIC),
    ("192.169.0.0", True, PUBLIC),
    ("198.18.0.1", False, special("198.18.0.0/15", "benchmarking")),
    ("198.19.255.255", False, special("198.18.0.0/15", "benchmarking")),
    ("198.17.255.255", True, PUBLIC),
    ("198.20.0.0", True, PUBLIC),
    ("198.51.100.1", False, special("198.51.100.0/24", "documentation (TEST-NET-2)")),
    ("198.51.101.0", True, PUBLIC),
    ("203.0.113.1", False, special("203.0.113.0/24", "documentation (TEST-NET-3)")),
    ("203.0.114.0", True, PUBLIC),
    ("203.0.112.255", True, PUBLIC),
    ("224.0.0.1", False, special("224.0.0.0/4", "multicast")),
    ("239.255.255.255", False, special("224.0.0.0/4", "multicast")),
    ("223.255.255.255", True, PUBLIC),
    ("240.0.0.1", False, special("240.0.0.0/4", "reserved (includes broadcast)")),
    ("255.255.255.255", False, special("240.0.0.0/4", "reserved (includes broadcast)")),
    # IPv6 special-purpose ranges, inside and just outside
    ("100::1", False, special("100::/64", "discard-only")),
    ("100:0:0:1::", True, PUBLIC),
    ("2001::1", False, special("2001::/23", "IETF protocol assignments")),  # Teredo
    ("2001:1ff:ffff::1", False, special("2001::/23", "IETF protocol assignments")),
    ("2001:200::1", True, PUBLIC),
    ("2001:db8::1", False, special("2001:db8::/32", "documentation")),
    ("2001:db7:ffff::1", True, PUBLIC),
    ("2001:db9::1", True, PUBLIC),
    ("fc00::1", False, special("fc00::/7", "unique-local")),
    ("fdff:ffff::1", False, special("fc00::/7", "unique-local")),
    ("fbff:ffff::1", True, PUBLIC),
    ("fe80::1", False, special("fe80::/10", "link-local")),
    ("fe80::1%eth0", False, special("fe80::/10", "link-local")),
    ("febf:ffff::1", False, special("fe80::/10", "link-local")),
    ("fec0::1", False, special("fec0::/10", "site-local (deprecated)")),
    ("ff02::1", False, special("ff00::/8", "multicast")),
    ("ff0e::1", False, special("ff00::/8", "multicast")),
    # not an address at all
    ("example.com", False, "not an IP address: 'example.com'"),
    ("", False, "not an IP address: ''"),
]


def test_table_is_big_enough() -> None:
    assert len(TABLE) >= 60
    assert len({a for a, _, _ in TABLE}) == len(TABLE)


@pytest.mark.parametrize(
    ("address", "allowed", "rule"), TABLE, ids=[a or "empty" for a, _, _ in TABLE]
)
def test_default_policy(address: str, allowed: bool, rule: str) -> None:
    """Each address gets the expected decision, and the rule text names why."""
    assert DEFAULT.check(address) == Decision(allowed, rule)
    assert DEFAULT.allowed(address, 5000) is allowed


def test_decision_text() -> None:
    assert str(DEFAULT.check("10.0.0.1")) == "denied (special-purpose 10.0.0.0/8 (private-use))"
    assert str(DEFAULT.check("8.8.8.8")) == "allowed (default allow (public address))"


def _neighbours(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> list[str]:
    out = []
    low, high = int(net.network_address), int(net.broadcast_address)
    top = 2**net.max_prefixlen - 1
    cls = ipaddress.IPv4Address if net.version == 4 else ipaddress.IPv6Address
    if low > 0:
        out.append(str(cls(low - 1)))
    if high < top:
        out.append(str(cls(high + 1)))
    return out


@pytest.mark.parametrize(
    ("net", "name"), SPECIAL_V4 + SPECIAL_V6, ids=[n for n, _ in SPECIAL_V4 + SPECIAL_V6]
)
def test_every_listed_range(net: str, name: str) -> None:
    """First and last address of each listed range are denied by that range's rule; the
    addresses just outside are not judged by it."""
    network = ipaddress.ip_network(net)
    rule = special(net, name)
    inside = {str(network.network_address), str(network.broadcast_address)}
    for address in inside:
        decision = DEFAULT.check(address)
        # IPv4-compatible ::/96 would claim ::/128 and ::1/128 otherwise; they stay themselves.
        assert decision == Decision(False, rule), address
    for address in _neighbours(network):
        assert not DEFAULT.check(address).rule.startswith(rule), address


# --- operator overrides -----------------------------------------------------------------------


def test_allow_peer_overrides_a_special_range() -> None:
    policy = PeerPolicy(allow=parse_networks(["10.0.0.0/8", "fd00::/8"]))
    assert policy.check("10.1.2.3") == Decision(True, "allow-peer 10.0.0.0/8")
    assert policy.check("fd12::1") == Decision(True, "allow-peer fd00::/8")
    assert policy.check("::ffff:10.1.2.3").allowed
    assert policy.check("192.168.1.1") == Decision(False, special("192.168.0.0/16", "private-use"))
    assert policy.check("fc00::1").allowed is False


def test_deny_peer_overrides_everything() -> None:
    policy = PeerPolicy(
        allow=parse_networks(["8.8.8.0/24"]),
        deny=parse_networks(["8.8.8.0/24", "2002::/16"]),
        own_ips=frozenset({"8.8.8.8"}),
        relay_ips=frozenset({"8.8.8.8"}),
    )
    assert policy.check("8.8.8.8", 50000) == Decision(False, "deny-peer 8.8.8.0/24")
    assert policy.check("8.8.8.9") == Decision(False, "deny-peer 8.8.8.0/24")
    assert policy.check("2002:101:101::1") == Decision(False, "deny-peer 2002::/16")
    assert policy.check("::ffff:8.8.8.7") == Decision(
        False, "deny-peer 8.8.8.0/24 via IPv4-mapped ::ffff:808:807"
    )
    assert policy.check("8.8.4.4").allowed


def test_deny_peer_denies_public_ipv6() -> None:
    policy = PeerPolicy(deny=parse_networks(["2606:4700::/32"]))
    assert policy.check("2606:4700:4700::1111") == Decision(False, "deny-peer 2606:4700::/32")


OWN = PeerPolicy(
    own_ips=frozenset({"5.6.7.8", "5.6.7.9", "2a01:4f8::9"}),
    relay_ips=frozenset({"5.6.7.9", "2a01:4f8::9"}),
    relay_ports=(49152, 65535),
    allow=parse_networks(["5.6.7.0/24"]),
)


@pytest.mark.parametrize(
    ("host", "port", "allowed"),
    [
        ("5.6.7.8", None, False),  # the listener: never
        ("5.6.7.8", 50000, False),
        ("5.6.7.9", 50000, True),  # relay IP, relay port: another allocation
        ("5.6.7.9", 49152, True),
        ("5.6.7.9", 65535, True),
        ("5.6.7.9", 49151, False),
        ("5.6.7.9", 3478, False),
        ("5.6.7.9", 22, False),
        ("5.6.7.9", None, True),  # CreatePermission is per IP: any port
        ("::ffff:5.6.7.8", 50000, False),
        ("::ffff:5.6.7.9", 22, False),
        ("2a01:4f8::9", 50000, True),
        ("2a01:4f8::9", 443, False),
        ("5.6.7.10", 22, True),  # allow-peer still applies to others in the /24
    ],
)
def test_own_addresses(host: str, port: int | None, allowed: bool) -> None:
    """The server's own IPs are denied (allow-peer cannot override that), except relay-range
    ports on relay IPs, so clients of the same server can reach each other's relays."""
    decision = OWN.check(host, port)
    assert decision.allowed is allowed
    if not allowed:
        assert "server's own address" in decision.rule


def test_own_address_rule_text() -> None:
    assert OWN.check("5.6.7.8", 1) == Decision(False, "server's own address 5.6.7.8")


def test_allow_loopback_peers() -> None:
    """--allow-loopback-peers adds LOOPBACK to the allow list: 127.0.0.1 and ::1 allowed,
    other special ranges still denied."""
    policy = PeerPolicy(allow=parse_networks(LOOPBACK))
    assert policy.check("127.0.0.1") == Decision(True, "allow-peer 127.0.0.0/8")
    assert policy.check("::1") == Decision(True, "allow-peer ::1/128")
    assert policy.check("::ffff:127.0.0.1").allowed
    assert not policy.check("10.0.0.1").allowed
    assert not policy.check("::").allowed


# --- parse_networks -----------------------------------------------------------------------------


def test_parse_networks() -> None:
    assert parse_networks(["10.0.0.0/8", " 192.0.2.1 ", "2001:db8::/32", "10.0.0.1/8"]) == (
        ipaddress.IPv4Network("10.0.0.0/8"),
        ipaddress.IPv4Network("192.0.2.1/32"),
        ipaddress.IPv6Network("2001:db8::/32"),
        ipaddress.IPv4Network("10.0.0.0/8"),
    )
    assert parse_networks([]) == ()


@pytest.mark.parametrize(
    "bad", ["10.0.0.0/33", "nonsense", "10.0.0", "fe80::/129", "1.2.3.4/-1", ""]
)
def test_parse_networks_names_the_bad_entry(bad: str) -> None:
    with pytest.raises(ValueError, match="is not an IP network") as info:
        parse_networks(["10.0.0.0/8", bad])
    assert repr(bad) in str(info.value)
