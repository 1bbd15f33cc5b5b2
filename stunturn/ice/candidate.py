"""ICE candidates: priorities and foundations (RFC 8445 section 5.1), SDP syntax (RFC 8839).

A candidate is written the way WebRTC stacks exchange it::

    candidate:1467250027 1 udp 2122260223 192.0.2.10 54400 typ host
    candidate:435653019 1 udp 1686052607 198.51.100.7 40000 typ srflx raddr 192.0.2.10 rport 54400

:func:`from_sdp` accepts it with or without the ``a=`` prefix and keeps unknown extension
attributes; :meth:`Candidate.to_sdp` writes it back.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field, replace
from enum import StrEnum

from ..stun import Address


class CandidateType(StrEnum):
    HOST = "host"
    SRFLX = "srflx"
    PRFLX = "prflx"
    RELAY = "relay"


TYPE_PREFERENCE = {
    CandidateType.HOST: 126,
    CandidateType.PRFLX: 110,
    CandidateType.SRFLX: 100,
    CandidateType.RELAY: 0,
}
"""RFC 8445 section 5.1.2.2's recommended type preferences."""


def candidate_priority(
    kind: CandidateType, local_preference: int = 65535, component: int = 1
) -> int:
    """RFC 8445 section 5.1.2.1: 2^24 type preference + 2^8 local preference + 256 - component."""
    if not 0 <= local_preference <= 65535:
        raise ValueError("local preference must be 0-65535")
    return (TYPE_PREFERENCE[kind] << 24) | (local_preference << 8) | (256 - component)


def local_preference(host: str, interface_index: int = 0) -> int:
    """A local preference that orders addresses sensibly (RFC 8421 for dual stack).

    IPv6 global addresses above IPv4, IPv4 above link-local/ULA IPv6, and within a family the
    order interfaces were enumerated in. Always in 0-65535 and distinct per interface index.
    """
    ip = ipaddress.ip_address(host.partition("%")[0])
    if ip.version == 6 and ip.is_global:
        base = 60000
    elif ip.version == 4:
        base = 50000
    else:
        base = 40000
    return max(0, base - 10 * interface_index)


def foundation(
    kind: CandidateType, base_ip: str, server: str | None = None, transport: str = "udp"
) -> str:
    """RFC 8445 section 5.1.1.3: equal for candidates of the same type, base IP, server and
    transport. A stable decimal string (like browsers use) from a hash of those."""
    key = f"{kind}|{base_ip}|{server or ''}|{transport}".encode()
    return str(int.from_bytes(hashlib.sha256(key).digest()[:4], "big"))


@dataclass(frozen=True, slots=True)
class Candidate:
    """One ICE candidate as exchanged between peers."""

    foundation: str
    component: int
    transport: str
    priority: int
    host: str
    port: int
    type: CandidateType
    related_host: str | None = None
    related_port: int | None = None
    extensions: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    """Unknown attribute pairs from SDP (e.g. generation, ufrag), kept for round trips."""

    @property
    def address(self) -> Address:
        return (self.host, self.port)

    @property
    def v6(self) -> bool:
        return ":" in self.host

    def to_sdp(self) -> str:
        """``candidate:...`` (no ``a=``), as in RTCIceCandidate.candidate."""
        parts = [
            f"candidate:{self.foundation}",
            str(self.component),
            self.transport,
            str(self.priority),
            self.host,
            str(self.port),
            "typ",
            self.type.value,
        ]
        if self.related_host is not None and self.related_port is not None:
            parts += ["raddr", self.related_host, "rport", str(self.related_port)]
        for name, value in self.extensions:
            parts += [name, value]
        return " ".join(parts)

    def with_priority(self, priority: int) -> Candidate:
        return replace(self, priority=priority)


_DIGITS = re.compile(r"[0-9]{1,10}")


class CandidateError(ValueError):
    """A candidate line that does not parse."""


def from_sdp(line: str) -> Candidate:
    """Parse ``[a=]candidate:F C TRANSPORT PRIORITY ADDR PORT typ TYPE [raddr A rport P] ...``.

    Only UDP candidates are usable here; TCP ones parse (transport kept) so callers can skip
    them. Host names (e.g. mDNS ``.local`` names) are kept as given; callers resolve or skip.
    """
    text = line.strip()
    if text.startswith("a="):
        text = text[2:]
    if not text.startswith("candidate:"):
        raise CandidateError(f"not a candidate line: {line!r}")
    fields = text[len("candidate:") :].split()
    if len(fields) < 8 or fields[6] != "typ":
        raise CandidateError(f"malformed candidate: {line!r}")
    if not all(_DIGITS.fullmatch(fields[i]) for i in (1, 3, 5)):
        raise CandidateError(f"malformed numbers in candidate: {line!r}")
    component, priority, port = int(fields[1]), int(fields[3]), int(fields[5])
    try:
        kind = CandidateType(fields[7])
    except ValueError:
        raise CandidateError(f"unknown candidate type in: {line!r}") from None
    if not (1 <= component <= 256 and 0 <= priority < 2**32 and 0 <= port <= 65535):
        raise CandidateError(f"candidate values out of range: {line!r}")
    related_host = related_port = None
    extensions: list[tuple[str, str]] = []
    rest = fields[8:]
    if len(rest) % 2:
        raise CandidateError(f"odd attribute list in candidate: {line!r}")
    for name, value in zip(rest[::2], rest[1::2], strict=True):
        if name == "raddr":
            related_host = value
        elif name == "rport":
            if not _DIGITS.fullmatch(value) or int(value) > 65535:
                raise CandidateError(f"bad rport in candidate: {line!r}")
            related_port = int(value)
        else:
            extensions.append((name, value))
    return Candidate(
        foundation=fields[0],
        component=component,
        transport=fields[2].lower(),
        priority=priority,
        host=fields[4],
        port=port,
        type=kind,
        related_host=related_host,
        related_port=related_port,
        extensions=tuple(extensions),
    )
