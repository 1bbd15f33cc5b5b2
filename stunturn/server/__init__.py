"""The sans-IO server core: Binding (RFC 8489, RFC 5780) and, later, TURN; no sockets, no clock."""

from .actions import Action, RelayTo, SendTo, Splice, StreamAction, Transport
from .binding import AlternateAddresses, BindingService
from .core import CoreConfig, ServerCore
from .counters import Counters
from .errors import StunError

__all__ = [
    "Action",
    "AlternateAddresses",
    "BindingService",
    "CoreConfig",
    "Counters",
    "RelayTo",
    "SendTo",
    "ServerCore",
    "Splice",
    "StreamAction",
    "StunError",
    "Transport",
]
