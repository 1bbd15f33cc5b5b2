"""Typed STUN attributes and the registry that maps type codes to them.

Every attribute is a small frozen dataclass with a ``TYPE`` code, ``encode_value`` (the bytes
after the 4-byte attribute header, unpadded) and ``decode_value`` (the reverse, raising
:class:`StunParseError` on malformed values). Attributes whose type is not in the registry decode
to :class:`UnknownAttribute`, which keeps the raw value so nothing is silently lost.

XOR'd address attributes need the transaction ID (RFC 8489 section 14.2), so both directions take
it even where it is unused.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from .constants import (
    FAMILY_IPV4,
    FAMILY_IPV6,
    MAGIC_COOKIE,
    MAGIC_COOKIE_BYTES,
    AttrType,
)
from .errors import StunParseError

Address = tuple[str, int]

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_ADDR_HEAD = struct.Struct("!xBH")


class Attribute:
    """Base class of every attribute."""

    __slots__ = ()
    TYPE: ClassVar[int]

    def encode_value(self, transaction_id: bytes) -> bytes:
        """The attribute value without header or padding."""
        raise NotImplementedError

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        """Decode a value; raises :class:`StunParseError` when malformed."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class UnknownAttribute(Attribute):
    """An attribute whose type this codec does not know, kept raw."""

    type: int
    value: bytes

    TYPE: ClassVar[int] = -1

    def encode_value(self, transaction_id: bytes) -> bytes:
        return self.value


# --- addresses ------------------------------------------------------------------------------


def _pack_ip(host: str) -> tuple[int, bytes]:
    host = host.partition("%")[0]  # an IPv6 zone index is local; it is not sent
    try:
        return FAMILY_IPV4, socket.inet_pton(socket.AF_INET, host)
    except OSError:
        pass
    try:
        return FAMILY_IPV6, socket.inet_pton(socket.AF_INET6, host)
    except OSError:
        raise ValueError(f"not an IP address: {host!r}") from None


def _unpack_address(value: bytes) -> tuple[int, int, bytes]:
    """Return (family, port, raw ip bytes); checks the length against the family."""
    if len(value) < 4:
        raise StunParseError("address attribute too short")
    family, port = _ADDR_HEAD.unpack_from(value)
    if family == FAMILY_IPV4:
        if len(value) != 8:
            raise StunParseError("IPv4 address attribute must be 8 bytes")
    elif family == FAMILY_IPV6:
        if len(value) != 20:
            raise StunParseError("IPv6 address attribute must be 20 bytes")
    else:
        raise StunParseError(f"unknown address family {family:#x}")
    return family, port, value[4:]


def _ip_text(family: int, raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if family == FAMILY_IPV4 else socket.AF_INET6, raw)


def _xor_bytes(data: bytes, mask: bytes) -> bytes:
    return (int.from_bytes(data, "big") ^ int.from_bytes(mask[: len(data)], "big")).to_bytes(
        len(data), "big"
    )


@dataclass(frozen=True, slots=True)
class _PlainAddress(Attribute):
    """MAPPED-ADDRESS layout (RFC 8489 section 14.1)."""

    host: str
    port: int

    @property
    def address(self) -> Address:
        return (self.host, self.port)

    def encode_value(self, transaction_id: bytes) -> bytes:
        family, raw = _pack_ip(self.host)
        return _ADDR_HEAD.pack(family, self.port) + raw

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        family, port, raw = _unpack_address(value)
        return cls(_ip_text(family, raw), port)


@dataclass(frozen=True, slots=True)
class _XorAddress(Attribute):
    """XOR-MAPPED-ADDRESS layout (RFC 8489 section 14.2).

    The port is XOR'd with the top 16 bits of the magic cookie; an IPv4 address with the cookie;
    an IPv6 address with the cookie followed by the transaction ID.
    """

    host: str
    port: int

    @property
    def address(self) -> Address:
        return (self.host, self.port)

    def encode_value(self, transaction_id: bytes) -> bytes:
        family, raw = _pack_ip(self.host)
        return _ADDR_HEAD.pack(family, self.port ^ (MAGIC_COOKIE >> 16)) + _xor_bytes(
            raw, MAGIC_COOKIE_BYTES + transaction_id
        )

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        family, port, raw = _unpack_address(value)
        raw = _xor_bytes(raw, MAGIC_COOKIE_BYTES + transaction_id)
        return cls(_ip_text(family, raw), port ^ (MAGIC_COOKIE >> 16))


@dataclass(frozen=True, slots=True)
class MappedAddress(_PlainAddress):
    TYPE: ClassVar[int] = AttrType.MAPPED_ADDRESS


@dataclass(frozen=True, slots=True)
class XorMappedAddress(_XorAddress):
    TYPE: ClassVar[int] = AttrType.XOR_MAPPED_ADDRESS


@dataclass(frozen=True, slots=True)
class AlternateServer(_PlainAddress):
    TYPE: ClassVar[int] = AttrType.ALTERNATE_SERVER


@dataclass(frozen=True, slots=True)
class ResponseOrigin(_PlainAddress):
    """RFC 5780 section 7.3: the address the response was sent from."""

    TYPE: ClassVar[int] = AttrType.RESPONSE_ORIGIN


@dataclass(frozen=True, slots=True)
class OtherAddress(_PlainAddress):
    """RFC 5780 section 7.4: the server's alternate IP and port."""

    TYPE: ClassVar[int] = AttrType.OTHER_ADDRESS


@dataclass(frozen=True, slots=True)
class ResponseAddress(_PlainAddress):
    """RFC 3489 RESPONSE-ADDRESS (legacy, decoded only for diagnostics)."""

    TYPE: ClassVar[int] = AttrType.RESPONSE_ADDRESS


@dataclass(frozen=True, slots=True)
class SourceAddress(_PlainAddress):
    """RFC 3489 SOURCE-ADDRESS (legacy)."""

    TYPE: ClassVar[int] = AttrType.SOURCE_ADDRESS


@dataclass(frozen=True, slots=True)
class ChangedAddress(_PlainAddress):
    """RFC 3489 CHANGED-ADDRESS (legacy form of OTHER-ADDRESS)."""

    TYPE: ClassVar[int] = AttrType.CHANGED_ADDRESS


@dataclass(frozen=True, slots=True)
class ReflectedFrom(_PlainAddress):
    """RFC 3489 REFLECTED-FROM (legacy)."""

    TYPE: ClassVar[int] = AttrType.REFLECTED_FROM


@dataclass(frozen=True, slots=True)
class XorPeerAddress(_XorAddress):
    TYPE: ClassVar[int] = AttrType.XOR_PEER_ADDRESS


@dataclass(frozen=True, slots=True)
class XorRelayedAddress(_XorAddress):
    TYPE: ClassVar[int] = AttrType.XOR_RELAYED_ADDRESS


# --- text ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Text(Attribute):
    """A UTF-8 string with a byte limit (RFC 8489 sections 14.3, 14.9, 14.10, 14.14)."""

    value: str
    MAX_BYTES: ClassVar[int] = 763
    """Longest value accepted when decoding (RFC 8489: 763 bytes for 128 characters)."""
    ENCODE_MAX_BYTES: ClassVar[int] = 763
    """Longest value written; stricter where the RFC says so (USERNAME < 509 bytes)."""

    def encode_value(self, transaction_id: bytes) -> bytes:
        raw = self.value.encode("utf-8")
        if len(raw) > self.ENCODE_MAX_BYTES:
            raise ValueError(f"{type(self).__name__} longer than {self.ENCODE_MAX_BYTES} bytes")
        return raw

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) > cls.MAX_BYTES:
            raise StunParseError(f"{cls.__name__} longer than {cls.MAX_BYTES} bytes")
        try:
            return cls(value.decode("utf-8"))
        except UnicodeDecodeError:
            raise StunParseError(f"{cls.__name__} is not UTF-8") from None


@dataclass(frozen=True, slots=True)
class Username(_Text):
    """RFC 8489 section 14.3: fewer than 509 bytes (we still read up to 763)."""

    TYPE: ClassVar[int] = AttrType.USERNAME
    ENCODE_MAX_BYTES: ClassVar[int] = 508


@dataclass(frozen=True, slots=True)
class Realm(_Text):
    TYPE: ClassVar[int] = AttrType.REALM


@dataclass(frozen=True, slots=True)
class Nonce(_Text):
    TYPE: ClassVar[int] = AttrType.NONCE


@dataclass(frozen=True, slots=True)
class Software(_Text):
    TYPE: ClassVar[int] = AttrType.SOFTWARE


@dataclass(frozen=True, slots=True)
class AlternateDomain(_Text):
    """RFC 8489 section 14.16: the TLS domain name of the ALTERNATE-SERVER."""

    TYPE: ClassVar[int] = AttrType.ALTERNATE_DOMAIN
    MAX_BYTES: ClassVar[int] = 255
    ENCODE_MAX_BYTES: ClassVar[int] = 255


# --- opaque bytes -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Fixed(Attribute):
    """Raw bytes whose length must be one of SIZES (empty SIZES: any length)."""

    value: bytes
    SIZES: ClassVar[tuple[int, ...]] = ()

    def encode_value(self, transaction_id: bytes) -> bytes:
        if self.SIZES and len(self.value) not in self.SIZES:
            raise ValueError(f"{type(self).__name__} must be {self.SIZES} bytes")
        return self.value

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        if cls.SIZES and len(value) not in cls.SIZES:
            raise StunParseError(f"{cls.__name__} has a bad length {len(value)}")
        return cls(value)


@dataclass(frozen=True, slots=True)
class MessageIntegrity(_Fixed):
    """HMAC-SHA1 (RFC 8489 section 14.5)."""

    TYPE: ClassVar[int] = AttrType.MESSAGE_INTEGRITY
    SIZES: ClassVar[tuple[int, ...]] = (20,)


@dataclass(frozen=True, slots=True)
class MessageIntegritySha256(_Fixed):
    """HMAC-SHA256, possibly truncated to 16..32 bytes in steps of 4 (RFC 8489 section 14.6)."""

    TYPE: ClassVar[int] = AttrType.MESSAGE_INTEGRITY_SHA256
    SIZES: ClassVar[tuple[int, ...]] = (16, 20, 24, 28, 32)


@dataclass(frozen=True, slots=True)
class Userhash(_Fixed):
    """SHA-256 of username and realm (RFC 8489 section 14.4)."""

    TYPE: ClassVar[int] = AttrType.USERHASH
    SIZES: ClassVar[tuple[int, ...]] = (32,)


@dataclass(frozen=True, slots=True)
class Data(_Fixed):
    """TURN DATA (RFC 8656 section 18.4)."""

    TYPE: ClassVar[int] = AttrType.DATA


@dataclass(frozen=True, slots=True)
class Padding(_Fixed):
    """RFC 5780 section 7.6."""

    TYPE: ClassVar[int] = AttrType.PADDING


@dataclass(frozen=True, slots=True)
class ReservationToken(_Fixed):
    """RFC 8656 section 18.9."""

    TYPE: ClassVar[int] = AttrType.RESERVATION_TOKEN
    SIZES: ClassVar[tuple[int, ...]] = (8,)


# --- flags (empty value) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Flag(Attribute):
    def encode_value(self, transaction_id: bytes) -> bytes:
        return b""

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        if value:
            raise StunParseError(f"{cls.__name__} must be empty")
        return cls()


@dataclass(frozen=True, slots=True)
class DontFragment(_Flag):
    TYPE: ClassVar[int] = AttrType.DONT_FRAGMENT


@dataclass(frozen=True, slots=True)
class UseCandidate(_Flag):
    TYPE: ClassVar[int] = AttrType.USE_CANDIDATE


# --- integers ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fingerprint(Attribute):
    """CRC-32 XOR 0x5354554E (RFC 8489 section 14.7)."""

    value: int
    TYPE: ClassVar[int] = AttrType.FINGERPRINT

    def encode_value(self, transaction_id: bytes) -> bytes:
        return _U32.pack(self.value)

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) != 4:
            raise StunParseError("FINGERPRINT must be 4 bytes")
        return cls(_U32.unpack(value)[0])


@dataclass(frozen=True, slots=True)
class Lifetime(Attribute):
    """Seconds (RFC 8656 section 18.2)."""

    seconds: int
    TYPE: ClassVar[int] = AttrType.LIFETIME

    def encode_value(self, transaction_id: bytes) -> bytes:
        return _U32.pack(self.seconds)

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) != 4:
            raise StunParseError("LIFETIME must be 4 bytes")
        return cls(_U32.unpack(value)[0])


@dataclass(frozen=True, slots=True)
class ConnectionId(Attribute):
    """RFC 6062 section 6.2.1."""

    value: int
    TYPE: ClassVar[int] = AttrType.CONNECTION_ID

    def encode_value(self, transaction_id: bytes) -> bytes:
        return _U32.pack(self.value)

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) != 4:
            raise StunParseError("CONNECTION-ID must be 4 bytes")
        return cls(_U32.unpack(value)[0])


@dataclass(frozen=True, slots=True)
class Priority(Attribute):
    """ICE PRIORITY (RFC 8445 section 16.1)."""

    value: int
    TYPE: ClassVar[int] = AttrType.PRIORITY

    def encode_value(self, transaction_id: bytes) -> bytes:
        return _U32.pack(self.value)

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) != 4:
            raise StunParseError("PRIORITY must be 4 bytes")
        return cls(_U32.unpack(value)[0])


@dataclass(frozen=True, slots=True)
class _TieBreaker(Attribute):
    value: int

    def encode_value(self, transaction_id: bytes) -> bytes:
        return _U64.pack(self.value)

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) != 8:
            raise StunParseError(f"{cls.__name__} must be 8 bytes")
        return cls(_U64.unpack(value)[0])


@dataclass(frozen=True, slots=True)
class IceControlled(_TieBreaker):
    TYPE: ClassVar[int] = AttrType.ICE_CONTROLLED


@dataclass(frozen=True, slots=True)
class IceControlling(_TieBreaker):
    TYPE: ClassVar[int] = AttrType.ICE_CONTROLLING


@dataclass(frozen=True, slots=True)
class ChannelNumber(Attribute):
    """16-bit channel number then 16 bits RFFU (RFC 8656 section 18.1)."""

    number: int
    TYPE: ClassVar[int] = AttrType.CHANNEL_NUMBER

    def encode_value(self, transaction_id: bytes) -> bytes:
        return _U16.pack(self.number) + b"\x00\x00"

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) != 4:
            raise StunParseError("CHANNEL-NUMBER must be 4 bytes")
        return cls(_U16.unpack_from(value)[0])


@dataclass(frozen=True, slots=True)
class ResponsePort(Attribute):
    """16-bit port then 16 bits of padding (RFC 5780 section 7.5)."""

    port: int
    TYPE: ClassVar[int] = AttrType.RESPONSE_PORT

    def encode_value(self, transaction_id: bytes) -> bytes:
        return _U16.pack(self.port) + b"\x00\x00"

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) != 4:
            raise StunParseError("RESPONSE-PORT must be 4 bytes")
        return cls(_U16.unpack_from(value)[0])


@dataclass(frozen=True, slots=True)
class _OneByte(Attribute):
    """One byte of value followed by 3 bytes RFFU."""

    value: int

    def encode_value(self, transaction_id: bytes) -> bytes:
        return bytes((self.value, 0, 0, 0))

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) != 4:
            raise StunParseError(f"{cls.__name__} must be 4 bytes")
        return cls(value[0])


@dataclass(frozen=True, slots=True)
class RequestedTransport(_OneByte):
    """Protocol number, 17 for UDP, 6 for TCP (RFC 8656 section 18.11, RFC 6062)."""

    TYPE: ClassVar[int] = AttrType.REQUESTED_TRANSPORT


@dataclass(frozen=True, slots=True)
class RequestedAddressFamily(_OneByte):
    """0x01 IPv4, 0x02 IPv6 (RFC 8656 section 18.8, RFC 6156)."""

    TYPE: ClassVar[int] = AttrType.REQUESTED_ADDRESS_FAMILY


@dataclass(frozen=True, slots=True)
class AdditionalAddressFamily(_OneByte):
    """RFC 8656 section 18.10: ask for an IPv6 relay next to the IPv4 one."""

    TYPE: ClassVar[int] = AttrType.ADDITIONAL_ADDRESS_FAMILY


@dataclass(frozen=True, slots=True)
class EvenPort(Attribute):
    """One byte whose top bit R asks to reserve the next port (RFC 8656 section 18.6).

    The value is 1 byte on the wire (padded to 4 like every attribute).
    """

    reserve: bool
    TYPE: ClassVar[int] = AttrType.EVEN_PORT

    def encode_value(self, transaction_id: bytes) -> bytes:
        return b"\x80" if self.reserve else b"\x00"

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) != 1:
            raise StunParseError("EVEN-PORT must be 1 byte")
        return cls(bool(value[0] & 0x80))


@dataclass(frozen=True, slots=True)
class ChangeRequest(Attribute):
    """RFC 5780 section 7.2: flags A (change IP, 0x4) and B (change port, 0x2)."""

    change_ip: bool = False
    change_port: bool = False
    TYPE: ClassVar[int] = AttrType.CHANGE_REQUEST

    def encode_value(self, transaction_id: bytes) -> bytes:
        return _U32.pack((4 if self.change_ip else 0) | (2 if self.change_port else 0))

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) != 4:
            raise StunParseError("CHANGE-REQUEST must be 4 bytes")
        flags = _U32.unpack(value)[0]
        return cls(bool(flags & 4), bool(flags & 2))


# --- errors --------------------------------------------------------------------------------


def _encode_code(code: int, reason: str) -> bytes:
    if not 300 <= code <= 699:
        raise ValueError(f"error code {code} out of range 300-699")
    return bytes((0, 0, code // 100, code % 100)) + reason.encode("utf-8")


def _decode_code(value: bytes, name: str) -> tuple[int, str]:
    if len(value) < 4:
        raise StunParseError(f"{name} too short")
    klass, number = value[2] & 0x07, value[3]
    if not 3 <= klass <= 6 or number > 99:
        raise StunParseError(f"{name} has an invalid code")
    reason = value[4:]
    if len(reason) > 763:
        raise StunParseError(f"{name} reason too long")
    try:
        return klass * 100 + number, reason.decode("utf-8")
    except UnicodeDecodeError:
        raise StunParseError(f"{name} reason is not UTF-8") from None


@dataclass(frozen=True, slots=True)
class ErrorCode(Attribute):
    """RFC 8489 section 14.8: class and number, then a UTF-8 reason phrase."""

    code: int
    reason: str = ""
    TYPE: ClassVar[int] = AttrType.ERROR_CODE

    def encode_value(self, transaction_id: bytes) -> bytes:
        return _encode_code(self.code, self.reason)

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        return cls(*_decode_code(value, "ERROR-CODE"))


@dataclass(frozen=True, slots=True)
class AddressErrorCode(Attribute):
    """RFC 8656 section 18.12: family, then an ERROR-CODE-like body."""

    family: int
    code: int
    reason: str = ""
    TYPE: ClassVar[int] = AttrType.ADDRESS_ERROR_CODE

    def encode_value(self, transaction_id: bytes) -> bytes:
        body = _encode_code(self.code, self.reason)
        return bytes((self.family,)) + body[1:]

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        code, reason = _decode_code(value, "ADDRESS-ERROR-CODE")
        return cls(value[0], code, reason)


@dataclass(frozen=True, slots=True)
class UnknownAttributes(Attribute):
    """List of 16-bit attribute types (RFC 8489 section 14.13)."""

    types: tuple[int, ...]
    TYPE: ClassVar[int] = AttrType.UNKNOWN_ATTRIBUTES

    def encode_value(self, transaction_id: bytes) -> bytes:
        return b"".join(_U16.pack(t) for t in self.types)

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) % 2:
            raise StunParseError("UNKNOWN-ATTRIBUTES length must be even")
        return cls(tuple(_U16.unpack_from(value, i)[0] for i in range(0, len(value), 2)))


@dataclass(frozen=True, slots=True)
class Icmp(Attribute):
    """RFC 8656 section 18.13: 16 bits reserved, ICMP type, ICMP code, 32-bit error data."""

    icmp_type: int
    icmp_code: int
    error_data: int = 0
    TYPE: ClassVar[int] = AttrType.ICMP

    def encode_value(self, transaction_id: bytes) -> bytes:
        return struct.pack("!xxBBI", self.icmp_type, self.icmp_code, self.error_data)

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) != 8:
            raise StunParseError("ICMP must be 8 bytes")
        icmp_type, icmp_code, data = struct.unpack("!xxBBI", value)
        return cls(icmp_type, icmp_code, data)


# --- password algorithms --------------------------------------------------------------------


def _encode_algorithm(algorithm: int, params: bytes) -> bytes:
    pad = -len(params) % 4
    return struct.pack("!HH", algorithm, len(params)) + params + b"\x00" * pad


@dataclass(frozen=True, slots=True)
class PasswordAlgorithm(Attribute):
    """RFC 8489 section 14.12: the algorithm the client chose."""

    algorithm: int
    params: bytes = b""
    TYPE: ClassVar[int] = AttrType.PASSWORD_ALGORITHM

    def encode_value(self, transaction_id: bytes) -> bytes:
        return _encode_algorithm(self.algorithm, self.params)

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        items = _decode_algorithms(value)
        if len(items) != 1:
            raise StunParseError("PASSWORD-ALGORITHM must hold one algorithm")
        return cls(*items[0])


@dataclass(frozen=True, slots=True)
class PasswordAlgorithms(Attribute):
    """RFC 8489 section 14.11: the algorithms the server offers, in preference order."""

    algorithms: tuple[tuple[int, bytes], ...]
    TYPE: ClassVar[int] = AttrType.PASSWORD_ALGORITHMS

    def encode_value(self, transaction_id: bytes) -> bytes:
        return b"".join(_encode_algorithm(a, p) for a, p in self.algorithms)

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        return cls(tuple(_decode_algorithms(value)))


def _decode_algorithms(value: bytes) -> list[tuple[int, bytes]]:
    items: list[tuple[int, bytes]] = []
    pos, end = 0, len(value)
    while pos < end:
        if pos + 4 > end:
            raise StunParseError("truncated password algorithm")
        algorithm, length = struct.unpack_from("!HH", value, pos)
        pos += 4
        if pos + length > end:
            raise StunParseError("truncated password algorithm parameters")
        items.append((algorithm, value[pos : pos + length]))
        pos += length + (-length % 4)
    if pos != end:
        raise StunParseError("password algorithm padding overruns the attribute")
    return items


ATTRIBUTE_CLASSES: dict[int, type[Attribute]] = {
    cls.TYPE: cls
    for cls in (
        MappedAddress,
        XorMappedAddress,
        AlternateServer,
        ResponseOrigin,
        OtherAddress,
        ResponseAddress,
        SourceAddress,
        ChangedAddress,
        ReflectedFrom,
        XorPeerAddress,
        XorRelayedAddress,
        Username,
        Realm,
        Nonce,
        Software,
        AlternateDomain,
        MessageIntegrity,
        MessageIntegritySha256,
        Userhash,
        Data,
        Padding,
        ReservationToken,
        DontFragment,
        UseCandidate,
        Fingerprint,
        Lifetime,
        ConnectionId,
        Priority,
        IceControlled,
        IceControlling,
        ChannelNumber,
        ResponsePort,
        RequestedTransport,
        RequestedAddressFamily,
        AdditionalAddressFamily,
        EvenPort,
        ChangeRequest,
        ErrorCode,
        AddressErrorCode,
        UnknownAttributes,
        Icmp,
        PasswordAlgorithm,
        PasswordAlgorithms,
    )
}
"""Registry: attribute type code -> class. Dispatch on wire codes goes through this table."""


def attribute_type(attr: Attribute) -> int:
    """The wire type code of an attribute (works for :class:`UnknownAttribute` too)."""
    return attr.type if isinstance(attr, UnknownAttribute) else attr.TYPE
