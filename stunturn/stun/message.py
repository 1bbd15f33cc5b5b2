"""STUN messages: decoding, encoding and the integrity checks that need the raw bytes.

RFC 8489 section 5 (header), section 14 (attributes), sections 14.5-14.7 (MESSAGE-INTEGRITY,
MESSAGE-INTEGRITY-SHA256, FINGERPRINT).
"""

from __future__ import annotations

import hmac
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from .attributes import (
    ATTRIBUTE_CLASSES,
    Attribute,
    Fingerprint,
    MessageIntegrity,
    MessageIntegritySha256,
    UnknownAttribute,
    attribute_type,
)
from .constants import (
    FINGERPRINT_XOR,
    HEADER_LENGTH,
    MAGIC_COOKIE,
    AttrType,
    MessageClass,
)
from .errors import StunParseError
from .hmacs import hmac_digest

A = TypeVar("A", bound=Attribute)

_HEADER = struct.Struct("!HHI12s")
_ATTR_HEAD = struct.Struct("!HH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")

_MI = AttrType.MESSAGE_INTEGRITY
_MI256 = AttrType.MESSAGE_INTEGRITY_SHA256
_FP = AttrType.FINGERPRINT


def message_type(method: int, cls: int) -> int:
    """Pack a 12-bit method and 2-bit class into the 14-bit message type (RFC 8489 section 5)."""
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((cls & 1) << 4)
        | ((cls & 2) << 7)
    )


def split_message_type(mtype: int) -> tuple[int, MessageClass]:
    """Inverse of :func:`message_type`: (method, class)."""
    method = (mtype & 0x000F) | ((mtype & 0x00E0) >> 1) | ((mtype & 0x3E00) >> 2)
    return method, MessageClass(((mtype >> 4) & 1) | ((mtype >> 7) & 2))


def new_transaction_id() -> bytes:
    """96 random bits (RFC 8489 section 5: cryptographically random)."""
    return os.urandom(12)


@dataclass(slots=True, eq=False)
class Message:
    """A STUN message: method, class, transaction ID and ordered attributes.

    Decoded messages also keep ``raw`` (the bytes as received) and the byte ``offsets`` of each
    attribute header, which the integrity checks need: they hash the bytes as sent, including
    whatever padding the sender chose.
    """

    method: int
    cls: MessageClass
    transaction_id: bytes = field(default_factory=new_transaction_id)
    attributes: list[Attribute] = field(default_factory=list)
    raw: bytes = b""
    offsets: list[int] = field(default_factory=list)
    ignored_after_integrity: int = 0
    _index: tuple[list[Attribute], int, dict[type, Attribute]] | None = field(
        default=None, repr=False
    )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (
            self.method == other.method
            and self.cls == other.cls
            and self.transaction_id == other.transaction_id
            and self.attributes == other.attributes
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def type_code(self) -> int:
        """The 14-bit message type as on the wire."""
        return message_type(self.method, self.cls)

    def get(self, kind: type[A]) -> A | None:
        """The first attribute of this class, or None.

        Lookups go through a table built on first use and rebuilt when ``attributes`` is
        replaced or changes length; after replacing an item in place, assign a new list.
        """
        attrs = self.attributes
        index = self._index
        if index is None or index[0] is not attrs or index[1] != len(attrs):
            # (Re)build the class -> first attribute table; handlers ask for many attributes
            # of each request, and a rebuild happens only if the list was replaced or grew.
            table: dict[type, Attribute] = {}
            for attr in attrs:
                table.setdefault(type(attr), attr)
            index = self._index = (attrs, len(attrs), table)
        return index[2].get(kind)  # type: ignore[return-value]

    def get_all(self, kind: type[A]) -> list[A]:
        """Every attribute of this class, in message order."""
        return [a for a in self.attributes if type(a) is kind]

    def unknown_comprehension_required(self) -> list[int]:
        """Types of unknown attributes in 0x0000-0x7FFF, for a 420 answer (RFC 8489 6.3.1)."""
        return [
            a.type for a in self.attributes if isinstance(a, UnknownAttribute) and a.type < 0x8000
        ]

    def add(self, *attrs: Attribute) -> Message:
        """Append attributes; returns self so calls can chain."""
        self.attributes.extend(attrs)
        return self

    def encode(
        self,
        key: bytes | None = None,
        *,
        sha1: bool = True,
        sha256: bool = False,
        fingerprint: bool = False,
    ) -> bytes:
        """Serialise the message.

        Attributes are written in order. With ``key``, MESSAGE-INTEGRITY (``sha1``) and/or
        MESSAGE-INTEGRITY-SHA256 (``sha256``) are appended, then FINGERPRINT if asked. Integrity
        or fingerprint attributes already in :attr:`attributes` are written as they are.
        """
        tid = self.transaction_id
        if len(tid) != 12:
            raise ValueError("transaction ID must be 12 bytes")
        body = bytearray()
        try:
            for attr in self.attributes:
                _append_attribute(body, attribute_type(attr), attr.encode_value(tid))
        except struct.error as exc:
            raise ValueError(f"cannot encode {attr!r}: {exc}") from None
        head = message_type(self.method, self.cls)
        if key is not None:
            if sha1:
                digest = hmac_digest(key, _header(head, len(body) + 24, tid) + body, "sha1")
                _append_attribute(body, _MI, digest)
            if sha256:
                pre = _header(head, len(body) + 36, tid) + body
                _append_attribute(body, _MI256, hmac_digest(key, pre, "sha256"))
        if fingerprint:
            crc = zlib.crc32(_header(head, len(body) + 8, tid) + body) ^ FINGERPRINT_XOR
            _append_attribute(body, _FP, _U32.pack(crc))
        if len(body) > 0xFFFF:
            raise ValueError(f"message body of {len(body)} bytes exceeds 65535")
        return _header(head, len(body), tid) + body


def _header(mtype: int, length: int, tid: bytes) -> bytes:
    return _HEADER.pack(mtype, length, MAGIC_COOKIE, tid)


def _append_attribute(body: bytearray, atype: int, value: bytes) -> None:
    n = len(value)
    if n > 0xFFFF:
        raise ValueError("attribute value longer than 65535 bytes")
    body += _ATTR_HEAD.pack(atype, n)
    body += value
    if n & 3:
        body += b"\x00" * (4 - (n & 3))


def looks_like_stun(data: bytes) -> bool:
    """Cheap pre-check used to demultiplex: top bits 00, magic cookie, length consistent."""
    return (
        len(data) >= HEADER_LENGTH
        and data[0] < 0x40
        and data[4:8] == b"\x21\x12\xa4\x42"
        and _U16.unpack_from(data, 2)[0] + HEADER_LENGTH == len(data)
    )


def decode(data: bytes) -> Message:
    """Decode one STUN message that fills ``data`` exactly.

    Raises :class:`StunParseError` for anything malformed: short or inconsistent header, missing
    magic cookie, truncated attributes, bad attribute values. Attributes after
    MESSAGE-INTEGRITY are ignored as RFC 8489 section 14.5 requires, except
    MESSAGE-INTEGRITY-SHA256 and FINGERPRINT; attributes after FINGERPRINT are ignored too.
    """
    n = len(data)
    if n < HEADER_LENGTH:
        raise StunParseError("shorter than a STUN header")
    mtype, length, cookie, tid = _HEADER.unpack_from(data)
    if mtype & 0xC000:
        raise StunParseError("top two bits of the message type are not zero")
    if cookie != MAGIC_COOKIE:
        raise StunParseError("no magic cookie")
    if length & 3:
        raise StunParseError("message length is not a multiple of 4")
    if length + HEADER_LENGTH != n:
        raise StunParseError("message length does not match the data")
    method, cls = split_message_type(mtype)
    data = bytes(data)
    attrs: list[Attribute] = []
    offsets: list[int] = []
    ignored = 0
    seen_mi = seen_mi256 = seen_fp = False
    pos = HEADER_LENGTH
    unpack_head = _ATTR_HEAD.unpack_from
    registry = ATTRIBUTE_CLASSES
    while pos < n:
        if pos + 4 > n:
            raise StunParseError("truncated attribute header")
        atype, alen = unpack_head(data, pos)
        start = pos + 4
        end = start + alen
        if start + ((alen + 3) & ~3) > n:
            raise StunParseError("attribute overruns the message")
        if seen_fp or (seen_mi256 and atype != _FP) or (seen_mi and atype not in (_MI256, _FP)):
            ignored += 1
        else:
            value = data[start:end]
            kind = registry.get(atype)
            attrs.append(
                UnknownAttribute(atype, value) if kind is None else kind.decode_value(value, tid)
            )
            offsets.append(pos)
            if atype == _MI:
                seen_mi = True
            elif atype == _MI256:
                seen_mi256 = True
            elif atype == _FP:
                seen_fp = True
        pos = start + ((alen + 3) & ~3)
    return Message(method, cls, tid, attrs, data, offsets, ignored)


def _offset_of(msg: Message, kind: type[Attribute]) -> tuple[int, Attribute] | None:
    for attr, off in zip(msg.attributes, msg.offsets, strict=False):
        if type(attr) is kind:
            return off, attr
    return None


def _hashed_prefix(msg: Message, offset: int, attr_total: int) -> bytes:
    """Header with the length rewritten to end after this attribute, plus what precedes it."""
    raw = msg.raw
    return raw[:2] + _U16.pack(offset - HEADER_LENGTH + attr_total) + raw[4:offset]


def check_integrity(msg: Message, key: bytes) -> bool:
    """Verify MESSAGE-INTEGRITY (HMAC-SHA1) in a decoded message, in constant time."""
    found = _offset_of(msg, MessageIntegrity)
    if found is None:
        return False
    off, attr = found
    assert isinstance(attr, MessageIntegrity)
    digest = hmac_digest(key, _hashed_prefix(msg, off, 24), "sha1")
    return hmac.compare_digest(digest, attr.value)


def check_integrity_sha256(msg: Message, key: bytes) -> bool:
    """Verify MESSAGE-INTEGRITY-SHA256, honouring truncation, in constant time."""
    found = _offset_of(msg, MessageIntegritySha256)
    if found is None:
        return False
    off, attr = found
    assert isinstance(attr, MessageIntegritySha256)
    size = len(attr.value)
    digest = hmac_digest(key, _hashed_prefix(msg, off, 4 + size), "sha256")
    return hmac.compare_digest(digest[:size], attr.value)


def check_fingerprint(msg: Message) -> bool:
    """Verify FINGERPRINT; False when absent. FINGERPRINT must be the last attribute."""
    found = _offset_of(msg, Fingerprint)
    if found is None:
        return False
    off, attr = found
    assert isinstance(attr, Fingerprint)
    if off + 8 != len(msg.raw):
        return False
    crc = zlib.crc32(_hashed_prefix(msg, off, 8)) ^ FINGERPRINT_XOR
    return hmac.compare_digest(_U32.pack(crc), _U32.pack(attr.value))


def build(
    method: int,
    cls: MessageClass,
    transaction_id: bytes | None = None,
    attributes: Iterable[Attribute] = (),
) -> Message:
    """Convenience constructor."""
    return Message(method, cls, transaction_id or new_transaction_id(), list(attributes))
