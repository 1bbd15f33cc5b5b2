"""ICE candidates: priorities (RFC 8445 section 5.1.2), foundations (5.1.1.3), local preference,
and the SDP candidate syntax (RFC 8839 section 5.1), including interop with aioice's parser."""

from __future__ import annotations

import contextlib
import ipaddress
import string

import pytest
from aioice.candidate import Candidate as AioCandidate
from hypothesis import given, settings
from hypothesis import strategies as st

from stunturn.ice import (
    Candidate,
    CandidateError,
    CandidateType,
    candidate_priority,
    foundation,
    from_sdp,
    local_preference,
)
from stunturn.ice.candidate import TYPE_PREFERENCE

T = CandidateType

# --- priorities ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "local_pref", "component", "expected"),
    [
        (T.HOST, 65535, 1, 2130706431),  # 126 << 24 | 65535 << 8 | 255
        (T.PRFLX, 65535, 1, 1862270975),
        (T.SRFLX, 65535, 1, 1694498815),
        (T.RELAY, 65535, 1, 16777215),
        (T.HOST, 65535, 2, 2130706430),
        (T.HOST, 0, 1, 2113929471),
        (T.RELAY, 0, 256, 0),
        (T.SRFLX, 50000, 1, (100 << 24) + (50000 << 8) + 255),
    ],
)
def test_priority_formula(
    kind: CandidateType, local_pref: int, component: int, expected: int
) -> None:
    """RFC 8445 5.1.2.1: priority = 2^24 type pref + 2^8 local pref + (256 - component)."""
    assert candidate_priority(kind, local_pref, component) == expected


def test_recommended_type_preferences() -> None:
    """RFC 8445 5.1.2.2: host 126, peer-reflexive 110, server-reflexive 100, relayed 0."""
    assert TYPE_PREFERENCE == {T.HOST: 126, T.PRFLX: 110, T.SRFLX: 100, T.RELAY: 0}


@given(
    st.sampled_from(list(T)),
    st.sampled_from(list(T)),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.integers(1, 256),
)
def test_type_preference_dominates(
    a: CandidateType, b: CandidateType, lp_a: int, lp_b: int, component: int
) -> None:
    """Whatever the local preferences, a better type gives a higher priority (host > prflx >
    srflx > relay), and every priority fits in 32 bits."""
    pa, pb = candidate_priority(a, lp_a, component), candidate_priority(b, lp_b, component)
    assert 0 <= pa < 2**32 and 0 <= pb < 2**32
    if TYPE_PREFERENCE[a] > TYPE_PREFERENCE[b]:
        assert pa > pb


@given(st.sampled_from(list(T)), st.integers(0, 65534), st.integers(1, 256))
def test_local_preference_orders_within_a_type(
    kind: CandidateType, local_pref: int, component: int
) -> None:
    """A higher local preference gives a higher priority within one type and component."""
    assert candidate_priority(kind, local_pref + 1, component) > candidate_priority(
        kind, local_pref, component
    )


@pytest.mark.parametrize("local_pref", [-1, 65536])
def test_local_preference_out_of_range(local_pref: int) -> None:
    """Local preferences outside 0-65535 are a programming error."""
    with pytest.raises(ValueError, match="local preference"):
        candidate_priority(T.HOST, local_pref)


# --- local preference -------------------------------------------------------------------------


def test_local_preference_dual_stack_order() -> None:
    """RFC 8421 spirit: global IPv6 above IPv4 above link-local/ULA IPv6, at equal index."""
    v6_global = local_preference("2606:4700::1111")
    v4 = local_preference("192.0.2.10")
    v6_ula = local_preference("fd00::1")
    v6_link = local_preference("fe80::1%eth0")
    assert v6_global > v4 > v6_ula
    assert v6_link == v6_ula


addresses = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)


@given(addresses, st.integers(0, 998))
def test_local_preference_in_range_and_decreasing(host: str, index: int) -> None:
    """Within a realistic number of interfaces (< 1000) preferences stay in 0-65535, are
    distinct per interface index, and earlier interfaces rank higher."""
    first, second = local_preference(host, index), local_preference(host, index + 1)
    assert 0 <= second < first <= 65535


@given(st.integers(0, 999))
def test_local_preference_family_order_holds_per_index(index: int) -> None:
    """For the same interface index the family order never inverts."""
    assert (
        local_preference("2606:4700::1", index)
        > local_preference("198.51.100.1", index)
        > local_preference("fd00::1", index)
    )


# --- foundations --------------------------------------------------------------------------------


def test_foundation_equal_for_same_type_base_server_transport() -> None:
    """RFC 8445 5.1.1.3: same type, base IP, server and transport give the same foundation."""
    assert foundation(T.SRFLX, "10.0.0.2", "203.0.113.1") == foundation(
        T.SRFLX, "10.0.0.2", "203.0.113.1", "udp"
    )
    assert foundation(T.HOST, "10.0.0.2") == foundation(T.HOST, "10.0.0.2", None)


@pytest.mark.parametrize(
    "other",
    [
        (T.HOST, "10.0.0.2", "203.0.113.1", "udp"),  # type
        (T.SRFLX, "10.0.0.3", "203.0.113.1", "udp"),  # base IP
        (T.SRFLX, "10.0.0.2", "203.0.113.9", "udp"),  # server
        (T.SRFLX, "10.0.0.2", None, "udp"),  # no server
        (T.SRFLX, "10.0.0.2", "203.0.113.1", "tcp"),  # transport
    ],
)
def test_foundation_differs_when_any_input_differs(
    other: tuple[CandidateType, str, str | None, str],
) -> None:
    """Changing any one of type, base IP, server or transport changes the foundation."""
    assert foundation(*other) != foundation(T.SRFLX, "10.0.0.2", "203.0.113.1", "udp")


@given(st.sampled_from(list(T)), addresses, st.none() | addresses)
def test_foundation_is_short_ice_chars(kind: CandidateType, base: str, server: str | None) -> None:
    """RFC 8839: a foundation is 1 to 32 ice-chars; ours are decimal digits, stable."""
    value = foundation(kind, base, server)
    assert 1 <= len(value) <= 32 and value.isdigit() and value.isascii()
    assert value == foundation(kind, base, server)


# --- SDP ----------------------------------------------------------------------------------------

HOST_LINE = "candidate:1467250027 1 udp 2122260223 192.0.2.10 54400 typ host"
SRFLX_LINE = (
    "candidate:435653019 1 udp 1686052607 198.51.100.7 40000 typ srflx raddr 192.0.2.10 rport 54400"
)


def test_parse_host_candidate() -> None:
    """The module docstring's host example parses field by field."""
    c = from_sdp(HOST_LINE)
    assert c == Candidate("1467250027", 1, "udp", 2122260223, "192.0.2.10", 54400, T.HOST)
    assert c.address == ("192.0.2.10", 54400)
    assert not c.v6
    assert c.to_sdp() == HOST_LINE


def test_parse_srflx_with_related_address() -> None:
    """raddr/rport become the related address and are written back in place."""
    c = from_sdp(SRFLX_LINE)
    assert (c.type, c.related_host, c.related_port) == (T.SRFLX, "192.0.2.10", 54400)
    assert c.to_sdp() == SRFLX_LINE


@pytest.mark.parametrize(
    "line",
    [
        "a=" + HOST_LINE,
        "a=" + HOST_LINE + "\r\n",
        "  " + HOST_LINE + "  ",
        HOST_LINE.replace(" ", "  "),
    ],
)
def test_prefix_and_whitespace_tolerated(line: str) -> None:
    """The ``a=`` prefix, a line ending and extra spaces do not matter."""
    assert from_sdp(line) == from_sdp(HOST_LINE)


def test_extensions_kept_in_order() -> None:
    """Unknown attribute pairs (generation, ufrag, network-id, network-cost) survive a round
    trip in their order; they do not take part in equality."""
    line = (
        "candidate:842163049 1 udp 1677729535 203.0.113.5 61665 typ srflx raddr 10.0.0.5 "
        "rport 61665 generation 0 ufrag EsAw network-id 1 network-cost 10"
    )
    c = from_sdp(line)
    assert c.extensions == (
        ("generation", "0"),
        ("ufrag", "EsAw"),
        ("network-id", "1"),
        ("network-cost", "10"),
    )
    assert c.to_sdp() == line
    assert c == from_sdp(line.split(" generation", maxsplit=1)[0])


def test_ipv6_candidate() -> None:
    """IPv6 addresses parse, are flagged v6 and round-trip."""
    line = "candidate:3 1 UDP 2122262783 2001:db8::5 50000 typ host generation 0"
    c = from_sdp(line)
    assert c.v6 and c.host == "2001:db8::5" and c.transport == "udp"
    assert from_sdp(c.to_sdp()) == c
    relayed = from_sdp(
        "candidate:4 1 udp 16777215 2001:db8::100 50001 typ relay raddr 2001:db8::5 rport 50000"
    )
    assert relayed.type is T.RELAY and relayed.related_host == "2001:db8::5"


def test_tcp_candidates_parse() -> None:
    """TCP candidates parse with their transport and tcptype kept, so callers can skip them."""
    c = from_sdp("a=candidate:2 1 TCP 1518280447 192.0.2.10 9 typ host tcptype active generation 0")
    assert c.transport == "tcp"
    assert c.extensions == (("tcptype", "active"), ("generation", "0"))
    assert "tcptype active" in c.to_sdp()


def test_hostname_kept() -> None:
    """mDNS host names are kept as given (resolving is the caller's business)."""
    c = from_sdp("candidate:1 1 udp 2122260223 6d4a3b1c-9e1f.local 54400 typ host")
    assert c.host == "6d4a3b1c-9e1f.local"


def test_with_priority() -> None:
    """with_priority returns a copy with only the priority changed."""
    c = from_sdp(SRFLX_LINE)
    d = c.with_priority(5)
    assert d.priority == 5 and c.priority == 1686052607
    assert (d.host, d.port, d.related_port) == (c.host, c.port, c.related_port)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "a=",
        "candidate:",
        "a=ice-ufrag:abcd",
        "candidate:1 1 udp 2122260223 192.0.2.10 54400 host",  # no typ
        "candidate:1 1 udp 2122260223 192.0.2.10 54400 kind host",
        "candidate:1 1 udp 2122260223 192.0.2.10 54400 typ",
        "candidate:1 1 udp 2122260223 192.0.2.10 54400 typ local",  # unknown type
        "candidate:1 1 udp 2122260223 192.0.2.10 54400 typ HOST",  # types are case-sensitive
        "candidate:1 x udp 2122260223 192.0.2.10 54400 typ host",
        "candidate:1 1 udp prio 192.0.2.10 54400 typ host",
        "candidate:1 1 udp 2122260223 192.0.2.10 port typ host",
        "candidate:1 0 udp 2122260223 192.0.2.10 54400 typ host",  # component 0
        "candidate:1 257 udp 2122260223 192.0.2.10 54400 typ host",
        "candidate:1 1 udp -1 192.0.2.10 54400 typ host",
        "candidate:1 1 udp 4294967296 192.0.2.10 54400 typ host",
        "candidate:1 1 udp 2122260223 192.0.2.10 65536 typ host",
        "candidate:1 1 udp 2122260223 192.0.2.10 -1 typ host",
        "candidate:1 1 udp 1 192.0.2.10 1 typ srflx raddr",  # odd attribute list
        "candidate:1 1 udp 1 192.0.2.10 1 typ srflx raddr 10.0.0.1 rport x",
        "candidate 1 1 udp 2122260223 192.0.2.10 54400 typ host",
    ],
)
def test_malformed_lines_raise_candidate_error(line: str) -> None:
    """Every malformed line raises CandidateError (a ValueError), nothing else."""
    with pytest.raises(CandidateError):
        from_sdp(line)
    assert issubclass(CandidateError, ValueError)


@pytest.mark.parametrize(
    "line",
    [
        "candidate:1 1 udp \uff12\uff11\uff12 192.0.2.10 54400 typ host",  # fullwidth digits
        "candidate:1 1 udp 2122260223 192.0.2.10 \u0665\u0664 typ host",  # Arabic-Indic digits
        "candidate:1 1 udp 2_122_260_223 192.0.2.10 54400 typ host",
        "candidate:1 +1 udp 2122260223 192.0.2.10 54400 typ host",
        "candidate:1 1 udp 1 192.0.2.10 1 typ srflx raddr 10.0.0.1 rport 99999",
    ],
)
def test_numbers_are_ascii_digits_in_range(line: str) -> None:
    """RFC 8839's grammar: component, priority, port and rport are ASCII DIGITs (rport a port).
    Python's int() also takes other Unicode digits, underscores and a sign, and rport is never
    range-checked, so these lines parse instead of raising."""
    with pytest.raises(CandidateError):
        from_sdp(line)


tokens = st.text(string.ascii_letters + string.digits + "+/-._", min_size=1, max_size=12)
ips = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(
    lambda ip: ipaddress.ip_address(ip).compressed
)


@st.composite
def candidates(draw: st.DrawFn) -> Candidate:
    kind = draw(st.sampled_from(list(T)))
    related = draw(st.none() | st.tuples(ips, st.integers(0, 65535)))
    ext_names = st.text(string.ascii_lowercase + "-", min_size=1, max_size=10).filter(
        lambda n: n not in ("raddr", "rport")
    )
    return Candidate(
        foundation=draw(
            st.text(string.ascii_letters + string.digits + "+/", min_size=1, max_size=32)
        ),
        component=draw(st.integers(1, 256)),
        transport=draw(st.sampled_from(["udp", "tcp"])),
        priority=draw(st.integers(0, 2**32 - 1)),
        host=draw(ips),
        port=draw(st.integers(0, 65535)),
        type=kind,
        related_host=None if related is None else related[0],
        related_port=None if related is None else related[1],
        extensions=tuple(draw(st.lists(st.tuples(ext_names, tokens), max_size=4))),
    )


@settings(max_examples=300, deadline=None)
@given(candidates(), st.booleans())
def test_sdp_round_trip(candidate: Candidate, prefix: bool) -> None:
    """to_sdp then from_sdp gives the same candidate, extensions included, with or without
    ``a=``."""
    line = ("a=" if prefix else "") + candidate.to_sdp()
    parsed = from_sdp(line)
    assert parsed == candidate
    assert parsed.extensions == candidate.extensions
    assert parsed.to_sdp() == candidate.to_sdp()


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(max_size=120),
        st.lists(st.one_of(tokens, st.text(max_size=6)), max_size=14).map(
            lambda parts: "candidate:" + " ".join(parts)
        ),
        candidates().flatmap(
            lambda c: st.integers(0, len(c.to_sdp())).map(lambda n: c.to_sdp()[:n])
        ),
    )
)
def test_garbage_raises_only_candidate_error(text: str) -> None:
    """Any text either parses or raises CandidateError: no other exception escapes."""
    with contextlib.suppress(CandidateError):
        assert isinstance(from_sdp(text), Candidate)


# --- interop with aioice --------------------------------------------------------------------


@pytest.mark.parametrize(
    "theirs",
    [
        AioCandidate("1", 1, "udp", 2130706431, "192.0.2.10", 54400, "host", generation=0),
        AioCandidate(
            "3bd5", 1, "udp", 1694498815, "198.51.100.7", 40000, "srflx", "192.0.2.10", 54400
        ),
        AioCandidate("9", 1, "udp", 16777215, "2001:db8::100", 50000, "relay", "2001:db8::5", 9),
        AioCandidate("7", 1, "tcp", 1518280447, "192.0.2.10", 9, "host", tcptype="passive"),
    ],
)
def test_parse_aioice_candidates(theirs: AioCandidate) -> None:
    """aioice writes the value after ``candidate:``; with that prefix we parse every field and
    keep its tcptype/generation as extensions."""
    ours = from_sdp("a=candidate:" + theirs.to_sdp())
    assert (ours.foundation, ours.component, ours.transport, ours.priority) == (
        theirs.foundation,
        theirs.component,
        theirs.transport,
        theirs.priority,
    )
    assert (ours.host, ours.port, ours.type.value) == (theirs.host, theirs.port, theirs.type)
    assert (ours.related_host, ours.related_port) == (theirs.related_address, theirs.related_port)
    extensions = dict(ours.extensions)
    assert extensions.get("tcptype") == theirs.tcptype
    assert extensions.get("generation") == (
        None if theirs.generation is None else str(theirs.generation)
    )


@settings(max_examples=100, deadline=None)
@given(candidates())
def test_aioice_parses_ours(candidate: Candidate) -> None:
    """aioice's from_sdp reads what our to_sdp writes (after the ``candidate:`` prefix)."""
    theirs = AioCandidate.from_sdp(candidate.to_sdp().removeprefix("candidate:"))
    assert (theirs.foundation, theirs.component, theirs.transport, theirs.priority) == (
        candidate.foundation,
        candidate.component,
        candidate.transport,
        candidate.priority,
    )
    assert (theirs.host, theirs.port, theirs.type) == (
        candidate.host,
        candidate.port,
        candidate.type.value,
    )
    assert (theirs.related_address, theirs.related_port) == (
        candidate.related_host,
        candidate.related_port,
    )
