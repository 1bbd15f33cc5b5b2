"""Long-term credential authentication of TURN requests (RFC 8489 section 9.2.4).

The checks run in the RFC's order; each failure raises :class:`StunError` with the attributes
the error response must carry, and nothing more: no SOFTWARE, no hint whether the user exists.

1. No MESSAGE-INTEGRITY(-SHA256): 401 with REALM, NONCE, PASSWORD-ALGORITHMS.
2. Integrity present but USERNAME/USERHASH, REALM or NONCE missing: 400.
3. PASSWORD-ALGORITHM(S) inconsistent with what we offered: 400.
4. Unknown user, or integrity that verifies with none of the candidate keys: 401.
5. NONCE not one we issued to this client, or expired: 438 with a fresh NONCE (a nonce from
   before a restart, or from another address, is treated as stale, so clients just retry).

SHA-1-only clients (RFC 5389: browsers, coturn's tools, aioice) send neither password attribute
and use MESSAGE-INTEGRITY with the MD5 key; RFC 8489 clients see the nonce cookie, pick SHA-256
from PASSWORD-ALGORITHMS and sign with MESSAGE-INTEGRITY-SHA256. Both work.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..auth import Credentials, NonceManager
from ..auth.nonce import COOKIE
from ..server.errors import StunError
from ..stun import (
    PASSWORD_ALGORITHM_MD5,
    PASSWORD_ALGORITHM_SHA256,
    Address,
    Message,
    check_integrity,
    check_integrity_sha256,
)
from ..stun.attributes import (
    Attribute,
    MessageIntegrity,
    MessageIntegritySha256,
    Nonce,
    PasswordAlgorithm,
    PasswordAlgorithms,
    Realm,
    Userhash,
    Username,
)

OFFERED = PasswordAlgorithms(((PASSWORD_ALGORITHM_SHA256, b""), (PASSWORD_ALGORITHM_MD5, b"")))
"""What we offer, in preference order: RFC 8489 clients take the first they support."""


@dataclass(frozen=True, slots=True)
class AuthResult:
    """Who sent an authenticated request, and how to sign our response."""

    username: str
    key: bytes
    sha256: bool
    """Answer with MESSAGE-INTEGRITY-SHA256 (the client negotiated a password algorithm), else
    with MESSAGE-INTEGRITY."""
    expires: int | None = None
    """Unix time after which this credential may no longer Allocate or Refresh (REST)."""
    source: str = ""


class LongTermAuth:
    """Authenticates requests against a realm, a credential chain and a nonce manager."""

    def __init__(self, realm: str, credentials: Credentials, nonces: NonceManager) -> None:
        self.realm = realm
        self.credentials = credentials
        self.nonces = nonces

    def challenge(
        self, client: Address, now: float, code: int = 401, detail: str = ""
    ) -> StunError:
        """The 401 (or 438) that tells a client which realm, nonce and algorithms to use.

        ``detail`` only goes to the debug log; every 401 looks the same on the wire.
        """
        attrs: tuple[Attribute, ...] = (
            Realm(self.realm),
            Nonce(self.nonces.issue(client, now)),
            OFFERED,
        )
        return StunError(code, attrs, detail)

    def authenticate(self, msg: Message, client: Address, now: float) -> AuthResult:
        """Check a request; returns the result or raises :class:`StunError`."""
        mi256 = msg.get(MessageIntegritySha256)
        mi = msg.get(MessageIntegrity)
        if mi is None and mi256 is None:
            raise self.challenge(client, now, detail="challenge (no MESSAGE-INTEGRITY)")
        username_attr = msg.get(Username)
        userhash_attr = msg.get(Userhash)
        realm_attr = msg.get(Realm)
        nonce_attr = msg.get(Nonce)
        if (username_attr is None and userhash_attr is None) or None in (realm_attr, nonce_attr):
            raise StunError(400, detail="USERNAME/USERHASH, REALM or NONCE missing")
        assert realm_attr is not None and nonce_attr is not None
        algorithm, negotiated = self._algorithm(msg, nonce_attr.value)
        if username_attr is not None:
            username = username_attr.value
        else:
            assert userhash_attr is not None
            found = self.credentials.username_for_hash(userhash_attr.value, self.realm)
            if found is None:
                raise self.challenge(client, now, detail="unknown USERHASH")
            username = found
        if realm_attr.value != self.realm:
            raise self.challenge(client, now, detail=f"wrong realm {realm_attr.value!r}")
        # Verify MI-SHA256 when the client sent it, else MI; the key's hash is the negotiated
        # password algorithm (MD5 unless PASSWORD-ALGORITHM says SHA-256).
        for candidate in self.credentials.keys(username, self.realm, algorithm):
            ok = (
                check_integrity_sha256(msg, candidate.key)
                if mi256 is not None
                else check_integrity(msg, candidate.key)
            )
            if ok:
                break
        else:
            raise self.challenge(client, now, detail=f"bad credentials for user {username!r}")
        # 9.2.4 checks the nonce last: a stale nonce with good credentials gets 438, so the
        # client retries with the fresh one at once.
        if not self.nonces.valid(nonce_attr.value, client, now):
            raise self.challenge(client, now, 438, "stale or foreign nonce")
        # 9.2.4: responses carry MI-SHA256 unless the request was processed as MD5 (neither
        # password attribute present), then MI.
        return AuthResult(username, candidate.key, negotiated, candidate.expires, candidate.source)

    def _algorithm(self, msg: Message, nonce: str) -> tuple[int, bool]:
        """RFC 8489 section 9.2.4 password algorithm checks.

        Returns the algorithm and whether it was negotiated (the attributes were present).
        """
        offered = msg.get(PasswordAlgorithms)
        chosen = msg.get(PasswordAlgorithm)
        if offered is None and chosen is None:
            return PASSWORD_ALGORITHM_MD5, False
        if not nonce.startswith(COOKIE) or offered is None or chosen is None:
            raise StunError(400, detail="incomplete password algorithm negotiation")
        if offered != OFFERED:
            raise StunError(400, detail="PASSWORD-ALGORITHMS differs from what we offered")
        if (chosen.algorithm, chosen.params) not in OFFERED.algorithms:
            raise StunError(400, detail="PASSWORD-ALGORITHM not among those offered")
        return chosen.algorithm, True
