"""Per-source response budget: token buckets keyed by source IP.

A public STUN server is a reflector: a spoofed request makes it send a response to the victim.
Each source IP gets ``rate`` responses per second with bursts up to ``burst``; real clients
(a handful of requests per gathering, RFC 8489 retransmissions, ICE keepalives) stay far below.
The table is bounded: when it reaches ``max_sources`` entries, entries that would be full again
are dropped; if that frees nothing, the table is cleared (fail open rather than grow).
"""

from __future__ import annotations

from collections.abc import Hashable


class ResponseBudget:
    """Token buckets in one dict: packed source IP -> [tokens, last_update]."""

    __slots__ = ("_buckets", "burst", "max_sources", "rate")

    def __init__(self, rate: float, burst: float, max_sources: int = 100_000) -> None:
        if rate < 0 or burst < 1:
            raise ValueError("rate must be >= 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self.max_sources = max_sources
        self._buckets: dict[Hashable, list[float]] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, ip: Hashable, now: float) -> bool:
        """Take one token for ``ip``; False when its budget is spent."""
        bucket = self._buckets.get(ip)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._prune(now)
            self._buckets[ip] = [self.burst - 1.0, now]
            return True
        tokens = bucket[0] + (now - bucket[1]) * self.rate
        tokens = min(tokens, self.burst)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _prune(self, now: float) -> None:
        if not self.rate:
            self._buckets.clear()
            return
        refill = self.burst / self.rate
        stale = [ip for ip, (_, last) in self._buckets.items() if now - last >= refill]
        for ip in stale:
            del self._buckets[ip]
        if len(self._buckets) >= self.max_sources:
            self._buckets.clear()
