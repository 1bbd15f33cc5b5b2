"""Allocation quotas shared by worker processes (stunturn/aio/shared.py).

Most tests use two worker views of one :class:`SharedQuotas` in this process (made with the
"spawn" context, as the supervisor does); one starts two real processes that race for slots.
"""

from __future__ import annotations

import multiprocessing

import pytest
from turn_helpers import CLIENT, CLIENT2, error_code, is_success, make_server

from stunturn.aio.shared import SharedQuotas, WorkerQuotas
from stunturn.turn import QuotaLimits, Quotas

SPAWN = multiprocessing.get_context("spawn")


def shared(limits: QuotaLimits, workers: int = 2) -> SharedQuotas:
    return SharedQuotas(limits, workers, SPAWN)


def test_worker_view_is_a_quotas() -> None:
    view: Quotas = shared(QuotaLimits()).view(0)
    assert isinstance(view, WorkerQuotas)


def test_per_user_limit_holds_across_workers() -> None:
    quotas = shared(QuotaLimits(per_user=3, per_client_ip=0, total=0))
    w0, w1 = quotas.view(0), quotas.view(1)
    assert w0.acquire("alice", "198.51.100.1")
    assert w1.acquire("alice", "198.51.100.2")
    assert w0.acquire("alice", "198.51.100.3")
    assert not w1.acquire("alice", "198.51.100.4")
    assert not w0.acquire("alice", "198.51.100.4")
    assert w1.acquire("bob", "198.51.100.4")
    assert quotas.count("user", "alice") == 3
    assert quotas.count("user", "bob") == 1
    assert quotas.count("total") == 4
    assert quotas.count("ip", "198.51.100.1") == 1


def test_refused_acquire_counts_nothing() -> None:
    quotas = shared(QuotaLimits(per_user=0, per_client_ip=1, total=0))
    w0, w1 = quotas.view(0), quotas.view(1)
    assert w0.acquire("alice", "198.51.100.1")
    assert not w1.acquire("bob", "198.51.100.1")
    assert quotas.count("user", "bob") == 0
    assert quotas.count("total") == 1


def test_total_limit_across_workers() -> None:
    quotas = shared(QuotaLimits(per_user=0, per_client_ip=0, total=2))
    w0, w1 = quotas.view(0), quotas.view(1)
    assert w0.acquire("a", "1.1.1.1") and w1.acquire("b", "2.2.2.2")
    assert not w0.acquire("c", "3.3.3.3") and not w1.acquire("d", "4.4.4.4")
    w0.release("a", "1.1.1.1")
    assert w1.acquire("d", "4.4.4.4")


def test_release() -> None:
    quotas = shared(QuotaLimits(per_user=2))
    w0, w1 = quotas.view(0), quotas.view(1)
    assert w0.acquire("alice", "198.51.100.1") and w1.acquire("alice", "198.51.100.1")
    w1.release("alice", "198.51.100.1")
    assert quotas.count("user", "alice") == 1
    assert quotas.count("ip", "198.51.100.1") == 1
    w1.release("alice", "198.51.100.1")  # worker 1 holds nothing more: no underflow
    assert quotas.count("user", "alice") == 1
    w0.release("alice", "198.51.100.1")
    assert (quotas.count("user", "alice"), quotas.count("total")) == (0, 0)
    w0.release("nobody", "203.0.113.1")  # never counted: harmless
    assert quotas.count("total") == 0


def test_reset_worker_drops_exactly_that_workers_counts() -> None:
    """A dead worker's counts go; the other worker's stay."""
    quotas = shared(QuotaLimits(per_user=5), workers=3)
    w0, w1, w2 = quotas.view(0), quotas.view(1), quotas.view(2)
    for _ in range(2):
        assert w0.acquire("alice", "198.51.100.1")
    assert w1.acquire("alice", "198.51.100.2")
    assert w2.acquire("bob", "198.51.100.1")
    quotas.reset_worker(0)
    assert quotas.count("user", "alice") == 1
    assert quotas.count("user", "bob") == 1
    assert quotas.count("ip", "198.51.100.1") == 1
    assert quotas.count("total") == 2
    assert w0.acquire("alice", "198.51.100.1")  # the region is usable again
    assert quotas.count("user", "alice") == 2


def test_unlimited() -> None:
    """With every limit 0 nothing is counted and no lock is taken: acquire always succeeds."""
    quotas = shared(QuotaLimits(per_user=0, per_client_ip=0, total=0))
    w0 = quotas.view(0)
    assert all(w0.acquire("alice", "198.51.100.1") for _ in range(200))
    w0.release("alice", "198.51.100.1")
    assert quotas.count("total") == 0


def test_unknown_count_kind() -> None:
    with pytest.raises(KeyError):
        shared(QuotaLimits()).count("nope")


def test_two_turn_workers_share_the_user_quota() -> None:
    """Two TURN cores (workers) with views of one SharedQuotas: the user's quota is global;
    an allocation ending in one worker frees a slot for the other."""
    quotas = shared(QuotaLimits(per_user=2))
    w0 = make_server(quotas=quotas.view(0), worker=0, workers=2)
    w1 = make_server(quotas=quotas.view(1), worker=1, workers=2)
    a = w0.client(address=CLIENT)
    b = w1.client(address=CLIENT2)
    c = w1.client(address=(CLIENT2[0], CLIENT2[1] + 1))
    assert is_success(a.allocate()) and is_success(b.allocate())
    assert error_code(c.allocate()) == 486
    assert is_success(a.refresh(0))
    assert is_success(c.allocate())
    w1.step(600)
    assert quotas.count("user", "alice") == 0


# --- real processes ------------------------------------------------------------------------

ROUNDS = 150


def _hammer(quotas: SharedQuotas, worker: int, user: str) -> None:
    view = quotas.view(worker)
    for i in range(ROUNDS):
        view.acquire(user, f"10.0.{worker}.{i % 7}")


@pytest.mark.timeout(60)
def test_two_processes_racing_for_slots() -> None:
    """Two spawned processes acquire in a loop: every unlimited acquire is counted, and a
    limit shared by both is reached exactly, never exceeded."""
    limit = ROUNDS + ROUNDS // 2
    quotas = shared(QuotaLimits(per_user=limit, per_client_ip=0, total=0))
    procs = [SPAWN.Process(target=_hammer, args=(quotas, w, "alice")) for w in (0, 1)]
    procs += [SPAWN.Process(target=_hammer, args=(quotas, w, "bob")) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(50)
        assert p.exitcode == 0
    assert quotas.count("user", "alice") == limit
    assert quotas.count("user", "bob") == limit
    assert quotas.count("total") == 2 * limit
