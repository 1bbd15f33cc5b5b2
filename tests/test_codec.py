"""Attribute and message codec: round trips, malformed input, header rules, ordering rules.

Unit and property tests of :mod:`stunturn.stun.attributes` and :mod:`stunturn.stun.message`.
No sockets, no clock. RFC section numbers refer to RFC 8489 unless stated otherwise.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stunturn.stun import (
    ATTRIBUTE_CLASSES,
    Attribute,
    AttrType,
    Message,
    MessageClass,
    Method,
    StunParseError,
    UnknownAttribute,
    attribute_type,
    build,
    check_fingerprint,
    check_integrity,
    decode,
    looks_like_stun,
    message_type,
    split_message_type,
)
from stunturn.stun.attributes import (
    AdditionalAddressFamily,
    AddressErrorCode,
    AlternateDomain,
    AlternateServer,
    ChangedAddress,
    ChangeRequest,
    ChannelNumber,
    ConnectionId,
    Data,
    DontFragment,
    ErrorCode,
    EvenPort,
    Fingerprint,
    IceControlled,
    IceControlling,
    Icmp,
    Lifetime,
    MappedAddress,
    MessageIntegrity,
    MessageIntegritySha256,
    Nonce,
    OtherAddress,
    Padding,
    PasswordAlgorithm,
    PasswordAlgorithms,
    Priority,
    Realm,
    ReflectedFrom,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    ResponseAddress,
    ResponseOrigin,
    ResponsePort,
    Software,
    SourceAddress,
    UnknownAttributes,
    UseCandidate,
    Userhash,
    Username,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
)

TID = bytes(range(12))
OTHER_TID = bytes(range(100, 112))

PLAIN_ADDRESS_TYPES = (
    MappedAddress,
    AlternateServer,
    ResponseOrigin,
    OtherAddress,
    ResponseAddress,
    SourceAddress,
    ChangedAddress,
    ReflectedFrom,
)
XOR_ADDRESS_TYPES = (XorMappedAddress, XorPeerAddress, XorRelayedAddress)
TEXT_TYPES = (Username, Realm, Nonce, Software, AlternateDomain)
INTEGRITY_TYPES = (MessageIntegrity, MessageIntegritySha256, Fingerprint)

# --- hypothesis strategies, one per attribute class -------------------------------------------


def _canonical(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The text form the codec produces (inet_ntop), so decoded == original compares exactly."""
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    return socket.inet_ntop(family, addr.packed)


hosts = st.ip_addresses().map(_canonical)
u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
reasons = st.text(max_size=40)
error_codes = st.integers(300, 699)
algorithm_entries = st.tuples(u16, st.binary(max_size=12))


def _text_strategy(max_bytes: int) -> st.SearchStrategy[str]:
    # At most 4 UTF-8 bytes per character, so any drawn string fits the byte limit.
    return st.text(max_size=max_bytes // 4)


ATTRIBUTE_STRATEGIES: dict[type[Attribute], st.SearchStrategy[Attribute]] = {
    **{cls: st.builds(cls, hosts, u16) for cls in PLAIN_ADDRESS_TYPES},
    **{cls: st.builds(cls, hosts, u16) for cls in XOR_ADDRESS_TYPES},
    **{cls: st.builds(cls, _text_strategy(cls.MAX_BYTES)) for cls in TEXT_TYPES},
    MessageIntegrity: st.builds(MessageIntegrity, st.binary(min_size=20, max_size=20)),
    MessageIntegritySha256: st.sampled_from([16, 20, 24, 28, 32]).flatmap(
        lambda n: st.builds(MessageIntegritySha256, st.binary(min_size=n, max_size=n))
    ),
    Userhash: st.builds(Userhash, st.binary(min_size=32, max_size=32)),
    Data: st.builds(Data, st.binary(max_size=300)),
    Padding: st.builds(Padding, st.binary(max_size=300)),
    ReservationToken: st.builds(ReservationToken, st.binary(min_size=8, max_size=8)),
    DontFragment: st.just(DontFragment()),
    UseCandidate: st.just(UseCandidate()),
    Fingerprint: st.builds(Fingerprint, u32),
    Lifetime: st.builds(Lifetime, u32),
    ConnectionId: st.builds(ConnectionId, u32),
    Priority: st.builds(Priority, u32),
    IceControlled: st.builds(IceControlled, u64),
    IceControlling: st.builds(IceControlling, u64),
    ChannelNumber: st.builds(ChannelNumber, u16),
    ResponsePort: st.builds(ResponsePort, u16),
    RequestedTransport: st.builds(RequestedTransport, u8),
    RequestedAddressFamily: st.builds(RequestedAddressFamily, u8),
    AdditionalAddressFamily: st.builds(AdditionalAddressFamily, u8),
    EvenPort: st.builds(EvenPort, st.booleans()),
    ChangeRequest: st.builds(ChangeRequest, st.booleans(), st.booleans()),
    ErrorCode: st.builds(ErrorCode, error_codes, reasons),
    AddressErrorCode: st.builds(AddressErrorCode, u8, error_codes, reasons),
    UnknownAttributes: st.builds(UnknownAttributes, st.lists(u16, max_size=9).map(tuple)),
    Icmp: st.builds(Icmp, u8, u8, u32),
    PasswordAlgorithm: st.builds(PasswordAlgorithm, u16, st.binary(max_size=12)),
    PasswordAlgorithms: st.builds(
        PasswordAlgorithms, st.lists(algorithm_entries, max_size=4).map(tuple)
    ),
}

# Attributes that take any value: nothing about their bytes can be malformed.
ANY_VALUE_TYPES = (Data, Padding)

UNKNOWN_TYPES = st.integers(0, 0xFFFF).filter(lambda t: t not in ATTRIBUTE_CLASSES)
unknown_attributes = st.builds(UnknownAttribute, UNKNOWN_TYPES, st.binary(max_size=40))

# Attributes that can appear anywhere in a message (integrity attributes change what follows).
body_attributes: st.SearchStrategy[Attribute] = st.one_of(
    unknown_attributes,
    *(s for cls, s in ATTRIBUTE_STRATEGIES.items() if cls not in INTEGRITY_TYPES),
)

# One fixed instance of every class, IPv4 and IPv6 for addresses; the fuzz tests mutate these.
SAMPLES: list[Attribute] = [
    *(cls("192.0.2.1", 32853) for cls in PLAIN_ADDRESS_TYPES + XOR_ADDRESS_TYPES),
    *(cls("2001:db8:1234:5678:11:2233:4455:6677", 3478) for cls in XOR_ADDRESS_TYPES),
    MappedAddress("::1", 1),
    Username("evtj:h6vY"),
    Realm("example.org"),
    Nonce("obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA"),
    Software("stunturn test"),
    AlternateDomain("turn.example.org"),
    Userhash(bytes(32)),
    Data(b"hello"),
    Padding(bytes(7)),
    ReservationToken(b"12345678"),
    DontFragment(),
    UseCandidate(),
    Lifetime(600),
    ConnectionId(0xDEADBEEF),
    Priority(0x6E0001FF),
    IceControlled(0x932FF9B151263B36),
    IceControlling(1),
    ChannelNumber(0x4001),
    ResponsePort(40000),
    RequestedTransport(17),
    RequestedAddressFamily(2),
    AdditionalAddressFamily(2),
    EvenPort(True),
    ChangeRequest(True, False),
    ErrorCode(420, "Unknown Attribute"),
    AddressErrorCode(2, 440, "Address Family not Supported"),
    UnknownAttributes((0x7ABC, 0x0030, 0x0003)),
    Icmp(3, 1, 0x01020304),
    PasswordAlgorithm(2),
    PasswordAlgorithms(((1, b""), (2, b""), (9, b"abc"))),
    UnknownAttribute(0x7ABC, b"raw"),
    UnknownAttribute(0xC0DE, b"optional"),
]


def _addr_value(family: int, ip_len: int) -> bytes:
    return bytes((0, family)) + b"\x12\x34" + b"\x01" * ip_len


ADDRESS_MALFORMED = [
    b"",
    b"\x00\x01\x00",
    _addr_value(1, 3),
    _addr_value(1, 5),
    _addr_value(1, 16),
    _addr_value(2, 4),
    _addr_value(2, 15),
    _addr_value(2, 17),
    _addr_value(0, 4),
    _addr_value(3, 4),
    _addr_value(3, 16),
    _addr_value(0xFF, 16),
]
BAD_UTF8 = [b"\xff", b"abc\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"ok\xfe\xfeok"]
ERROR_CODE_MALFORMED = [
    b"",
    b"\x00\x00\x04",
    b"\x00\x00\x00\x00",  # class 0
    b"\x00\x00\x02\x00",  # class 2
    b"\x00\x00\x07\x00",  # class 7
    b"\x00\x00\x04\x64",  # number 100
    b"\x00\x00\x04\xff",  # number 255
    b"\x00\x00\x04\x00\xff\xfe",  # reason not UTF-8
    b"\x00\x00\x04\x00" + b"a" * 764,  # reason longer than 763 bytes
]
ALGORITHMS_MALFORMED = [
    b"\x00",  # truncated header
    b"\x00\x01\x00",
    b"\x00\x01\x00\x08\x00\x00\x00\x00",  # parameters overrun
    b"\x00\x01\x00\x01\x00",  # parameter padding missing
    b"\x00\x01\x00\x00\x00\x02",  # second entry truncated
]


def _lengths(*sizes: int) -> list[bytes]:
    return [b"\x00" * n for n in sizes]


MALFORMED: dict[type[Attribute], list[bytes]] = {
    **{cls: ADDRESS_MALFORMED for cls in PLAIN_ADDRESS_TYPES + XOR_ADDRESS_TYPES},
    **{cls: [*BAD_UTF8, b"a" * (cls.MAX_BYTES + 1)] for cls in TEXT_TYPES},
    MessageIntegrity: _lengths(0, 16, 19, 21, 32),
    MessageIntegritySha256: _lengths(0, 4, 12, 15, 17, 18, 30, 31, 33, 36, 64),
    Userhash: _lengths(0, 20, 31, 33),
    ReservationToken: _lengths(0, 4, 7, 9),
    DontFragment: _lengths(1, 4),
    UseCandidate: _lengths(1, 4),
    Fingerprint: _lengths(0, 3, 5, 8),
    Lifetime: _lengths(0, 2, 3, 5, 8),
    ConnectionId: _lengths(0, 3, 5, 8),
    Priority: _lengths(0, 3, 5, 8),
    IceControlled: _lengths(0, 4, 7, 9, 16),
    IceControlling: _lengths(0, 4, 7, 9, 16),
    ChannelNumber: _lengths(0, 2, 3, 5, 8),
    ResponsePort: _lengths(0, 2, 3, 5, 8),
    RequestedTransport: _lengths(0, 1, 3, 5, 8),
    RequestedAddressFamily: _lengths(0, 1, 3, 5, 8),
    AdditionalAddressFamily: _lengths(0, 1, 3, 5, 8),
    EvenPort: _lengths(0, 2, 4),
    ChangeRequest: _lengths(0, 1, 3, 5, 8),
    ErrorCode: ERROR_CODE_MALFORMED,
    AddressErrorCode: ERROR_CODE_MALFORMED,
    UnknownAttributes: [b"\x00", b"\x00\x01\x00", b"\x00\x01\x00\x02\x00"],
    Icmp: _lengths(0, 4, 7, 9, 16),
    PasswordAlgorithm: [b"", *ALGORITHMS_MALFORMED, bytes.fromhex("00010000 00020000")],
    PasswordAlgorithms: ALGORITHMS_MALFORMED,
}


def _raw_message(body: bytes, mtype: int = 0x0001, tid: bytes = TID) -> bytes:
    """A header with a consistent length field in front of hand-built attribute bytes."""
    return struct.pack("!HHI12s", mtype, len(body), 0x2112A442, tid) + body


def _raw_attr(atype: int, value: bytes, pad: bytes = b"\x00") -> bytes:
    return struct.pack("!HH", atype, len(value)) + value + pad * (-len(value) % 4)


# --- coverage of the registry ------------------------------------------------------------------


def test_every_registered_class_has_a_strategy_a_sample_and_malformed_cases() -> None:
    """Adding an attribute class to the registry without tests here fails this test."""
    registered = set(ATTRIBUTE_CLASSES.values())
    assert set(ATTRIBUTE_STRATEGIES) == registered
    assert {type(a) for a in SAMPLES} == registered - set(INTEGRITY_TYPES) | {UnknownAttribute}
    assert set(MALFORMED) == registered - set(ANY_VALUE_TYPES)


def test_registry_is_keyed_by_the_class_type_code() -> None:
    """ATTRIBUTE_CLASSES maps each wire code to the class whose TYPE is that code."""
    for code, cls in ATTRIBUTE_CLASSES.items():
        assert code == cls.TYPE
        assert code in set(AttrType)


# --- attribute round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(ATTRIBUTE_CLASSES.values()), ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_attribute_value_round_trip(cls: type[Attribute], data: st.DataObject) -> None:
    """decode_value(encode_value(a)) == a for every class, under a random transaction ID."""
    attr = data.draw(ATTRIBUTE_STRATEGIES[cls])
    tid = data.draw(st.binary(min_size=12, max_size=12))
    value = attr.encode_value(tid)
    assert cls.decode_value(value, tid) == attr
    assert attribute_type(attr) == cls.TYPE


@pytest.mark.parametrize("cls", list(ATTRIBUTE_CLASSES.values()), ids=lambda c: c.__name__)
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_attribute_round_trip_inside_a_message(cls: type[Attribute], data: st.DataObject) -> None:
    """An attribute alone in a message survives encode/decode, padding included."""
    attr = data.draw(ATTRIBUTE_STRATEGIES[cls])
    raw = Message(Method.BINDING, MessageClass.REQUEST, TID, [attr]).encode()
    assert len(raw) % 4 == 0
    assert decode(raw).attributes == [attr]


@given(attr=unknown_attributes)
def test_unknown_attribute_value_round_trip(attr: UnknownAttribute) -> None:
    """Unknown attributes decode to UnknownAttribute with the raw value, and encode it back."""
    raw = Message(Method.BINDING, MessageClass.REQUEST, TID, [attr]).encode()
    assert decode(raw).attributes == [attr]
    assert attribute_type(attr) == attr.type


@pytest.mark.parametrize("cls", TEXT_TYPES, ids=lambda c: c.__name__)
def test_text_attributes_accept_exactly_their_byte_limit(cls: type[Username]) -> None:
    """MAX_BYTES bytes of UTF-8 decode; one more is refused by both directions."""
    assert cls.decode_value(b"a" * cls.MAX_BYTES, TID) == cls("a" * cls.MAX_BYTES)
    with pytest.raises(ValueError):
        cls("a" * (cls.MAX_BYTES + 1)).encode_value(TID)


def test_utf8_text_is_decoded_not_latin1() -> None:
    """Text attributes carry UTF-8 (RFC 8489 sections 14.3, 14.9, 14.10, 14.14)."""
    assert Realm.decode_value("例え.jp".encode(), TID) == Realm("例え.jp")
    assert Software("é").encode_value(TID) == b"\xc3\xa9"


# --- malformed attribute values ----------------------------------------------------------------

MALFORMED_CASES = [(cls, bad) for cls, bads in MALFORMED.items() for bad in bads]


@pytest.mark.parametrize(
    ("cls", "bad"),
    MALFORMED_CASES,
    ids=[f"{c.__name__}-{b[:12].hex()}" for c, b in MALFORMED_CASES],
)
def test_malformed_value_raises_stun_parse_error(cls: type[Attribute], bad: bytes) -> None:
    """Wrong lengths, bad family, bad UTF-8 and bad error classes raise StunParseError."""
    with pytest.raises(StunParseError):
        cls.decode_value(bad, TID)
    with pytest.raises(StunParseError):
        decode(_raw_message(_raw_attr(cls.TYPE, bad)))


@pytest.mark.parametrize("cls", ANY_VALUE_TYPES, ids=lambda c: c.__name__)
def test_opaque_attributes_take_any_bytes(cls: type[Data]) -> None:
    """DATA and PADDING carry arbitrary bytes of any length."""
    for n in (0, 1, 3, 4, 5, 1000):
        value = bytes(range(256)) * 4
        assert cls.decode_value(value[:n], TID) == cls(value[:n])


def test_error_code_reserved_bits_and_class_bits() -> None:
    """Only the low 3 bits of the class byte are the class (RFC 8489 section 14.8)."""
    assert ErrorCode.decode_value(b"\xff\xff\xfc\x01Bad", TID) == ErrorCode(401, "Bad")
    assert ErrorCode(699, "x").encode_value(TID) == b"\x00\x00\x06\x63x"
    for code in (0, 299, 700, 1000):
        with pytest.raises(ValueError):
            ErrorCode(code).encode_value(TID)


def test_address_error_code_carries_family_in_first_byte() -> None:
    """ADDRESS-ERROR-CODE: family, reserved bits, class, number, reason (RFC 8656 18.12)."""
    value = AddressErrorCode(2, 440, "x").encode_value(TID)
    assert value == b"\x02\x00\x04\x28x"
    assert AddressErrorCode.decode_value(value, TID) == AddressErrorCode(2, 440, "x")


def test_fixed_layouts() -> None:
    """Byte layouts of the small fixed attributes, checked against their RFC figures."""
    assert ChangeRequest(True, True).encode_value(TID) == b"\x00\x00\x00\x06"
    assert ChangeRequest(True, False).encode_value(TID) == b"\x00\x00\x00\x04"
    assert ChangeRequest(False, True).encode_value(TID) == b"\x00\x00\x00\x02"
    assert ChangeRequest.decode_value(b"\xff\xff\xff\xf9", TID) == ChangeRequest(False, False)
    assert ResponsePort(0x1234).encode_value(TID) == b"\x12\x34\x00\x00"
    assert ChannelNumber(0x4000).encode_value(TID) == b"\x40\x00\x00\x00"
    assert RequestedTransport(17).encode_value(TID) == b"\x11\x00\x00\x00"
    assert EvenPort(True).encode_value(TID) == b"\x80"
    assert EvenPort.decode_value(b"\x7f", TID) == EvenPort(False)
    assert Icmp(3, 1, 7).encode_value(TID) == b"\x00\x00\x03\x01\x00\x00\x00\x07"
    assert UnknownAttributes((1, 2, 3)).encode_value(TID) == b"\x00\x01\x00\x02\x00\x03"
    assert PasswordAlgorithms(((1, b""), (2, b"abcde"))).encode_value(TID) == bytes.fromhex(
        "00010000 00020005 6162636465000000"
    )


# --- addresses ---------------------------------------------------------------------------------

ADDRESS_TYPES = PLAIN_ADDRESS_TYPES + XOR_ADDRESS_TYPES
V4 = ("192.0.2.1", 32853)
V6 = ("2001:db8:1234:5678:11:2233:4455:6677", 32853)


@pytest.mark.parametrize("cls", ADDRESS_TYPES, ids=lambda c: c.__name__)
@pytest.mark.parametrize(("addr", "family", "size"), [(V4, 1, 8), (V6, 2, 20)], ids=["v4", "v6"])
def test_address_attribute_ipv4_and_ipv6(
    cls: type[MappedAddress], addr: tuple[str, int], family: int, size: int
) -> None:
    """Every address attribute encodes IPv4 in 8 bytes and IPv6 in 20, family 1 or 2."""
    value = cls(*addr).encode_value(TID)
    assert (len(value), value[0], value[1]) == (size, 0, family)
    decoded = cls.decode_value(value, TID)
    assert decoded == cls(*addr)
    assert decoded.address == addr


@pytest.mark.parametrize("cls", XOR_ADDRESS_TYPES, ids=lambda c: c.__name__)
def test_xor_address_depends_on_transaction_id_only_for_ipv6(cls: type[XorMappedAddress]) -> None:
    """RFC 8489 14.2: IPv4 is XOR'd with the cookie, IPv6 with cookie + transaction ID."""
    assert cls(*V4).encode_value(TID) == cls(*V4).encode_value(OTHER_TID)
    v6 = cls(*V6).encode_value(TID)
    assert v6 != cls(*V6).encode_value(OTHER_TID)
    assert cls.decode_value(v6, TID) == cls(*V6)
    assert cls.decode_value(v6, OTHER_TID) != cls(*V6)
    # The port and first 4 address bytes are XOR'd with the cookie alone, whatever the TID.
    assert cls(*V6).encode_value(OTHER_TID)[:8] == v6[:8]


@pytest.mark.parametrize("cls", PLAIN_ADDRESS_TYPES, ids=lambda c: c.__name__)
def test_plain_address_is_not_xored(cls: type[MappedAddress]) -> None:
    """MAPPED-ADDRESS layout carries port and address in the clear."""
    assert cls(*V4).encode_value(TID) == b"\x00\x01\x80\x55\xc0\x00\x02\x01"
    assert cls(*V6).encode_value(TID) == cls(*V6).encode_value(OTHER_TID)


def test_xor_mapped_ipv4_matches_rfc5769_bytes() -> None:
    """192.0.2.1:32853 XOR'd is 00 01 a1 47 e1 12 a6 43 (RFC 5769 section 2.2)."""
    assert XorMappedAddress(*V4).encode_value(TID) == bytes.fromhex("0001a147e112a643")


def test_encoding_a_non_ip_host_is_a_value_error() -> None:
    """Hostnames are not addresses: encoding one is an API misuse, not a parse error."""
    with pytest.raises(ValueError):
        MappedAddress("example.org", 1).encode_value(TID)


# --- message header ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4, 19])
def test_shorter_than_a_header_is_refused(size: int) -> None:
    """Fewer than 20 bytes is not a STUN message."""
    with pytest.raises(StunParseError):
        decode(_raw_message(b"")[:size])


@pytest.mark.parametrize("mtype", [0x4001, 0x8001, 0xC001, 0x4000, 0xFFFF])
def test_top_two_bits_must_be_zero(mtype: int) -> None:
    """RFC 8489 section 5: the most significant 2 bits of every STUN message are zero."""
    with pytest.raises(StunParseError):
        decode(_raw_message(b"", mtype))


@pytest.mark.parametrize("cookie", [0, 0x2112A443, 0x42A41221, 0xFFFFFFFF])
def test_magic_cookie_is_required(cookie: int) -> None:
    """A header without 0x2112A442 is refused (RFC 3489 messages included)."""
    with pytest.raises(StunParseError):
        decode(struct.pack("!HHI12s", 1, 0, cookie, TID))


@pytest.mark.parametrize("length", [1, 2, 3, 5, 6, 7])
def test_length_must_be_a_multiple_of_4(length: int) -> None:
    """The length field counts padded attributes, so it is a multiple of 4."""
    with pytest.raises(StunParseError):
        decode(struct.pack("!HHI12s", 1, length, 0x2112A442, TID) + b"\x00" * length)


@pytest.mark.parametrize(("length", "body"), [(4, 0), (0, 4), (8, 4), (4, 8), (0xFFFC, 8)])
def test_length_must_match_the_data(length: int, body: int) -> None:
    """The length field must equal the number of bytes after the header."""
    data = struct.pack("!HHI12s", 1, length, 0x2112A442, TID) + _raw_attr(0x8022, b"\x00" * body)
    data = data[: 20 + body]
    with pytest.raises(StunParseError):
        decode(data)


@pytest.mark.parametrize(
    "body",
    [
        struct.pack("!HH", 0x8022, 8) + b"abcd",  # value overruns
        struct.pack("!HH", 0x8022, 5) + b"abcd",  # padding overruns
        struct.pack("!HH", 0x8022, 0xFFFF) + b"abcd",
        _raw_attr(0x8022, b"ok") + struct.pack("!HH", 0x0024, 4),  # last value missing
    ],
)
def test_attribute_overrunning_the_message_is_refused(body: bytes) -> None:
    """An attribute whose (padded) value runs past the end is malformed."""
    with pytest.raises(StunParseError):
        decode(_raw_message(body))


def test_padding_contents_are_ignored_and_kept_in_raw() -> None:
    """Receivers ignore padding bytes (RFC 8489 section 14) but raw keeps them for HMACs."""
    data = _raw_message(_raw_attr(0x0006, b"evtj:h6vY", pad=b" "))
    msg = decode(data)
    assert msg.attributes == [Username("evtj:h6vY")]
    assert msg.raw == data
    assert msg.raw.endswith(b"evtj:h6vY   ")


# --- ordering, duplicates, unknown attributes --------------------------------------------------


def test_duplicates_are_kept_in_order() -> None:
    """Repeated attributes are all kept, in wire order; get() returns the first."""
    attrs: list[Attribute] = [Software("a"), Priority(1), Software("b"), Priority(2), Software("c")]
    msg = decode(Message(Method.BINDING, MessageClass.REQUEST, TID, attrs).encode())
    assert msg.attributes == attrs
    assert msg.get(Software) == Software("a")
    assert msg.get_all(Software) == [Software("a"), Software("b"), Software("c")]
    assert msg.get(Lifetime) is None
    assert msg.offsets == [20, 28, 36, 44, 52]


def test_unknown_attributes_kept_raw_and_reencoded_identically() -> None:
    """Unknown types become UnknownAttribute with their value, and re-encode byte for byte."""
    data = _raw_message(
        _raw_attr(0x7ABC, b"xyz")
        + _raw_attr(0xC0DE, b"")
        + _raw_attr(0x0024, b"\x00\x00\x00\x07")
        + _raw_attr(0x0030, b"\x01" * 5)
        + _raw_attr(0xFFFF, b"\xff" * 8)
    )
    msg = decode(data)
    assert msg.attributes == [
        UnknownAttribute(0x7ABC, b"xyz"),
        UnknownAttribute(0xC0DE, b""),
        Priority(7),
        UnknownAttribute(0x0030, b"\x01" * 5),
        UnknownAttribute(0xFFFF, b"\xff" * 8),
    ]
    assert msg.encode() == data


def test_unknown_comprehension_required_lists_only_0x0000_to_0x7fff() -> None:
    """0x0000-0x7FFF unknown types are reported for a 420; 0x8000-0xFFFF ones are not."""
    msg = build(
        Method.BINDING,
        MessageClass.REQUEST,
        TID,
        [
            UnknownAttribute(0x7FFF, b""),
            UnknownAttribute(0x8000 + 0x7F, b""),
            Priority(1),  # known and comprehension-required: not reported
            UnknownAttribute(0x0000, b"z"),
            UnknownAttribute(0xFFFE, b""),
            UnknownAttribute(0x7FFF, b"again"),
        ],
    )
    assert decode(msg.encode()).unknown_comprehension_required() == [0x7FFF, 0x0000, 0x7FFF]
    only_optional = build(
        Method.BINDING, MessageClass.REQUEST, TID, [UnknownAttribute(0xC000, b"")]
    )
    assert decode(only_optional.encode()).unknown_comprehension_required() == []


def _encode_verbatim(attrs: list[Attribute]) -> bytes:
    """Encode attributes as given; integrity attributes in the list are written unchanged."""
    return Message(Method.BINDING, MessageClass.REQUEST, TID, attrs).encode()


MI = MessageIntegrity(b"\x11" * 20)
MI256 = MessageIntegritySha256(b"\x22" * 32)
FP = Fingerprint(0x12345678)


@pytest.mark.parametrize(
    ("attrs", "kept", "ignored"),
    [
        # After MESSAGE-INTEGRITY only MESSAGE-INTEGRITY-SHA256 and FINGERPRINT count.
        (
            [Software("a"), MI, Priority(1), MI256, Realm("r"), FP],
            [Software("a"), MI, MI256, FP],
            2,
        ),
        ([MI, Username("u"), Lifetime(1), FP], [MI, FP], 2),
        ([MI, MI, FP], [MI, FP], 1),
        # After MESSAGE-INTEGRITY-SHA256 (without MI before it) only FINGERPRINT counts.
        ([MI256, Software("x"), MI, FP], [MI256, FP], 2),
        ([MI256, MI256], [MI256], 1),
        # After FINGERPRINT nothing counts.
        ([Software("a"), FP, Software("b"), MI, FP], [Software("a"), FP], 3),
        # Nothing after the integrity attributes: nothing ignored.
        ([Software("a"), MI, MI256, FP], [Software("a"), MI, MI256, FP], 0),
    ],
)
def test_attributes_after_integrity_are_ignored_and_counted(
    attrs: list[Attribute], kept: list[Attribute], ignored: int
) -> None:
    """RFC 8489 section 9: ignore what follows MI except MI-SHA256 and FINGERPRINT."""
    msg = decode(_encode_verbatim(attrs))
    assert msg.attributes == kept
    assert msg.ignored_after_integrity == ignored
    assert len(msg.offsets) == len(kept)


def test_ignored_attributes_are_not_reported_as_unknown() -> None:
    """An unknown comprehension-required attribute after MI does not cause a 420."""
    msg = decode(_encode_verbatim([MI, UnknownAttribute(0x7ABC, b"")]))
    assert msg.unknown_comprehension_required() == []
    assert msg.ignored_after_integrity == 1


# --- message type packing ----------------------------------------------------------------------


def test_message_type_round_trip_over_every_method_and_class() -> None:
    """All 4096 methods x 4 classes pack into distinct 14-bit types and unpack back."""
    seen = set()
    for method in range(0x1000):
        for cls in MessageClass:
            mtype = message_type(method, cls)
            assert 0 <= mtype < 0x4000
            assert split_message_type(mtype) == (method, cls)
            seen.add(mtype)
    assert len(seen) == 0x4000


@pytest.mark.parametrize(
    ("method", "cls", "mtype"),
    [
        (Method.BINDING, MessageClass.REQUEST, 0x0001),
        (Method.BINDING, MessageClass.INDICATION, 0x0011),
        (Method.BINDING, MessageClass.SUCCESS, 0x0101),
        (Method.BINDING, MessageClass.ERROR, 0x0111),
        (Method.ALLOCATE, MessageClass.REQUEST, 0x0003),
        (Method.SEND, MessageClass.INDICATION, 0x0016),
        (Method.DATA, MessageClass.INDICATION, 0x0017),
        (Method.CHANNEL_BIND, MessageClass.ERROR, 0x0119),
        (0xFFF, MessageClass.ERROR, 0x3FFF),
        (0x080, MessageClass.REQUEST, 0x0200),
    ],
)
def test_message_type_known_values(method: int, cls: MessageClass, mtype: int) -> None:
    """Known type codes from RFC 8489 section 5 and RFC 8656 section 17."""
    assert message_type(method, cls) == mtype
    msg = decode(_raw_message(b"", mtype))
    assert (msg.method, msg.cls, msg.type_code) == (method, cls, mtype)


@pytest.mark.parametrize("cls", list(MessageClass))
def test_every_class_decodes(cls: MessageClass) -> None:
    """Requests, indications, success and error responses all decode with their class."""
    raw = Message(Method.ALLOCATE, cls, TID, [Software("x")]).encode()
    msg = decode(raw)
    assert (msg.method, msg.cls, msg.transaction_id) == (Method.ALLOCATE, cls, TID)


# --- whole messages ----------------------------------------------------------------------------

methods = st.integers(0, 0xFFF)
classes = st.sampled_from(list(MessageClass))
tids = st.binary(min_size=12, max_size=12)
keys = st.binary(min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    method=methods,
    cls=classes,
    tid=tids,
    attrs=st.lists(body_attributes, max_size=8),
    key=st.none() | keys,
    sha256=st.booleans(),
    fingerprint=st.booleans(),
)
def test_message_round_trip(
    *,
    method: int,
    cls: MessageClass,
    tid: bytes,
    attrs: list[Attribute],
    key: bytes | None,
    sha256: bool,
    fingerprint: bool,
) -> None:
    """encode then decode gives back the message; integrity and fingerprint verify."""
    msg = Message(method, cls, tid, list(attrs))
    raw = msg.encode(key, sha256=sha256, fingerprint=fingerprint)
    assert looks_like_stun(raw)
    out = decode(raw)
    assert out.attributes[: len(attrs)] == attrs
    assert (out.method, out.cls, out.transaction_id) == (method, cls, tid)
    assert out.ignored_after_integrity == 0
    extra = [type(a) for a in out.attributes[len(attrs) :]]
    expected: list[type[Attribute]] = []
    if key is not None:
        expected += [MessageIntegrity] + ([MessageIntegritySha256] if sha256 else [])
    if fingerprint:
        expected.append(Fingerprint)
    assert extra == expected
    assert check_fingerprint(out) is fingerprint
    if key is not None:
        assert check_integrity(out, key)
    # Re-encoding a decoded message (integrity attributes written verbatim) is byte-exact.
    assert out.encode() == raw


def test_message_equality_ignores_wire_details() -> None:
    """Messages compare by method, class, transaction ID and attributes, and are unhashable."""
    a = Message(Method.BINDING, MessageClass.REQUEST, TID, [Software("x")])
    b = decode(a.encode())
    assert a == b
    assert a != Message(Method.BINDING, MessageClass.REQUEST, OTHER_TID, [Software("x")])
    assert a != Message(Method.BINDING, MessageClass.SUCCESS, TID, [Software("x")])
    assert a.__eq__(object()) is NotImplemented
    with pytest.raises(TypeError):
        hash(a)


def test_build_and_add() -> None:
    """build() picks a random 12-byte transaction ID; add() appends and chains."""
    msg = build(Method.BINDING, MessageClass.REQUEST).add(Software("a"), Priority(2))
    assert len(msg.transaction_id) == 12
    assert msg.attributes == [Software("a"), Priority(2)]
    assert build(Method.BINDING, MessageClass.REQUEST).transaction_id != msg.transaction_id


def test_encode_refuses_bad_transaction_id_and_oversized_attribute() -> None:
    """Misuse of the encoder raises ValueError."""
    with pytest.raises(ValueError):
        Message(Method.BINDING, MessageClass.REQUEST, b"short").encode()
    with pytest.raises(ValueError):
        Message(Method.BINDING, MessageClass.REQUEST, TID, [Data(bytes(0x10000))]).encode()


def test_looks_like_stun() -> None:
    """The demultiplexing pre-check: top bits, cookie and consistent length."""
    raw = Message(Method.BINDING, MessageClass.REQUEST, TID, [Software("x")]).encode()
    assert looks_like_stun(raw)
    assert not looks_like_stun(raw[:-4])
    assert not looks_like_stun(b"\x40" + raw[1:])
    assert not looks_like_stun(raw[:4] + b"\x00\x00\x00\x00" + raw[8:])
    assert not looks_like_stun(b"\x40\x00\x00\x04abcd")
    assert not looks_like_stun(b"")


def test_username_encode_limit_is_508_bytes_but_decode_reads_up_to_763() -> None:
    """RFC 8489 14.3: USERNAME is fewer than 509 bytes; longer ones are still read."""
    tid = bytes(12)
    assert len(Username("u" * 508).encode_value(tid)) == 508
    with pytest.raises(ValueError):
        Username("u" * 509).encode_value(tid)
    assert Username.decode_value(b"u" * 763, tid) == Username("u" * 763)
