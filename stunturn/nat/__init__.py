"""Sans-IO NAT behaviour discovery (RFC 5780, RFC 4787) and NAT classification."""

from .classify import Behaviour, NatType, Outlook, classic_type, direct_possible, outlook
from .discovery import (
    PROBE_POLICY,
    SCHEMA,
    Action,
    CloseSocket,
    Discovery,
    Evidence,
    OpenSocket,
    ProbeConfig,
    SendDatagram,
    TcpRequest,
)

__all__ = [
    "PROBE_POLICY",
    "SCHEMA",
    "Action",
    "Behaviour",
    "CloseSocket",
    "Discovery",
    "Evidence",
    "NatType",
    "OpenSocket",
    "Outlook",
    "ProbeConfig",
    "SendDatagram",
    "TcpRequest",
    "classic_type",
    "direct_possible",
    "outlook",
]
