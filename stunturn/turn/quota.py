"""Allocation quotas: per user, per client IP and in total (486 Allocation Quota Reached).

The core asks a :class:`Quotas` object before creating an allocation and tells it when one
ends. :class:`LocalQuotas` counts within one process. With several worker processes a user's
allocations can live in different workers (each client 5-tuple is pinned to one worker, but one
user has many 5-tuples), so the server then passes a shared implementation from the I/O layer
(:mod:`stunturn.aio.shared`) that keeps the counts in shared memory under a lock.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class QuotaLimits:
    """Limits; 0 means unlimited."""

    per_user: int = 10
    per_client_ip: int = 64
    total: int = 20_000
    permissions: int = 64
    """Permissions per allocation (CreatePermission beyond it: 508)."""
    channels: int = 64
    """Channels per allocation (ChannelBind beyond it: 508)."""
    max_bps: int = 0
    """Relayed bytes per second per allocation and direction."""
    peer_connections: int = 64
    """TCP peer connections per RFC 6062 allocation (Connect beyond it: 508; inbound: refused)."""


class Quotas(Protocol):
    """Counts live allocations against :class:`QuotaLimits`."""

    def acquire(self, user: str, client_ip: str) -> bool:
        """Count one more allocation; False (and nothing counted) when a limit is reached."""
        ...

    def release(self, user: str, client_ip: str) -> None:
        """An allocation ended."""
        ...

    def set_limits(self, limits: QuotaLimits) -> None:
        """New limits (a configuration reload); live counts are kept."""
        ...


class LocalQuotas:
    """In-process counters."""

    def __init__(self, limits: QuotaLimits) -> None:
        self.limits = limits
        self.users: Counter[str] = Counter()
        self.ips: Counter[str] = Counter()
        self.total = 0

    def acquire(self, user: str, client_ip: str) -> bool:
        lim = self.limits
        if (
            (lim.per_user and self.users[user] >= lim.per_user)
            or (lim.per_client_ip and self.ips[client_ip] >= lim.per_client_ip)
            or (lim.total and self.total >= lim.total)
        ):
            return False
        self.users[user] += 1
        self.ips[client_ip] += 1
        self.total += 1
        return True

    def release(self, user: str, client_ip: str) -> None:
        for counter, key in ((self.users, user), (self.ips, client_ip)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]
        self.total = max(0, self.total - 1)

    def set_limits(self, limits: QuotaLimits) -> None:
        self.limits = limits
