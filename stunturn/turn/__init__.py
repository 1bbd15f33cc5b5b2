"""Sans-IO TURN (RFC 8656, RFC 6156): allocations, permissions, channels, auth, peer policy."""

from ..server.actions import RelayTo
from ..server.keys import address_key, ip_key
from .allocation import (
    Allocation,
    Channel,
    ChannelRoute,
    FiveTuple,
    RelayBinder,
    RelayHandle,
)
from .auth import AuthResult, LongTermAuth
from .policy import Decision, PeerPolicy, parse_networks
from .ports import PortPool
from .quota import LocalQuotas, QuotaLimits, Quotas
from .service import TurnConfig, TurnService
from .wire import channel_data, data_indication

__all__ = [
    "Allocation",
    "AuthResult",
    "Channel",
    "ChannelRoute",
    "Decision",
    "FiveTuple",
    "LocalQuotas",
    "LongTermAuth",
    "PeerPolicy",
    "PortPool",
    "QuotaLimits",
    "Quotas",
    "RelayBinder",
    "RelayHandle",
    "RelayTo",
    "TurnConfig",
    "TurnService",
    "address_key",
    "channel_data",
    "data_indication",
    "ip_key",
    "parse_networks",
]
