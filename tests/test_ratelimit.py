"""Per-source response budget (token buckets), alone and inside the server core.

Time is a number passed in: the tests step ``now`` instead of sleeping.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stunturn.server import CoreConfig, Counters, SendTo, ServerCore, Transport
from stunturn.server.ratelimit import ResponseBudget
from stunturn.stun import Message, MessageClass, Method, UnknownAttribute, decode
from stunturn.stun.attributes import Software

TID = bytes(range(12))
LOCAL = ("192.0.2.10", 3478)
REMOTE = ("198.51.100.7", 54321)
BARE = Message(Method.BINDING, MessageClass.REQUEST, TID).encode()
WITH_ATTR = Message(Method.BINDING, MessageClass.REQUEST, TID, [Software("c")]).encode()
UNKNOWN = Message(
    Method.BINDING, MessageClass.REQUEST, TID, [UnknownAttribute(0x7ABC, b"")]
).encode()


def allowed(budget: ResponseBudget, ip: str, now: float, times: int) -> list[bool]:
    return [budget.allow(ip, now) for _ in range(times)]


# --- ResponseBudget ----------------------------------------------------------------------------


def test_burst_then_refill_at_rate() -> None:
    """``burst`` responses at once, then one more every 1/rate seconds."""
    budget = ResponseBudget(rate=2.0, burst=3)
    assert allowed(budget, "a", 0.0, 4) == [True, True, True, False]
    assert allowed(budget, "a", 0.25, 1) == [False]  # half a token
    assert allowed(budget, "a", 0.5, 2) == [True, False]  # the half plus another half
    assert allowed(budget, "a", 1.0, 2) == [True, False]
    assert allowed(budget, "a", 2.0, 3) == [True, True, False]


def test_refill_is_capped_at_burst() -> None:
    """A long silence refills to ``burst``, not beyond."""
    budget = ResponseBudget(rate=10.0, burst=5)
    assert allowed(budget, "a", 0.0, 5) == [True] * 5
    assert allowed(budget, "a", 3600.0, 6) == [True] * 5 + [False]


def test_denied_attempts_do_not_cost_tokens() -> None:
    """Asking while empty does not push the next allowed response further away."""
    budget = ResponseBudget(rate=1.0, burst=1)
    assert budget.allow("a", 0.0)
    for i in range(1, 10):
        assert not budget.allow("a", i / 10)
    assert budget.allow("a", 1.0)


def test_sources_have_separate_budgets() -> None:
    """One source spending its budget does not affect another."""
    budget = ResponseBudget(rate=1.0, burst=2)
    assert allowed(budget, "a", 0.0, 3) == [True, True, False]
    assert allowed(budget, "b", 0.0, 3) == [True, True, False]
    assert allowed(budget, "2001:db8::1", 0.0, 2) == [True, True]
    assert len(budget) == 3


def test_rate_zero_means_disabled() -> None:
    """rate 0 switches the budget off (the core then never consults it)."""
    assert not ResponseBudget(rate=0, burst=1).enabled
    assert ResponseBudget(rate=0.5, burst=1).enabled


@pytest.mark.parametrize(("rate", "burst"), [(-1, 10), (1, 0), (1, 0.5), (-0.1, 1)])
def test_invalid_parameters(rate: float, burst: float) -> None:
    """Negative rates and bursts below one are refused."""
    with pytest.raises(ValueError):
        ResponseBudget(rate, burst)


def test_table_is_bounded_with_many_sources() -> None:
    """However many source IPs appear, the table never exceeds max_sources."""
    budget = ResponseBudget(rate=1.0, burst=5, max_sources=100)
    for i in range(10_000):
        now = i / 1000  # 10 seconds of a spoofed-source flood
        assert budget.allow(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", now)
        assert len(budget) <= 100


def test_full_table_drops_refilled_entries_first() -> None:
    """When full, sources whose bucket would be full again are forgotten; busy ones stay."""
    budget = ResponseBudget(rate=1.0, burst=2, max_sources=4)
    for ip in ("a", "b", "c"):
        budget.allow(ip, 0.0)
    assert allowed(budget, "busy", 5.0, 3) == [True, True, False]
    assert len(budget) == 4
    assert budget.allow("new", 5.5)  # a, b, c idle for >= burst/rate: pruned
    assert len(budget) == 2
    assert not budget.allow("busy", 5.5)  # still remembered, still limited


def test_full_table_of_busy_sources_fails_open() -> None:
    """If pruning frees nothing, the table is cleared rather than allowed to grow."""
    budget = ResponseBudget(rate=1.0, burst=2, max_sources=3)
    for ip in ("a", "b", "c"):
        assert allowed(budget, ip, 0.0, 3) == [True, True, False]
    assert budget.allow("d", 0.0)
    assert len(budget) == 1
    assert budget.allow("a", 0.0)  # forgotten, so allowed again


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.1, 100),
    burst=st.integers(1, 20),
    steps=st.lists(st.tuples(st.floats(0, 2), st.integers(1, 5)), max_size=40),
)
def test_never_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, steps: list[tuple[float, int]]
) -> None:
    """Property: by time T a source gets at most burst + rate * T responses."""
    budget = ResponseBudget(rate=rate, burst=burst)
    now = 0.0
    total = 0
    for dt, tries in steps:
        now += dt
        total += sum(allowed(budget, "a", now, tries))
        assert total <= burst + rate * now + 1e-6


# --- inside the core ---------------------------------------------------------------------------


def core_with(rate: float, burst: float) -> ServerCore:
    return ServerCore(CoreConfig(response_rate=rate, response_burst=burst))


@pytest.mark.parametrize("data", [BARE, WITH_ATTR], ids=["fast-path", "general-path"])
def test_core_withholds_responses_and_counts_them(data: bytes) -> None:
    """Past the burst, requests get no response and rate_limited counts them."""
    core = core_with(rate=1.0, burst=3)
    answers = [len(core.handle_udp(data, LOCAL, REMOTE, 0.0)) for _ in range(5)]
    assert answers == [1, 1, 1, 0, 0]
    assert core.counters == Counters(received=5, binding_ok=3, rate_limited=2)
    assert len(core.handle_udp(data, LOCAL, REMOTE, 1.0)) == 1
    assert core.handle_udp(data, LOCAL, REMOTE, 1.0) == []
    assert core.counters.rate_limited == 3


def test_core_limits_error_responses_too() -> None:
    """Error responses are responses: they spend the same budget."""
    core = core_with(rate=1.0, burst=2)
    answers = [core.handle_udp(UNKNOWN, LOCAL, REMOTE, 0.0) for _ in range(3)]
    assert [len(a) for a in answers] == [1, 1, 0]
    assert core.counters.error_responses == 2
    assert core.counters.rate_limited == 1


def test_core_limits_streams_too() -> None:
    """Stream requests share the per-IP budget with UDP."""
    core = core_with(rate=1.0, burst=2)
    assert len(core.handle_udp(BARE, LOCAL, REMOTE, 0.0)) == 1
    assert len(core.handle_stream_frame(WITH_ATTR, LOCAL, REMOTE, Transport.TCP, 0.0)) == 1
    assert core.handle_stream_frame(WITH_ATTR, LOCAL, REMOTE, Transport.TCP, 0.0) == []


def test_core_budget_is_per_source_ip_not_port() -> None:
    """Changing the source port does not buy a fresh budget; another IP does."""
    core = core_with(rate=1.0, burst=1)
    assert len(core.handle_udp(WITH_ATTR, LOCAL, ("198.51.100.7", 1), 0.0)) == 1
    assert core.handle_udp(WITH_ATTR, LOCAL, ("198.51.100.7", 2), 0.0) == []
    assert len(core.handle_udp(WITH_ATTR, LOCAL, ("198.51.100.8", 1), 0.0)) == 1


def test_dropped_input_does_not_spend_budget() -> None:
    """Malformed input and responses are dropped before the budget is consulted."""
    core = core_with(rate=1.0, burst=1)
    response = Message(Method.BINDING, MessageClass.SUCCESS, TID, [Software("s")]).encode()
    for _ in range(10):
        assert core.handle_udp(b"junk", LOCAL, REMOTE, 0.0) == []
        assert core.handle_udp(response, LOCAL, REMOTE, 0.0) == []
    assert len(core.handle_udp(WITH_ATTR, LOCAL, REMOTE, 0.0)) == 1
    assert core.counters.rate_limited == 0


def test_core_rate_zero_never_limits() -> None:
    """response_rate=0 disables limiting entirely."""
    core = core_with(rate=0, burst=1)
    for i in range(1000):
        data = BARE if i % 2 else WITH_ATTR
        (action,) = core.handle_udp(data, LOCAL, REMOTE, 0.0)
        assert action == SendTo(action.data, LOCAL, REMOTE)
        assert decode(action.data).cls is MessageClass.SUCCESS
    assert core.counters.rate_limited == 0
    assert core.counters.binding_ok == 1000
    assert len(core.budget) == 0


def test_core_table_stays_bounded_under_spoofed_flood() -> None:
    """Many source IPs through the core keep the budget table within its bound."""
    core = core_with(rate=5.0, burst=10)
    core.budget.max_sources = 500
    for i in range(5000):
        remote = (f"203.0.{i >> 8 & 255}.{i & 255}", 1000 + i)
        assert len(core.handle_udp(BARE, LOCAL, remote, i / 100)) == 1
        assert len(core.budget) <= 500
