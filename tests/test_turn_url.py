"""STUN/TURN URL parsing (RFC 7064, RFC 7065): examples from the RFCs, defaults, and refusals."""

from __future__ import annotations

import pytest

from stunturn.turn.url import IceServerUrl, parse_ice_url


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # RFC 7064 section 3.1 / RFC 7065 section 3.1 forms, with the defaults of 3.2.
        ("stun:example.org", IceServerUrl("stun", "example.org", 3478, "udp")),
        ("stuns:example.org", IceServerUrl("stuns", "example.org", 5349, "tcp")),
        ("stun:example.org:8000", IceServerUrl("stun", "example.org", 8000, "udp")),
        ("turn:example.org", IceServerUrl("turn", "example.org", 3478, "udp")),
        ("turns:example.org", IceServerUrl("turns", "example.org", 5349, "tcp")),
        ("turn:example.org:8000", IceServerUrl("turn", "example.org", 8000, "udp")),
        ("turn:example.org?transport=udp", IceServerUrl("turn", "example.org", 3478, "udp")),
        ("turn:example.org?transport=tcp", IceServerUrl("turn", "example.org", 3478, "tcp")),
        ("turns:example.org?transport=tcp", IceServerUrl("turns", "example.org", 5349, "tcp")),
        ("turn:192.0.2.1:3479?transport=tcp", IceServerUrl("turn", "192.0.2.1", 3479, "tcp")),
        ("turn:[2001:db8::1]", IceServerUrl("turn", "2001:db8::1", 3478, "udp")),
        ("turns:[2001:DB8:0::1]:443", IceServerUrl("turns", "2001:db8::1", 443, "tcp")),
        ("stun:[::1]:3478", IceServerUrl("stun", "::1", 3478, "udp")),
        ("turn:[fe80::1%25eth0]:9", IceServerUrl("turn", "fe80::1%eth0", 9, "udp")),
        # Schemes, transports and host names are caseless; an empty port is the default.
        ("TURN:Example.ORG?TRANSPORT=TCP", IceServerUrl("turn", "example.org", 3478, "tcp")),
        ("stun:example.org:", IceServerUrl("stun", "example.org", 3478, "udp")),
        ("stun:localhost", IceServerUrl("stun", "localhost", 3478, "udp")),
        ("stun:example.org.", IceServerUrl("stun", "example.org.", 3478, "udp")),
    ],
)
def test_valid(text: str, expected: IceServerUrl) -> None:
    assert parse_ice_url(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "scheme"),
        ("example.org", "scheme"),
        ("http://example.org", "scheme"),
        ("turn//example.org", "scheme"),
        ("stun://example.org", "no '//'"),
        ("turn:", "no host"),
        ("turn::3478", "no host"),
        ("turn:example.org:0", "outside 1-65535"),
        ("turn:example.org:65536", "outside 1-65535"),
        ("turn:example.org:http", "not a number"),
        ("turn:example.org:-1", "not a number"),
        ("turn:example.org:٣", "not a number"),
        ("turn:2001:db8::1", "brackets"),
        ("turn:[2001:db8::1", "without ']'"),
        ("turn:[2001:db8::1]x", "unexpected"),
        ("turn:[1.2.3.4]", "not an IPv6 address"),
        ("turn:[v1.abc]", "IPvFuture"),
        ("turn:[fe80::1%eth0]", "%25zone"),
        ("turn:[fe80::1%25]", "%25zone"),
        ("turn:[fe80::1%25a/b]", "bad IPv6 zone"),
        ("turn:1.2.3.256", "not an IPv4 address"),
        ("turn:1.2.3", "not an IPv4 address"),
        ("turn:exa mple.org", "not a valid host name"),
        ("turn:-example.org", "not a valid host name"),
        ("turn:user@example.org", "not a valid host name"),
        ("turn:example..org", "empty label"),
        ("turn:" + "a" * 64 + ".org", "over 63"),
        ("turn:example.org?transport=sctp", "unsupported transport"),
        ("turn:example.org?transport=", "unsupported transport"),
        ("turn:example.org?proto=udp", "only query"),
        ("turn:example.org?transport", "only query"),
        ("turns:example.org?transport=udp", "DTLS"),
        ("stun:example.org?transport=udp", "no query"),
        ("stuns:example.org?transport=tcp", "no query"),
        ("turn:example.org#frag", "fragment"),
    ],
)
def test_invalid(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_ice_url(text)


def test_not_a_string() -> None:
    with pytest.raises(ValueError, match="string"):
        parse_ice_url(b"turn:example.org")  # type: ignore[arg-type]


def test_properties_and_round_trip() -> None:
    url = parse_ice_url("turns:[2001:db8::1]:443")
    assert url.secure and url.is_turn
    assert url.address == ("2001:db8::1", 443)
    assert str(url) == "turns:[2001:db8::1]:443?transport=tcp"
    assert parse_ice_url(str(url)) == url
    stun = parse_ice_url("stun:example.org")
    assert not stun.secure and not stun.is_turn
    assert str(stun) == "stun:example.org:3478"
    zoned = parse_ice_url("turn:[fe80::1%25eth0]")
    assert str(zoned) == "turn:[fe80::1%25eth0]:3478?transport=udp"
    assert parse_ice_url(str(zoned)) == zoned
