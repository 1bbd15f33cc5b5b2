"""The sans-IO server core answering Binding requests (RFC 8489 section 6.3, RFC 5780).

In memory: bytes and ``now`` go in, :class:`SendTo` actions come out, compared in one line
against responses built with the codec. No sockets, no clock.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable

import pytest

from stunturn.server import (
    AlternateAddresses,
    CoreConfig,
    Counters,
    SendTo,
    ServerCore,
    Transport,
)
from stunturn.stun import (
    Attribute,
    Message,
    MessageClass,
    Method,
    UnknownAttribute,
    check_fingerprint,
    decode,
)
from stunturn.stun.attributes import (
    ChangeRequest,
    Data,
    ErrorCode,
    MappedAddress,
    OtherAddress,
    Padding,
    ResponseOrigin,
    ResponsePort,
    Software,
    UnknownAttributes,
    XorMappedAddress,
)

TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
NOW = 1000.0

PRIMARY_IP, ALT_IP = "192.0.2.10", "192.0.2.11"
PRIMARY_PORT, ALT_PORT = 3478, 3479
GRID = AlternateAddresses(PRIMARY_IP, ALT_IP, PRIMARY_PORT, ALT_PORT)
LOCAL = (PRIMARY_IP, PRIMARY_PORT)
LOCAL6 = ("2001:db8::1", 3478)
REMOTE = ("198.51.100.7", 54321)
REMOTE6 = ("2001:db8:ffff::7", 40000)

# RFC 5780 section 6.1, Table 1, written out independently of AlternateAddresses.
OTHER_IP = {PRIMARY_IP: ALT_IP, ALT_IP: PRIMARY_IP}
OTHER_PORT = {PRIMARY_PORT: ALT_PORT, ALT_PORT: PRIMARY_PORT}


def request(
    *attrs: Attribute,
    method: int = Method.BINDING,
    cls: MessageClass = MessageClass.REQUEST,
    fingerprint: bool = False,
) -> bytes:
    return Message(method, cls, TID, list(attrs)).encode(fingerprint=fingerprint)


def success(*attrs: Attribute, fingerprint: bool = False) -> bytes:
    return Message(Method.BINDING, MessageClass.SUCCESS, TID, list(attrs)).encode(
        fingerprint=fingerprint
    )


def error(
    code: int, reason: str, *attrs: Attribute, method: int = Method.BINDING, fp: bool = False
) -> bytes:
    body = [ErrorCode(code, reason), *attrs]
    return Message(method, MessageClass.ERROR, TID, body).encode(fingerprint=fp)


def plain_core(software: str | None = None) -> ServerCore:
    return ServerCore(CoreConfig(software=software))


def grid_core(software: str | None = None) -> ServerCore:
    return ServerCore(CoreConfig(rfc5780=GRID, software=software))


def grid_success(local: tuple[str, int], source: tuple[str, int], remote: tuple[str, int]) -> bytes:
    """What an RFC 5780 server sends for a request that arrived on ``local``."""
    other = (OTHER_IP[local[0]], OTHER_PORT[local[1]])
    return success(
        MappedAddress(*remote),
        XorMappedAddress(*remote),
        ResponseOrigin(*source),
        OtherAddress(*other),
    )


# --- plain Binding -----------------------------------------------------------------------------


def test_binding_success_ipv4() -> None:
    """A bare Binding request gets XOR-MAPPED-ADDRESS of its source, from where it arrived."""
    core = plain_core()
    expected = [SendTo(success(XorMappedAddress(*REMOTE)), LOCAL, REMOTE)]
    assert core.handle_udp(request(), LOCAL, REMOTE, NOW) == expected
    assert core.counters == Counters(received=1, binding_ok=1)


def test_binding_success_ipv6() -> None:
    """IPv6 sources are reflected too (XOR with the transaction ID, RFC 8489 14.2)."""
    core = plain_core()
    expected = [SendTo(success(XorMappedAddress(*REMOTE6)), LOCAL6, REMOTE6)]
    assert core.handle_udp(request(), LOCAL6, REMOTE6, NOW) == expected


def test_binding_success_mirrors_fingerprint() -> None:
    """A request with FINGERPRINT gets a response with FINGERPRINT, and vice versa."""
    core = plain_core()
    with_fp = [SendTo(success(XorMappedAddress(*REMOTE), fingerprint=True), LOCAL, REMOTE)]
    assert core.handle_udp(request(fingerprint=True), LOCAL, REMOTE, NOW) == with_fp
    with_fp6 = [SendTo(success(XorMappedAddress(*REMOTE6), fingerprint=True), LOCAL6, REMOTE6)]
    assert core.handle_udp(request(fingerprint=True), LOCAL6, REMOTE6, NOW) == with_fp6
    assert check_fingerprint(decode(with_fp[0].data))


def test_binding_response_uses_the_request_transaction_id() -> None:
    """The response carries the request's transaction ID on both paths."""
    core = plain_core()
    for tid in (bytes(12), b"\xff" * 12, bytes(range(12))):
        for attrs in ((), (Software("c"),)):
            req = Message(Method.BINDING, MessageClass.REQUEST, tid, list(attrs)).encode()
            (action,) = core.handle_udp(req, LOCAL, REMOTE, NOW)
            assert decode(action.data).transaction_id == tid


CONFIGS: dict[str, Callable[[], ServerCore]] = {
    "plain": plain_core,
    "software": functools.partial(plain_core, "stunturn test"),
    "rfc5780": grid_core,
    "rfc5780+software": functools.partial(grid_core, "stunturn test"),
}


@pytest.mark.parametrize("make_core", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("fingerprint", [False, True])
@pytest.mark.parametrize(("local", "remote"), [(LOCAL, REMOTE), (LOCAL, ("10.1.2.3", 1))])
def test_fast_path_and_general_path_agree(
    make_core: Callable[[], ServerCore],
    fingerprint: bool,
    local: tuple[str, int],
    remote: tuple[str, int],
) -> None:
    """The no-decode fast path answers exactly as the codec-built general path does."""
    core = make_core()
    bare = request(fingerprint=fingerprint)
    # An unknown comprehension-optional attribute is ignored, but forces the general path.
    decorated = request(UnknownAttribute(0xC0DE, b"ignored"), fingerprint=fingerprint)
    if ":" not in remote[0]:  # the fast path serves IPv4 requesters
        packed = int.from_bytes(socket.inet_aton(remote[0]), "big")
        assert core.binding.fast_response(bare, local, packed, remote[1]) is not None
        assert core.binding.fast_response(decorated, local, packed, remote[1]) is None
    (fast,) = core.handle_udp(bare, local, remote, NOW)
    (general,) = core.handle_udp(decorated, local, remote, NOW)
    assert isinstance(fast, SendTo) and isinstance(general, SendTo)
    assert decode(fast.data).attributes == decode(general.data).attributes
    assert fast == general
    respond, source, dest = core.binding.respond(decode(bare), local, remote, Transport.UDP)
    assert (source, dest) == (fast.local, fast.remote)
    assert respond.encode(fingerprint=fingerprint) == fast.data
    assert core.counters.binding_ok == 2


# --- dropped input -----------------------------------------------------------------------------


def test_bad_fingerprint_is_dropped_and_counted() -> None:
    """RFC 8489 6.3: a wrong FINGERPRINT means silent discard; counted apart from malformed."""
    core = plain_core()
    bare = bytearray(request(fingerprint=True))
    bare[-1] ^= 0xFF
    with_attr = bytearray(request(Software("x"), fingerprint=True))
    with_attr[-1] ^= 0xFF
    assert core.handle_udp(bytes(bare), LOCAL, REMOTE, NOW) == []
    assert core.handle_udp(bytes(with_attr), LOCAL, REMOTE, NOW) == []
    assert core.handle_udp(bytes(with_attr), LOCAL6, REMOTE6, NOW) == []
    assert core.handle_stream_frame(bytes(with_attr), LOCAL, REMOTE, Transport.TCP, NOW) == []
    assert core.counters == Counters(received=4, bad_fingerprint=4)


MALFORMED = {
    "empty": b"",
    "one-byte": b"\x00",
    "short-header": request()[:19],
    "trailing-byte": request() + b"\x00",
    "bad-cookie": request(Software("x"))[:4] + b"\x00\x00\x00\x00" + request(Software("x"))[8:],
    "top-bits": b"\x80" + request(Software("x"))[1:],
    "length-too-long": request(Software("x"))[:2] + b"\x00\x10" + request(Software("x"))[4:],
    "length-not-aligned": request(Software("x"))[:2] + b"\x00\x07" + request(Software("x"))[4:],
    "bad-attribute": request(UnknownAttribute(0x0020, b"\x00\x03\x00\x00\x00\x00\x00\x00")),
    "overrun": request(Software("abcd"))[:-4],
    "rfc3489-style": bytes(2) + b"\x00\x08" + bytes(20) + b"\x80\x22\x00\x04abcd"[:8],
}


def test_malformed_is_dropped_and_counted() -> None:
    """Input that is not valid STUN is never answered; each one is counted as malformed."""
    core = plain_core()
    for name, data in MALFORMED.items():
        assert core.handle_udp(data, LOCAL, REMOTE, NOW) == [], name
        assert core.handle_stream_frame(data, LOCAL, REMOTE, Transport.TCP, NOW) == [], name
    assert core.counters == Counters(received=2 * len(MALFORMED), malformed=2 * len(MALFORMED))


def test_count_malformed_for_unframeable_streams() -> None:
    """The I/O layer reports broken streams through count_malformed()."""
    core = plain_core()
    core.count_malformed()
    assert core.counters == Counters(malformed=1)


def test_responses_and_indications_are_ignored_and_counted() -> None:
    """Only requests are answered: responses and indications are counted as ignored."""
    core = grid_core()
    inputs = [
        request(XorMappedAddress(*REMOTE), cls=MessageClass.SUCCESS),
        request(ErrorCode(400, "Bad Request"), cls=MessageClass.ERROR),
        request(Software("x"), cls=MessageClass.INDICATION),
        request(Data(b"x"), method=Method.SEND, cls=MessageClass.INDICATION),
        request(XorMappedAddress(*REMOTE), cls=MessageClass.SUCCESS, fingerprint=True),
    ]
    for data in inputs:
        assert core.handle_udp(data, LOCAL, REMOTE, NOW) == []
        assert core.handle_stream_frame(data, LOCAL, REMOTE, Transport.TLS, NOW) == []
    assert core.counters == Counters(received=2 * len(inputs), ignored=2 * len(inputs))


BARE_NOT_BINDING_REQUESTS = {
    # Exactly 20 bytes: the size the fast path answers without looking.
    "success-response": (request(cls=MessageClass.SUCCESS), "ignored"),
    "error-response": (request(cls=MessageClass.ERROR), "ignored"),
    "indication": (request(cls=MessageClass.INDICATION), "ignored"),
    "indication+fp": (request(cls=MessageClass.INDICATION, fingerprint=True), "ignored"),
    "bad-cookie": (request()[:4] + b"\x00\x00\x00\x00" + request()[8:], "malformed"),
    "top-bits": (b"\xc0" + request()[1:], "malformed"),
    "length-4": (request()[:2] + b"\x00\x04" + request()[4:], "malformed"),
    "allocate": (request(method=Method.ALLOCATE), "error_responses"),
}


@pytest.mark.parametrize(
    ("data", "counter"), BARE_NOT_BINDING_REQUESTS.values(), ids=BARE_NOT_BINDING_REQUESTS.keys()
)
def test_bare_20_byte_non_binding_requests_are_not_answered_as_binding(
    data: bytes, counter: str
) -> None:
    """A 20-byte message that is not a Binding request must not get a Binding success."""
    core = plain_core()
    actions = core.handle_udp(data, LOCAL, REMOTE, NOW)
    assert all(decode(a.data).cls is not MessageClass.SUCCESS for a in actions)
    assert getattr(core.counters, counter) == 1
    assert core.counters.binding_ok == 0


# --- error responses ---------------------------------------------------------------------------


def test_unknown_comprehension_required_gets_420() -> None:
    """RFC 8489 6.3.1.1: 420 with UNKNOWN-ATTRIBUTES listing the unknown required types only."""
    core = plain_core()
    req = request(
        UnknownAttribute(0x7F00, b"x"), UnknownAttribute(0xC000, b""), UnknownAttribute(0x0030, b"")
    )
    expected = error(420, "Unknown Attribute", UnknownAttributes((0x7F00, 0x0030)))
    assert core.handle_udp(req, LOCAL, REMOTE, NOW) == [SendTo(expected, LOCAL, REMOTE)]
    assert core.counters == Counters(received=1, error_responses=1)


def test_420_mirrors_fingerprint_and_transport() -> None:
    """Error responses carry FINGERPRINT when the request did, and go back on its transport."""
    core = plain_core()
    req = request(UnknownAttribute(0x7F00, b""), fingerprint=True)
    expected = error(420, "Unknown Attribute", UnknownAttributes((0x7F00,)), fp=True)
    tcp = [SendTo(expected, LOCAL, REMOTE, Transport.TCP)]
    assert core.handle_stream_frame(req, LOCAL, REMOTE, Transport.TCP, NOW) == tcp


def test_unknown_comprehension_optional_is_ignored() -> None:
    """RFC 8489 6.3: unknown 0x8000-0xFFFF attributes are ignored; the request succeeds."""
    core = plain_core()
    req = request(UnknownAttribute(0x8FFF, b"opt"), UnknownAttribute(0xFFFF, b""))
    expected = [SendTo(success(XorMappedAddress(*REMOTE)), LOCAL, REMOTE)]
    assert core.handle_udp(req, LOCAL, REMOTE, NOW) == expected


@pytest.mark.parametrize(
    "method", [Method.ALLOCATE, Method.REFRESH, Method.CREATE_PERMISSION, 0x0FFF, 0x0002]
)
def test_non_binding_request_gets_400(method: int) -> None:
    """A STUN-only server answers other methods' requests with 400 of the same method."""
    core = plain_core()
    req = request(Software("client"), method=method)
    expected = [SendTo(error(400, "Bad Request", method=method), LOCAL, REMOTE)]
    assert core.handle_udp(req, LOCAL, REMOTE, NOW) == expected


# --- RFC 5780 ----------------------------------------------------------------------------------


def test_rfc5780_response_attributes() -> None:
    """RFC 5780 6.1: MAPPED-ADDRESS, XOR-MAPPED-ADDRESS, RESPONSE-ORIGIN, OTHER-ADDRESS."""
    core = grid_core()
    expected = [SendTo(grid_success(LOCAL, LOCAL, REMOTE), LOCAL, REMOTE)]
    assert core.handle_udp(request(), LOCAL, REMOTE, NOW) == expected
    assert core.handle_udp(request(Software("c")), LOCAL, REMOTE, NOW) == expected


@pytest.mark.parametrize("local", GRID.listeners(), ids=lambda a: f"{a[0]}:{a[1]}")
@pytest.mark.parametrize(
    ("change_ip", "change_port"),
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["none", "ip", "port", "both"],
)
def test_change_request_picks_the_source_listener(
    local: tuple[str, int], change_ip: bool, change_port: bool
) -> None:
    """RFC 5780 Table 1: none Da:Dp, ip Ca:Dp, port Da:Cp, both Ca:Cp; OTHER-ADDRESS Ca:Cp."""
    core = grid_core()
    source = (
        OTHER_IP[local[0]] if change_ip else local[0],
        OTHER_PORT[local[1]] if change_port else local[1],
    )
    req = request(ChangeRequest(change_ip, change_port))
    expected = [SendTo(grid_success(local, source, REMOTE), source, REMOTE)]
    assert core.handle_udp(req, local, REMOTE, NOW) == expected


@pytest.mark.parametrize("local", GRID.listeners(), ids=lambda a: f"{a[0]}:{a[1]}")
def test_fast_path_on_every_grid_listener(local: tuple[str, int]) -> None:
    """Bare requests on each of the 4 listeners name that listener and its opposite corner."""
    core = grid_core()
    expected = [SendTo(grid_success(local, local, REMOTE), local, REMOTE)]
    assert core.handle_udp(request(), local, REMOTE, NOW) == expected
    (action,) = core.handle_udp(request(fingerprint=True), local, REMOTE, NOW)
    assert isinstance(action, SendTo) and action.local == local


def test_alternate_addresses_grid() -> None:
    """AlternateAddresses lists the 4 listeners and maps each to its opposite corner."""
    assert GRID.listeners() == [
        (PRIMARY_IP, PRIMARY_PORT),
        (PRIMARY_IP, ALT_PORT),
        (ALT_IP, PRIMARY_PORT),
        (ALT_IP, ALT_PORT),
    ]
    for ip, port in GRID.listeners():
        assert GRID.other((ip, port)) == (OTHER_IP[ip], OTHER_PORT[port])
        assert GRID.source((ip, port), False, False) == (ip, port)


@pytest.mark.parametrize("make_core", [plain_core, grid_core], ids=["plain", "rfc5780"])
def test_response_port_redirects_the_destination_port(make_core: Callable[[], ServerCore]) -> None:
    """RFC 5780 7.5: the response goes to the request's source IP and the RESPONSE-PORT port."""
    core = make_core()
    (action,) = core.handle_udp(request(ResponsePort(40000)), LOCAL, REMOTE, NOW)
    assert isinstance(action, SendTo)
    assert (action.local, action.remote) == (LOCAL, (REMOTE[0], 40000))
    # XOR-MAPPED-ADDRESS still reports where the request came from.
    assert decode(action.data).get(XorMappedAddress) == XorMappedAddress(*REMOTE)


def test_response_port_with_change_request() -> None:
    """RESPONSE-PORT and CHANGE-REQUEST combine: other source, redirected port."""
    core = grid_core()
    req = request(ChangeRequest(True, True), ResponsePort(1))
    source = (ALT_IP, ALT_PORT)
    expected = [SendTo(grid_success(LOCAL, source, REMOTE), source, (REMOTE[0], 1))]
    assert core.handle_udp(req, LOCAL, REMOTE, NOW) == expected


PADDING_SIZES = [0, 1, 2, 3, 4, 5, 7, 100, 1001, 1500]


@pytest.mark.parametrize("make_core", [plain_core, grid_core], ids=["plain", "rfc5780"])
@pytest.mark.parametrize("size", PADDING_SIZES)
def test_padding_is_echoed_with_the_request_size(
    make_core: Callable[[], ServerCore], size: int
) -> None:
    """RFC 5780 6.1: PADDING comes back, sized so the response is as large as the request
    (within 4 bytes, or empty when the request is smaller than an unpadded response), never
    larger: no amplification."""
    core = make_core()
    req = request(Padding(b"\xaa" * size))
    (action,) = core.handle_udp(req, LOCAL, REMOTE, NOW)
    response = decode(action.data)
    padding = response.get(Padding)
    assert padding is not None
    unpadded = len(action.data) - 4 - len(padding.value)
    assert len(padding.value) % 4 == 0
    assert len(action.data) <= max(len(req), unpadded + 4)
    if len(req) >= unpadded + 8:
        assert len(action.data) > len(req) - 4


def test_padding_is_not_echoed_over_tcp() -> None:
    """RFC 5780 3.5: PADDING tests apply only to UDP; over TCP no PADDING comes back."""
    core = grid_core()
    req = request(Padding(bytes(100)))
    (action,) = core.handle_stream_frame(req, LOCAL, REMOTE, Transport.TCP, NOW)
    assert isinstance(action, SendTo)
    assert decode(action.data).get(Padding) is None


@pytest.mark.parametrize(
    ("make_core", "local", "remote", "size"),
    [
        (functools.partial(plain_core, "x" * 100), LOCAL, REMOTE, 65480),
        # 20 + 4 + 65483 = 65507 bytes: the largest IPv4 UDP payload.
        (grid_core, LOCAL, REMOTE, 65483),
    ],
    ids=["software-ipv4", "rfc5780-ipv4"],
)
def test_large_padding_never_breaks_the_core(
    make_core: Callable[[], ServerCore], local: tuple[str, int], remote: tuple[str, int], size: int
) -> None:
    """Even the largest UDP request with PADDING yields a list, never an exception."""
    core = make_core()
    req = request(Padding(bytes(size)))
    actions = core.handle_udp(req, local, remote, NOW)
    assert all(len(a.data) <= 20 + 0xFFFF for a in actions)


@pytest.mark.parametrize("make_core", [plain_core, grid_core], ids=["plain", "rfc5780"])
def test_padding_with_response_port_gets_400(make_core: Callable[[], ServerCore]) -> None:
    """RFC 5780 6.1 / 7.5: PADDING together with RESPONSE-PORT is answered with 400."""
    core = make_core()
    req = request(Padding(bytes(8)), ResponsePort(40000))
    expected = [SendTo(error(400, "Bad Request"), LOCAL, REMOTE)]
    assert core.handle_udp(req, LOCAL, REMOTE, NOW) == expected


@pytest.mark.parametrize("transport", [Transport.TCP, Transport.TLS])
@pytest.mark.parametrize(("change_ip", "change_port"), [(True, False), (False, True), (True, True)])
def test_change_request_over_streams_gets_400(
    transport: Transport, change_ip: bool, change_port: bool
) -> None:
    """A stream cannot be answered from another address: CHANGE-REQUEST with flags is 400."""
    core = grid_core()
    req = request(ChangeRequest(change_ip, change_port))
    expected = [SendTo(error(400, "Bad Request"), LOCAL, REMOTE, transport)]
    assert core.handle_stream_frame(req, LOCAL, REMOTE, transport, NOW) == expected


@pytest.mark.parametrize("transport", [Transport.TCP, Transport.TLS])
def test_change_request_without_flags_over_streams_succeeds(transport: Transport) -> None:
    """A CHANGE-REQUEST with no flag set asks for nothing, so it is answered normally."""
    core = grid_core()
    req = request(ChangeRequest(False, False))
    expected = [SendTo(grid_success(LOCAL, LOCAL, REMOTE), LOCAL, REMOTE, transport)]
    assert core.handle_stream_frame(req, LOCAL, REMOTE, transport, NOW) == expected


@pytest.mark.parametrize("make_core", [plain_core, grid_core], ids=["plain", "rfc5780"])
@pytest.mark.parametrize("transport", [Transport.TCP, Transport.TLS])
def test_response_port_over_streams_gets_400(
    make_core: Callable[[], ServerCore], transport: Transport
) -> None:
    """A stream cannot be answered on another port: RESPONSE-PORT over TCP/TLS is 400."""
    core = make_core()
    req = request(ResponsePort(40000))
    expected = [SendTo(error(400, "Bad Request"), LOCAL, REMOTE, transport)]
    assert core.handle_stream_frame(req, LOCAL, REMOTE, transport, NOW) == expected


def test_binding_over_tcp() -> None:
    """Over TCP the response goes back on the same connection, marked with its transport."""
    core = plain_core()
    expected = [SendTo(success(XorMappedAddress(*REMOTE)), LOCAL, REMOTE, Transport.TCP)]
    assert core.handle_stream_frame(request(), LOCAL, REMOTE, Transport.TCP, NOW) == expected


def test_channel_data_on_a_stun_only_server_is_ignored() -> None:
    """ChannelData frames (first byte 0x40-0x7F) have no allocation to go to: ignored."""
    core = plain_core()
    for frame in (b"\x40\x00\x00\x00", b"\x4f\xff\x00\x02ab"):
        assert core.handle_stream_frame(frame, LOCAL, REMOTE, Transport.TCP, NOW) == []
    assert core.counters == Counters(received=2, ignored=2)


# --- without an alternate address ---------------------------------------------------------------


def test_without_alternate_no_rfc5780_attributes() -> None:
    """Without a second IP: no MAPPED-ADDRESS, RESPONSE-ORIGIN or OTHER-ADDRESS (RFC 5780 6)."""
    core = plain_core()
    for req in (request(), request(Software("c")), request(Padding(bytes(4)))):
        (action,) = core.handle_udp(req, LOCAL, REMOTE, NOW)
        msg = decode(action.data)
        for kind in (MappedAddress, ResponseOrigin, OtherAddress):
            assert msg.get(kind) is None


@pytest.mark.parametrize(
    ("change_ip", "change_port"),
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["none", "ip", "port", "both"],
)
@pytest.mark.parametrize("transport", [Transport.UDP, Transport.TCP])
def test_without_alternate_any_change_request_gets_420(
    change_ip: bool, change_port: bool, transport: Transport
) -> None:
    """RFC 5780 6: without a second address, any CHANGE-REQUEST gets 420 listing 0x0003."""
    core = plain_core()
    req = request(ChangeRequest(change_ip, change_port))
    expected = [
        SendTo(
            error(420, "Unknown Attribute", UnknownAttributes((0x0003,))), LOCAL, REMOTE, transport
        )
    ]
    if transport is Transport.UDP:
        assert core.handle_udp(req, LOCAL, REMOTE, NOW) == expected
    else:
        assert core.handle_stream_frame(req, LOCAL, REMOTE, transport, NOW) == expected


# --- SOFTWARE ----------------------------------------------------------------------------------


def test_software_only_when_configured() -> None:
    """SOFTWARE is sent only if configured, on both the fast and the general path."""
    quiet, chatty = plain_core(), plain_core("stunturn 0.1")
    for req in (request(), request(Software("client")), request(fingerprint=True)):
        (q,) = quiet.handle_udp(req, LOCAL, REMOTE, NOW)
        (c,) = chatty.handle_udp(req, LOCAL, REMOTE, NOW)
        assert decode(q.data).get(Software) is None
        assert decode(c.data).get(Software) == Software("stunturn 0.1")
    expected = [SendTo(success(XorMappedAddress(*REMOTE), Software("stunturn 0.1")), LOCAL, REMOTE)]
    assert chatty.handle_udp(request(), LOCAL, REMOTE, NOW) == expected


def test_error_responses_carry_no_software() -> None:
    """Error responses are ERROR-CODE (+ UNKNOWN-ATTRIBUTES) only."""
    core = plain_core("stunturn 0.1")
    (action,) = core.handle_udp(request(Software("c"), method=Method.ALLOCATE), LOCAL, REMOTE, NOW)
    assert decode(action.data).attributes == [ErrorCode(400, "Bad Request")]
