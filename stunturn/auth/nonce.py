"""Stateless nonces: HMAC-signed, bound to the client's IP address, time-limited.

RFC 8489 section 9.2: the NONCE starts with the "nonce cookie", ``obMatJos2`` followed by the
4-character base64 of the 24-bit STUN Security Features. We set only "Password algorithms"
(bit 0, the most significant bit of the first byte, as section 18.1 defines the bit order), so
RFC 8489 clients negotiate SHA-256 while RFC 5389 clients (browsers, coturn's tools, aioice) just
echo the nonce. "Username anonymity" is not offered: TURN REST usernames cannot be found from
their USERHASH, so a client told to hide its username could not log in with them. USERHASH is
still accepted from clients that send it, for users in the static and SQLite stores.

The rest of the nonce is ``base64url(expiry (4 bytes) || port (2 bytes) || HMAC-SHA256(secret,
cookie || expiry || client IP || port)[:12])``, where port is the client's source port when the
nonce was issued. Nothing is stored: any worker holding the same secret can check it.

Two requests from different source ports never get the same nonce (RFC 8489 section 9.2.4),
but a nonce is accepted from any port of the IP it was issued to: RFC 6062 clients open a new
TCP connection, from a new port, for each ConnectionBind and sign it with the nonce of their
control connection (coturn's ``turnutils_uclient -T`` does; a 438 there ends its session).
"""

from __future__ import annotations

import base64
import hmac
import struct

from ..stun import Address
from ..stun.hmacs import hmac_digest

NONCE_COOKIE_PREFIX = "obMatJos2"
FEATURE_PASSWORD_ALGORITHMS = 0x800000
FEATURE_USERNAME_ANONYMITY = 0x400000
FEATURES = FEATURE_PASSWORD_ALGORITHMS
COOKIE = NONCE_COOKIE_PREFIX + base64.b64encode(FEATURES.to_bytes(3, "big")).decode()

_EXPIRY = struct.Struct("!I")
_PORT = struct.Struct("!H")
_MAC_BYTES = 12


def features_of(nonce: str) -> int:
    """The security feature bits a nonce advertises (0 when it carries no nonce cookie)."""
    if len(nonce) < 13 or not nonce.startswith(NONCE_COOKIE_PREFIX):
        return 0
    try:
        return int.from_bytes(base64.b64decode(nonce[9:13], validate=True), "big")
    except ValueError:
        return 0


class NonceManager:
    """Issues and checks nonces.

    Args:
        secret: HMAC key; share it between workers so each accepts the others' nonces.
        lifetime: seconds a nonce stays valid (438 Stale Nonce afterwards).
    """

    def __init__(self, secret: bytes, lifetime: float = 600.0) -> None:
        if len(secret) < 16:
            raise ValueError("nonce secret must be at least 16 bytes")
        self._secret = secret
        self.lifetime = lifetime

    def _mac(self, expiry: bytes, ip: str, port: bytes) -> bytes:
        material = b"%s|%s|%s|%s" % (COOKIE.encode(), expiry, ip.encode(), port)
        return hmac_digest(self._secret, material, "sha256")[:_MAC_BYTES]

    def issue(self, client: Address, now: float) -> str:
        """A fresh nonce for ``client``, valid until ``now + lifetime``."""
        expiry = _EXPIRY.pack(int(now + self.lifetime) & 0xFFFFFFFF)
        port = _PORT.pack(client[1] & 0xFFFF)
        mac = self._mac(expiry, client[0], port)
        return COOKIE + base64.urlsafe_b64encode(expiry + port + mac).decode()

    def valid(self, nonce: str, client: Address, now: float) -> bool:
        """True when we issued ``nonce`` to ``client``'s IP and it has not expired."""
        if not nonce.startswith(COOKIE):
            return False
        try:
            token = nonce[len(COOKIE) :].encode()
            raw = base64.b64decode(token, altchars=b"-_", validate=True)
        except ValueError:
            return False
        if len(raw) != _EXPIRY.size + _PORT.size + _MAC_BYTES:
            return False
        expiry = raw[: _EXPIRY.size]
        port = raw[_EXPIRY.size : _EXPIRY.size + _PORT.size]
        mac = raw[_EXPIRY.size + _PORT.size :]
        if not hmac.compare_digest(mac, self._mac(expiry, client[0], port)):
            return False
        return now <= int(_EXPIRY.unpack(expiry)[0])
