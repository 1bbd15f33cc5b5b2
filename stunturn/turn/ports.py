"""Relay port selection: the range, EVEN-PORT, and RESERVATION-TOKENs (RFC 8656 section 7.2).

Sans-IO: the pool decides which port to try, the I/O layer binds it. With several worker
processes each worker owns its own share of the range (port pairs ``p, p+1`` with ``p`` even go
to worker ``(p // 2) % workers``), so workers never race for a port and a port reserved by one
worker is never handed out by another.

A RESERVATION-TOKEN is self-validating so that any worker can redeem it: 2 bytes of port,
3 bytes of expiry (whole seconds, modulo 2**24: a token cannot come back to life for 194 days)
and 3 bytes of HMAC over both and the relay IP (guessing one only wins a reserved port).
"""

from __future__ import annotations

import hmac
import random
from collections.abc import Iterator

RESERVATION_LIFETIME = 30.0
"""RFC 8656 section 7.2: a reserved port is kept for about 30 seconds."""


class PortPool:
    """Ports in use and reserved, per relay IP, within ``[low, high]``."""

    def __init__(
        self,
        low: int,
        high: int,
        secret: bytes,
        *,
        worker: int = 0,
        workers: int = 1,
        rng: random.Random | None = None,
    ) -> None:
        if not 1 <= low <= high <= 65535:
            raise ValueError("relay port range must satisfy 1 <= low <= high <= 65535")
        self.low, self.high = low, high
        self.worker, self.workers = worker, workers
        self._secret = secret
        self._rng = rng or random.Random()
        self._used: dict[str, set[int]] = {}
        self._reserved: dict[tuple[str, int], float] = {}

    def mine(self, port: int) -> bool:
        """Whether this worker's share of the range includes ``port``."""
        return self.low <= port <= self.high and (port // 2) % self.workers == self.worker

    def in_use(self, ip: str) -> set[int]:
        return self._used.setdefault(ip, set())

    def candidates(self, ip: str, *, even: bool = False, pair: bool = False) -> Iterator[int]:
        """Ports to try, random first then in order; each is free in this pool right now.

        ``even`` wants an even port; ``pair`` also wants ``port + 1`` free (EVEN-PORT with R).
        """
        used = self.in_use(ip)
        span = self.high - self.low + 1
        start = self._rng.randrange(span)
        for i in range(span):
            port = self.low + (start + i) % span
            if not self.mine(port) or port in used:
                continue
            if even and port % 2:
                continue
            if pair and (port + 1 > self.high or port + 1 in used):
                continue
            yield port

    def take(self, ip: str, port: int) -> None:
        self.in_use(ip).add(port)

    def release(self, ip: str, port: int) -> None:
        self.in_use(ip).discard(port)

    def reserve(self, ip: str, port: int, now: float) -> bytes:
        """Hold ``port`` for a later Allocate; returns the RESERVATION-TOKEN."""
        expiry = now + RESERVATION_LIFETIME
        self.take(ip, port)
        self._reserved[(ip, port)] = expiry
        head = port.to_bytes(2, "big") + (int(expiry) & 0xFFFFFF).to_bytes(3, "big")
        return head + self._mac(ip, head)

    def redeem(self, token: bytes, ip: str, now: float) -> int | None:
        """The reserved port a token names, if the token is ours and not expired.

        The port is released from the reservation; the caller binds it and calls :meth:`take`.
        A token minted by another worker validates too (same secret); that worker keeps the
        port out of its own allocations until the reservation lapses.
        """
        if len(token) != 8 or not hmac.compare_digest(token[5:], self._mac(ip, token[:5])):
            return None
        port = int.from_bytes(token[:2], "big")
        expiry = int.from_bytes(token[2:5], "big")
        if (expiry - int(now)) & 0xFFFFFF > RESERVATION_LIFETIME + 1:
            return None  # expired (modulo 2**24, an expired token reads as far in the future)
        if (ip, port) in self._reserved:
            del self._reserved[(ip, port)]
            self.release(ip, port)
        return int(port)

    def expire(self, now: float) -> list[tuple[str, int]]:
        """Drop reservations that lapsed; returns them so the I/O layer can close sockets."""
        gone = [key for key, expiry in self._reserved.items() if expiry <= now]
        for ip, port in gone:
            del self._reserved[(ip, port)]
            self.release(ip, port)
        return gone

    def next_expiry(self) -> float | None:
        return min(self._reserved.values(), default=None)

    def _mac(self, ip: str, head: bytes) -> bytes:
        return hmac.digest(self._secret, head + ip.encode(), "sha256")[:3]
