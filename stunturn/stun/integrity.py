"""Credential keys: short-term and long-term keys, USERHASH, and the OpaqueString profile.

RFC 8489 section 9.1.2 (short-term key), section 9.2.2 (long-term key), section 14.4 (USERHASH),
RFC 8265 section 4.2 (OpaqueString).
"""

from __future__ import annotations

import hashlib
import hmac
import unicodedata

from .constants import PASSWORD_ALGORITHM_MD5, PASSWORD_ALGORITHM_SHA256


class CredentialError(ValueError):
    """A username, realm or password that the OpaqueString profile does not allow."""


def opaque_string(text: str) -> str:
    """Apply the PRECIS OpaqueString profile (RFC 8265 section 4.2) as far as STUN needs it.

    Non-ASCII spaces map to U+0020, then NFC normalisation. Strings that are empty after that,
    or that contain control characters, format characters other than the zero-width joiners
    (e.g. U+00AD), surrogates or unassigned code points, are refused (the FreeformClass
    disallows them). Width and case are left alone, as the profile says.
    """
    mapped = "".join(" " if ch != " " and unicodedata.category(ch) == "Zs" else ch for ch in text)
    result = unicodedata.normalize("NFC", mapped)
    if not result:
        raise CredentialError("empty string")
    for ch in result:
        category = unicodedata.category(ch)
        if category in ("Cc", "Cs", "Cn") or (category == "Cf" and ch not in _JOINERS):
            raise CredentialError(f"character U+{ord(ch):04X} is not allowed")
    return result


# Zero-width (non-)joiners are allowed in context by PRECIS; other format characters
# (default-ignorable, e.g. U+00AD SOFT HYPHEN) are not.
_JOINERS = frozenset("\u200c\u200d")


def short_term_key(password: str) -> bytes:
    """RFC 8489 section 9.1.2: key = OpaqueString(password)."""
    return opaque_string(password).encode("utf-8")


def long_term_key(
    username: str, realm: str, password: str, algorithm: int = PASSWORD_ALGORITHM_MD5
) -> bytes:
    """RFC 8489 section 9.2.2.

    key = MD5(username ":" OpaqueString(realm) ":" OpaqueString(password)), or SHA-256 of the
    same string. The username is used as given (clients send it already processed with
    OpaqueString, section 14.3).
    """
    material = f"{username}:{opaque_string(realm)}:{opaque_string(password)}".encode()
    if algorithm == PASSWORD_ALGORITHM_MD5:
        return hashlib.md5(material, usedforsecurity=False).digest()
    if algorithm == PASSWORD_ALGORITHM_SHA256:
        return hashlib.sha256(material).digest()
    raise ValueError(f"unknown password algorithm {algorithm}")


def userhash(username: str, realm: str) -> bytes:
    """RFC 8489 section 14.4: SHA-256(OpaqueString(username) ":" OpaqueString(realm))."""
    return hashlib.sha256(f"{opaque_string(username)}:{opaque_string(realm)}".encode()).digest()


def constant_time_equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison; the only way secrets are compared in this package."""
    return hmac.compare_digest(a, b)
