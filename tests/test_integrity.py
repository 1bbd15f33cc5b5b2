"""MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256, FINGERPRINT and credential keys.

RFC 8489 sections 9.1.1, 9.2.2, 14.4-14.7; RFC 8265 section 4.2 (OpaqueString).
Reference values are computed here with hashlib, hmac and zlib only.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stunturn.stun import (
    PASSWORD_ALGORITHM_MD5,
    PASSWORD_ALGORITHM_SHA256,
    Attribute,
    CredentialError,
    Message,
    MessageClass,
    Method,
    StunParseError,
    check_fingerprint,
    check_integrity,
    check_integrity_sha256,
    constant_time_equal,
    decode,
    long_term_key,
    opaque_string,
    short_term_key,
    userhash,
)
from stunturn.stun.attributes import (
    Fingerprint,
    MessageIntegrity,
    MessageIntegritySha256,
    Priority,
    Software,
    Username,
)

TID = bytes(range(12))
KEY = b"swordfish"
ATTRS: list[Attribute] = [Username("alice"), Software("x"), Priority(0x6E0001FF)]


def _request(attrs: list[Attribute] | None = None) -> Message:
    return Message(
        Method.BINDING, MessageClass.REQUEST, TID, list(ATTRS if attrs is None else attrs)
    )


def _with_truncated_mi256(attrs: list[Attribute], key: bytes, size: int) -> bytes:
    """A message ending in MI-SHA256 truncated to ``size`` bytes, HMAC computed by hand.

    The placeholder encoding already has the header length pointing at the end of the
    MI-SHA256 attribute, which is what RFC 8489 section 14.6 hashes.
    """
    placeholder = _request([*attrs, MessageIntegritySha256(bytes(size))]).encode()
    prefix = placeholder[: -(4 + size)]
    digest = hmac.new(key, prefix, hashlib.sha256).digest()[:size]
    return prefix + placeholder[-(4 + size) : -size] + digest


# --- MESSAGE-INTEGRITY -------------------------------------------------------------------------


def test_message_integrity_matches_hand_computed_hmac() -> None:
    """MI is HMAC-SHA1 over the header (length to the end of MI) and preceding attributes."""
    raw = _request().encode(KEY)
    prefix = raw[:-24]
    assert int.from_bytes(raw[2:4], "big") == len(raw) - 20
    assert raw[-24:-20] == b"\x00\x08\x00\x14"
    assert raw[-20:] == hmac.new(KEY, prefix, hashlib.sha1).digest()
    assert check_integrity(decode(raw), KEY)
    assert not check_integrity(decode(raw), KEY + b"!")


def test_message_integrity_with_fingerprint_after_it() -> None:
    """FINGERPRINT after MI is outside the HMAC: the hashed length stops at MI."""
    raw = _request().encode(KEY, fingerprint=True)
    msg = decode(raw)
    assert check_integrity(msg, KEY)
    assert check_fingerprint(msg)
    without_fp = _request().encode(KEY)
    assert raw[20:-8] == without_fp[20:]


def test_every_byte_before_mi_is_protected() -> None:
    """Flipping any bit in the header or attributes before MI breaks the check (or decode)."""
    raw = _request().encode(KEY, fingerprint=True)
    mi_end = len(raw) - 8
    for pos in range(mi_end):
        for bit in (0x01, 0x80):
            bad = bytearray(raw)
            bad[pos] ^= bit
            try:
                msg = decode(bytes(bad))
            except StunParseError:
                continue
            assert not check_integrity(msg, KEY), (pos, bit)


def test_missing_integrity_is_false_not_an_error() -> None:
    """No MESSAGE-INTEGRITY: the checks say False."""
    msg = decode(_request().encode())
    assert not check_integrity(msg, KEY)
    assert not check_integrity_sha256(msg, KEY)
    assert not check_fingerprint(msg)


def test_checks_need_a_decoded_message() -> None:
    """A message built in memory has no raw bytes, so there is nothing to verify: False."""
    msg = _request([*ATTRS, MessageIntegrity(bytes(20))])
    assert not check_integrity(msg, KEY)


def test_sha1_and_sha256_together_in_rfc_order() -> None:
    """With both, MI comes first and MI-SHA256 hashes the message including MI."""
    raw = _request().encode(KEY, sha256=True, fingerprint=True)
    msg = decode(raw)
    assert [type(a) for a in msg.attributes[-3:]] == [
        MessageIntegrity,
        MessageIntegritySha256,
        Fingerprint,
    ]
    assert check_integrity(msg, KEY)
    assert check_integrity_sha256(msg, KEY)
    assert check_fingerprint(msg)
    prefix = raw[: len(raw) - 8 - 36]
    hashed = prefix[:2] + (len(prefix) - 20 + 36).to_bytes(2, "big") + prefix[4:]
    assert raw[-8 - 32 : -8] == hmac.new(KEY, hashed, hashlib.sha256).digest()


def test_sha256_only() -> None:
    """sha1=False, sha256=True sends MI-SHA256 alone (as RFC 8489 B.1 does)."""
    msg = decode(_request().encode(KEY, sha1=False, sha256=True))
    assert msg.get(MessageIntegrity) is None
    assert check_integrity_sha256(msg, KEY)
    assert not check_integrity_sha256(msg, b"other")


# --- MESSAGE-INTEGRITY-SHA256 truncation --------------------------------------------------------


@pytest.mark.parametrize("size", [16, 20, 24, 28, 32])
def test_truncated_mi_sha256_verifies(size: int) -> None:
    """RFC 8489 14.6: 16 to 32 bytes in steps of 4 verify against the truncated HMAC."""
    msg = decode(_with_truncated_mi256(ATTRS, KEY, size))
    attr = msg.get(MessageIntegritySha256)
    assert attr is not None
    assert len(attr.value) == size
    assert check_integrity_sha256(msg, KEY)
    assert not check_integrity_sha256(msg, b"wrong")


@pytest.mark.parametrize("size", [16, 20, 24, 28, 32])
def test_truncated_mi_sha256_detects_a_flipped_bit(size: int) -> None:
    """Changing the last byte of the truncated HMAC or of the body makes it fail."""
    raw = bytearray(_with_truncated_mi256(ATTRS, KEY, size))
    raw[-1] ^= 1
    assert not check_integrity_sha256(decode(bytes(raw)), KEY)
    raw[-1] ^= 1
    raw[25] ^= 1  # inside the USERNAME value
    assert not check_integrity_sha256(decode(bytes(raw)), KEY)


@pytest.mark.parametrize("size", [0, 4, 8, 12, 36, 40])
def test_mi_sha256_of_other_sizes_is_malformed(size: int) -> None:
    """Sizes outside 16..32 are refused at decode (sizes not a multiple of 4 too: test_codec)."""
    raw = _request([*ATTRS, MessageIntegritySha256(bytes(16))]).encode()
    body = raw[20:-20] + b"\x00\x1c" + size.to_bytes(2, "big") + bytes(size)
    data = raw[:2] + len(body).to_bytes(2, "big") + raw[4:20] + body
    with pytest.raises(StunParseError):
        decode(data)


def test_integrity_checks_compare_in_constant_time() -> None:
    """The checks compare digests with hmac.compare_digest (read from the source, no patching)."""
    for func in (check_integrity, check_integrity_sha256, check_fingerprint):
        source = inspect.getsource(func)
        assert "hmac.compare_digest(" in source, func.__name__
    assert "compare_digest" in inspect.getsource(constant_time_equal)


def test_constant_time_equal() -> None:
    """constant_time_equal is plain equality in its results."""
    assert constant_time_equal(b"abc", b"abc")
    assert not constant_time_equal(b"abc", b"abd")
    assert not constant_time_equal(b"abc", b"ab")


# --- FINGERPRINT -------------------------------------------------------------------------------


def test_fingerprint_matches_hand_computed_crc() -> None:
    """CRC-32 of the message up to FINGERPRINT, XOR 0x5354554E (RFC 8489 14.7)."""
    raw = _request().encode(fingerprint=True)
    assert raw[-8:-4] == b"\x80\x28\x00\x04"
    crc = zlib.crc32(raw[:-8]) ^ 0x5354554E
    assert raw[-4:] == crc.to_bytes(4, "big")
    assert check_fingerprint(decode(raw))


def test_bad_fingerprint_is_false() -> None:
    """A wrong CRC or a changed byte before it fails the check."""
    raw = bytearray(_request().encode(fingerprint=True))
    raw[-1] ^= 0x01
    assert not check_fingerprint(decode(bytes(raw)))
    raw[-1] ^= 0x01
    raw[24] ^= 0x20  # a USERNAME letter changes case
    assert not check_fingerprint(decode(bytes(raw)))


def test_fingerprint_must_be_last() -> None:
    """RFC 8489 14.7: FINGERPRINT MUST be the last attribute; anything after it fails."""
    good = _request().encode(fingerprint=True)
    fp = decode(good).get(Fingerprint)
    assert fp is not None
    trailing = _request([*ATTRS, fp, Software("after")]).encode()
    msg = decode(trailing)
    assert msg.ignored_after_integrity == 1
    assert not check_fingerprint(msg)


# --- keys --------------------------------------------------------------------------------------


def test_rfc8489_long_term_key_example() -> None:
    """RFC 8489 9.2.2 worked example: MD5("user:realm:pass")."""
    assert long_term_key("user", "realm", "pass") == bytes.fromhex(
        "8493fbc53ba582fb4c044c456bdc40eb"
    )
    assert long_term_key("user", "realm", "pass", PASSWORD_ALGORITHM_MD5) == bytes.fromhex(
        "8493fbc53ba582fb4c044c456bdc40eb"
    )


def test_long_term_key_sha256() -> None:
    """RFC 8489 18.5.1.2: the SHA-256 key is SHA-256 of the same string, 32 bytes."""
    key = long_term_key("user", "realm", "pass", PASSWORD_ALGORITHM_SHA256)
    assert key == hashlib.sha256(b"user:realm:pass").digest()
    assert len(key) == 32


def test_long_term_key_unknown_algorithm() -> None:
    """Algorithms other than MD5 (1) and SHA-256 (2) are refused."""
    for algorithm in (0, 3, 0xFFFF):
        with pytest.raises(ValueError):
            long_term_key("user", "realm", "pass", algorithm)


def test_long_term_key_applies_opaque_string_to_realm_and_password() -> None:
    """Realm and password are OpaqueString-processed: NFC and non-ASCII spaces mapped."""
    composed = long_term_key("u", "r\u00e9alm", "p\u00e9ss word")
    assert long_term_key("u", "re\u0301alm", "pe\u0301ss\u00a0word") == composed
    assert (
        composed
        == hashlib.md5("u:r\u00e9alm:p\u00e9ss word".encode(), usedforsecurity=False).digest()
    )


def test_long_term_key_uses_username_as_given() -> None:
    """The username is not re-processed (RFC 8489 9.2.2: it is taken from USERNAME as sent)."""
    decomposed = "e\u0301"
    assert (
        long_term_key(decomposed, "r", "p")
        == hashlib.md5(f"{decomposed}:r:p".encode(), usedforsecurity=False).digest()
    )
    assert long_term_key(decomposed, "r", "p") != long_term_key("\u00e9", "r", "p")


@pytest.mark.parametrize(
    ("realm", "password"), [("", "p"), ("r", ""), ("r\x00", "p"), ("r", "p\n"), ("r", "\x7f")]
)
def test_long_term_key_refuses_bad_realm_or_password(realm: str, password: str) -> None:
    """Empty strings and control characters in realm or password raise CredentialError."""
    with pytest.raises(CredentialError):
        long_term_key("user", realm, password)


def test_short_term_key() -> None:
    """RFC 8489 9.1.1: key = OpaqueString(password) in UTF-8."""
    assert short_term_key("VOkJxbRl1RmTxUk/WvJxBt") == b"VOkJxbRl1RmTxUk/WvJxBt"
    assert short_term_key("pe\u0301\u3000x") == "p\u00e9 x".encode()
    with pytest.raises(CredentialError):
        short_term_key("")


def test_userhash() -> None:
    """RFC 8489 14.4: SHA-256(OpaqueString(username) ":" OpaqueString(realm))."""
    assert userhash("user", "realm") == hashlib.sha256(b"user:realm").digest()
    assert userhash("e\u0301", "r\u2003x") == hashlib.sha256("\u00e9:r x".encode()).digest()
    assert userhash("\u30de\u30c8\u30ea\u30c3\u30af\u30b9", "example.org") == bytes.fromhex(
        "4a3cf38fef6992bda952c6780417da0f24819415569e60b205c46e41407f1704"
    )
    with pytest.raises(CredentialError):
        userhash("", "realm")
    with pytest.raises(CredentialError):
        userhash("user", "\x01")


# --- OpaqueString ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("TheMatrIX", "TheMatrIX"),
        ("e\u0301", "\u00e9"),  # NFC
        ("A\u030a", "\u00c5"),
        ("a\u00a0b", "a b"),  # NO-BREAK SPACE
        ("a\u2003b", "a b"),  # EM SPACE
        ("a\u3000b", "a b"),  # IDEOGRAPHIC SPACE
        ("a\u202fb\u205fc", "a b c"),
        ("  ", "  "),  # ASCII spaces stay
        ("\uff21\uff22", "\uff21\uff22"),  # width is left alone
        ("MiXeD", "MiXeD"),  # case is left alone
        ("\u30de\u30c8\u30ea\u30c3\u30af\u30b9", "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"),
    ],
)
def test_opaque_string_maps_and_normalises(text: str, expected: str) -> None:
    """Non-ASCII spaces become U+0020, then NFC; width and case are kept (RFC 8265 4.2)."""
    assert opaque_string(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "\x00", "a\x07b", "tab\t", "line\n", "\x1f", "\x7f", "\x85", "\x9f", "\ud800", "\u0378"],
)
def test_opaque_string_refuses_empty_control_surrogate_unassigned(text: str) -> None:
    """Empty strings, controls (Cc), surrogates (Cs), unassigned (Cn) raise CredentialError."""
    with pytest.raises(CredentialError):
        opaque_string(text)


def test_credential_error_is_a_value_error() -> None:
    """CredentialError is a ValueError: bad configuration, not a parse error."""
    assert issubclass(CredentialError, ValueError)
    assert not issubclass(CredentialError, StunParseError)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1))
def test_opaque_string_is_idempotent(text: str) -> None:
    """Applying the profile twice changes nothing (or it refuses the input both times)."""
    try:
        once = opaque_string(text)
    except CredentialError:
        return
    assert opaque_string(once) == once


def test_opaque_string_refuses_default_ignorable_format_characters() -> None:
    """U+00AD (in RFC 5769's pre-SASLprep password) is disallowed by PRECIS FreeformClass."""
    with pytest.raises(CredentialError):
        opaque_string("The\u00adM\u00aatr\u2168")
    assert opaque_string("a\u200db") == "a\u200db"  # zero-width joiner is kept
