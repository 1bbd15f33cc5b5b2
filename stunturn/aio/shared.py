"""Allocation quotas shared by worker processes.

A client's 5-tuple always reaches the same worker, but one user (or one client IP) has many
5-tuples spread over all workers, so per-user, per-IP and total counts must be shared. The
supervisor creates one :class:`SharedQuotas` before spawning the workers; it is a fixed-size
open-addressing hash table of (key hash, count) pairs in shared memory
(``multiprocessing.Array``), updated under one inter-process lock. Allocations are created at
most a few thousand times a second, so one short critical section each is cheap.

Keys are 63-bit BLAKE2b hashes of ``u:USER``, ``i:IP`` and ``total``; a collision would make
two users share a count (conservative: a quota can only be reached early, never exceeded), with
probability around n**2 / 2**64.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from typing import Any

from ..turn.quota import QuotaLimits

SLOTS = 1 << 16
"""Table size: enough for tens of thousands of distinct users and IPs at once."""


def _hash(key: str) -> int:
    value = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1
    return value or 1  # 63 bits, to fit a signed slot; 0 marks an empty slot


class SharedQuotas:
    """Shared counters for all workers; each worker uses its :meth:`view`.

    Every worker counts in its own region of the table and a limit is checked against the sum
    of all regions, so when a worker dies the supervisor can drop exactly what it held
    (:meth:`reset_worker`) instead of leaking its counts.
    """

    def __init__(self, limits: QuotaLimits, workers: int, ctx: Any = None) -> None:
        ctx = ctx or multiprocessing.get_context("spawn")
        self.limits = limits
        self.workers = workers
        self._lock = ctx.Lock()
        # Per worker, SLOTS pairs of signed 64-bit integers (hash, count); guarded by _lock.
        self._table = ctx.Array("q", workers * 2 * SLOTS, lock=False)

    def view(self, worker: int) -> WorkerQuotas:
        return WorkerQuotas(self, worker)

    def set_limits(self, limits: QuotaLimits) -> None:
        """New limits for this process's view; each worker reloads and sets its own."""
        self.limits = limits

    def _slot(self, region: int, h: int, create: bool) -> int | None:
        table = self._table
        base = region * 2 * SLOTS
        i = h % SLOTS
        for _ in range(SLOTS):
            stored = table[base + 2 * i]
            if stored == h:
                return base + 2 * i
            if stored == 0:
                if not create:
                    return None
                table[base + 2 * i] = h
                return base + 2 * i
            i = (i + 1) % SLOTS
        return None  # region full: acquire then refuses

    def _total(self, h: int) -> int:
        count = 0
        for region in range(self.workers):
            i = self._slot(region, h, create=False)
            if i is not None:
                count += self._table[i + 1]
        return count

    @property
    def unlimited(self) -> bool:
        lim = self.limits
        return not (lim.per_user or lim.per_client_ip or lim.total)

    def acquire(self, region: int, user: str, client_ip: str) -> bool:
        lim = self.limits
        hashes = [_hash(k) for k in (f"u:{user}", f"i:{client_ip}", "total")]
        limits = (lim.per_user, lim.per_client_ip, lim.total)
        with self._lock:
            for h, limit in zip(hashes, limits, strict=True):
                if limit and self._total(h) >= limit:
                    return False
            slots = [self._slot(region, h, create=True) for h in hashes]
            if None in slots:
                return False
            for i in slots:
                assert i is not None
                self._table[i + 1] += 1
        return True

    def release(self, region: int, user: str, client_ip: str) -> None:
        with self._lock:
            for key in (f"u:{user}", f"i:{client_ip}", "total"):
                i = self._slot(region, _hash(key), create=False)
                # Slots are never emptied (that would break probe chains); the key reuses it.
                if i is not None and self._table[i + 1] > 0:
                    self._table[i + 1] -= 1

    def reset_worker(self, region: int) -> None:
        """Forget every count a (dead) worker held."""
        with self._lock:
            base = region * 2 * SLOTS
            for i in range(base + 1, base + 2 * SLOTS, 2):
                self._table[i] = 0

    def count(self, kind: str, name: str = "") -> int:
        """Current count for ``("user", NAME)``, ``("ip", IP)`` or ``("total",)``."""
        key = {"user": f"u:{name}", "ip": f"i:{name}", "total": "total"}[kind]
        with self._lock:
            return self._total(_hash(key))


class WorkerQuotas:
    """One worker's handle on :class:`SharedQuotas` (implements the core's ``Quotas``)."""

    def __init__(self, shared: SharedQuotas, worker: int) -> None:
        self.shared = shared
        self.worker = worker

    def acquire(self, user: str, client_ip: str) -> bool:
        if self.shared.unlimited:
            return True  # nothing to count: no lock to take
        return self.shared.acquire(self.worker, user, client_ip)

    def release(self, user: str, client_ip: str) -> None:
        if not self.shared.unlimited:
            self.shared.release(self.worker, user, client_ip)

    def set_limits(self, limits: QuotaLimits) -> None:
        self.shared.set_limits(limits)
