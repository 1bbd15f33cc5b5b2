"""NAT behaviour vocabulary (RFC 4787, RFC 5780) and the classic labels derived from it.

Mapping and filtering each take one of the RFC 4787 values, or ``unknown`` when the test that
would tell could not be run (the server lacks a feature, or the answers were inconsistent).
The classic RFC 3489 label is only a summary; the two behaviours are the real result.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Behaviour(StrEnum):
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
    UNKNOWN = "unknown"


class NatType(StrEnum):
    OPEN_INTERNET = "open-internet"
    FULL_CONE = "full-cone"
    RESTRICTED_CONE = "restricted-cone"
    PORT_RESTRICTED_CONE = "port-restricted-cone"
    SYMMETRIC = "symmetric"
    SYMMETRIC_UDP_FIREWALL = "symmetric-udp-firewall"
    UDP_BLOCKED = "udp-blocked"
    UNKNOWN = "unknown"


def classic_type(
    nat_detected: bool | None,
    mapping: Behaviour,
    filtering: Behaviour,
    udp_blocked: bool = False,
) -> NatType:
    """The classic label.

    No NAT: ``open-internet`` with endpoint-independent filtering, else
    ``symmetric-udp-firewall`` (a stateful firewall drops what it did not ask for). Behind a NAT:
    any dependent mapping is ``symmetric``; with endpoint-independent mapping the filtering
    names the cone. Anything a missing test leaves open is ``unknown``, never a guess.
    """
    E, A, P = (
        Behaviour.ENDPOINT_INDEPENDENT,
        Behaviour.ADDRESS_DEPENDENT,
        Behaviour.ADDRESS_AND_PORT_DEPENDENT,
    )
    if udp_blocked:
        return NatType.UDP_BLOCKED
    if nat_detected is None:
        return NatType.UNKNOWN
    if not nat_detected:
        if filtering is E:
            return NatType.OPEN_INTERNET
        if filtering in (A, P):
            return NatType.SYMMETRIC_UDP_FIREWALL
        return NatType.UNKNOWN
    if mapping in (A, P):
        return NatType.SYMMETRIC
    if mapping is not E:
        return NatType.UNKNOWN
    return {E: NatType.FULL_CONE, A: NatType.RESTRICTED_CONE, P: NatType.PORT_RESTRICTED_CONE}.get(
        filtering, NatType.UNKNOWN
    )


@dataclass(frozen=True, slots=True)
class Outlook:
    """What a peer-to-peer app can expect from this NAT."""

    direct_with: tuple[NatType, ...]
    """Peer types with which a direct path (hole punching) is likely."""
    relay_with: tuple[NatType, ...]
    """Peer types for which a TURN relay will be needed."""
    summary: str


_PEERS = (
    NatType.OPEN_INTERNET,
    NatType.FULL_CONE,
    NatType.RESTRICTED_CONE,
    NatType.PORT_RESTRICTED_CONE,
    NatType.SYMMETRIC,
    NatType.SYMMETRIC_UDP_FIREWALL,
)


def direct_possible(a: NatType, b: NatType) -> bool | None:
    """Whether two peers with these NAT types can usually connect directly (ICE hole punching).

    Rule of thumb behind it: hole punching works unless one side's mapping changes per
    destination (symmetric) while the other side filters on the port (port-restricted or
    symmetric), because then the port a peer learns is not the port the packets arrive from.
    A side with no NAT and no filtering accepts anything. None when a type is unknown.
    """
    unknown = (NatType.UNKNOWN, NatType.UDP_BLOCKED)
    if a in unknown or b in unknown:
        return None if NatType.UNKNOWN in (a, b) else False
    strict = (NatType.PORT_RESTRICTED_CONE, NatType.SYMMETRIC, NatType.SYMMETRIC_UDP_FIREWALL)
    if a is NatType.SYMMETRIC and b in strict:
        return False
    return not (b is NatType.SYMMETRIC and a in strict)


def outlook(nat: NatType) -> Outlook:
    """Direct and relayed peer types for this NAT type."""
    if nat is NatType.UDP_BLOCKED:
        return Outlook((), _PEERS, "UDP is blocked: every peer needs a TURN relay over TCP/TLS.")
    if nat is NatType.UNKNOWN:
        return Outlook((), (), "Unknown NAT type: no prediction.")
    direct = tuple(p for p in _PEERS if direct_possible(nat, p))
    relay = tuple(p for p in _PEERS if direct_possible(nat, p) is False)
    if not relay:
        summary = "Direct connections should work with peers behind any NAT type."
    else:
        summary = (
            f"Direct with {', '.join(direct) or 'no one'}; a TURN relay is needed with "
            f"{', '.join(relay)}."
        )
    return Outlook(direct, relay, summary)


__all__ = ["Behaviour", "NatType", "Outlook", "classic_type", "direct_possible", "outlook"]
