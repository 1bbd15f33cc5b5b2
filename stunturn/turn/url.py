"""STUN and TURN server URLs (RFC 7064, RFC 7065), sans-IO.

::

    stunURI = ("stun" / "stuns") ":" host [ ":" port ]
    turnURI = ("turn" / "turns") ":" host [ ":" port ] [ "?transport=" transport ]

The host is an IPv4 address, an IPv6 literal in brackets (with an optional RFC 6874 zone,
``[fe80::1%25eth0]``) or a DNS name. Ports default to 3478 (``stun``, ``turn``) and 5349
(``stuns``, ``turns``). ``turn`` defaults to UDP, ``turns`` to TCP; ``turns`` over UDP would be
DTLS, which this package does not speak, so it is refused. Anything that does not fit raises
:class:`ValueError` saying what is wrong. Names are not resolved here.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

Scheme = Literal["stun", "stuns", "turn", "turns"]
UrlTransport = Literal["udp", "tcp"]

DEFAULT_PORT = 3478
DEFAULT_TLS_PORT = 5349
"""RFC 7064 section 3.2 and RFC 7065 section 3.2."""

_SCHEMES: dict[str, Scheme] = {"stun": "stun", "stuns": "stuns", "turn": "turn", "turns": "turns"}
# RFC 3986 reg-name restricted to what a DNS name can hold: letters, digits, '-', '.', '_'.
_REG_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")


@dataclass(frozen=True, slots=True)
class IceServerUrl:
    """A parsed ``stun:``, ``stuns:``, ``turn:`` or ``turns:`` URL.

    ``host`` holds no brackets; an IPv6 zone is kept after ``%`` (``fe80::1%eth0``).
    """

    scheme: Scheme
    host: str
    port: int
    transport: UrlTransport

    @property
    def secure(self) -> bool:
        """TLS (``stuns``/``turns``)."""
        return self.scheme in ("stuns", "turns")

    @property
    def is_turn(self) -> bool:
        return self.scheme in ("turn", "turns")

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        host = f"[{self.host.replace('%', '%25')}]" if ":" in self.host else self.host
        text = f"{self.scheme}:{host}:{self.port}"
        return f"{text}?transport={self.transport}" if self.is_turn else text


def parse_ice_url(text: str) -> IceServerUrl:
    """Parse a STUN/TURN URL; raises :class:`ValueError` naming the problem."""
    if not isinstance(text, str):
        raise ValueError(f"ICE server URL must be a string, not {type(text).__name__}")
    scheme_text, colon, rest = text.partition(":")
    scheme = _SCHEMES.get(scheme_text.lower())  # RFC 3986 section 3.1: schemes are caseless
    if not colon or scheme is None:
        raise ValueError(f"{text!r}: scheme must be stun, stuns, turn or turns")
    if rest.startswith("//"):
        # RFC 7064/7065 URIs have no authority part: "stun://host" is a common mistake.
        raise ValueError(f"{text!r}: no '//' after the scheme (write {scheme}:host[:port])")
    if "#" in rest:
        raise ValueError(f"{text!r}: a fragment is not allowed")
    rest, question, query = rest.partition("?")
    host, port = _host_port(text, rest, DEFAULT_TLS_PORT if scheme[-1] == "s" else DEFAULT_PORT)
    transport: UrlTransport = "tcp" if scheme in ("stuns", "turns") else "udp"
    if question:
        if scheme in ("stun", "stuns"):
            raise ValueError(f"{text!r}: stun and stuns URLs take no query (RFC 7064)")
        transport = _transport(text, query, scheme)
    return IceServerUrl(scheme, host, port, transport)


def _host_port(text: str, rest: str, default_port: int) -> tuple[str, int]:
    if not rest:
        raise ValueError(f"{text!r}: no host")
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: '[' without ']' around the IPv6 address")
        host = _ipv6_literal(text, rest[1:end])
        after = rest[end + 1 :]
        if after and not after.startswith(":"):
            raise ValueError(f"{text!r}: unexpected {after!r} after the IPv6 address")
        port_text = after[1:] if after else None
    else:
        host_text, colon, port_text_or_empty = rest.partition(":")
        if ":" in port_text_or_empty:
            raise ValueError(f"{text!r}: an IPv6 address must be in brackets, e.g. [::1]")
        host = _name_or_ipv4(text, host_text)
        port_text = port_text_or_empty if colon else None
    # RFC 3986 section 6.2.3: an empty port ("host:") means the default port.
    if not port_text:
        return host, default_port
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"{text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is outside 1-65535")
    return host, port


def _ipv6_literal(text: str, inner: str) -> str:
    address, pct, zone = inner.partition("%")
    if pct:
        # RFC 6874: the '%' before a zone is percent-encoded in URIs as "%25".
        if not zone.startswith("25") or len(zone) < 3:
            raise ValueError(f"{text!r}: an IPv6 zone is written %25zone in a URL")
        zone = zone[2:]
        if not re.fullmatch(r"[A-Za-z0-9._~-]+", zone):
            raise ValueError(f"{text!r}: bad IPv6 zone {zone!r}")
    try:
        ip = ipaddress.IPv6Address(address)
    except ValueError:
        if inner[:1] in ("v", "V"):
            raise ValueError(f"{text!r}: IPvFuture literals are not supported") from None
        raise ValueError(f"{text!r}: {address!r} is not an IPv6 address") from None
    return f"{ip.compressed}%{zone}" if pct else ip.compressed


def _name_or_ipv4(text: str, host: str) -> str:
    if not host:
        raise ValueError(f"{text!r}: no host")
    if host.replace(".", "").isdigit():
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv4 address") from None
    if len(host) > 253 or not _REG_NAME.fullmatch(host):
        raise ValueError(f"{text!r}: {host!r} is not a valid host name")
    labels = host.rstrip(".").split(".")
    if any(not 0 < len(label) <= 63 for label in labels):
        raise ValueError(f"{text!r}: {host!r} has an empty label or one over 63 characters")
    return host.lower()


def _transport(text: str, query: str, scheme: Scheme) -> UrlTransport:
    """RFC 7065 section 3.1: the only query is ``transport=udp|tcp|<extension>``."""
    key, equals, value = query.partition("=")
    if key.lower() != "transport" or not equals:
        raise ValueError(f"{text!r}: the only query allowed is ?transport=udp or ?transport=tcp")
    value = value.lower()
    if value not in ("udp", "tcp"):
        raise ValueError(f"{text!r}: unsupported transport {value!r} (udp or tcp)")
    if value == "udp" and scheme == "turns":
        raise ValueError(f"{text!r}: turns over udp would be DTLS, which is not supported")
    return "udp" if value == "udp" else "tcp"


IceServer = IceServerUrl
"""Alias used by the ICE layer."""
parse_ice_server = parse_ice_url
"""Alias used by the ICE layer."""

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_TLS_PORT",
    "IceServer",
    "IceServerUrl",
    "parse_ice_server",
    "parse_ice_url",
]
