"""TURN REST API ephemeral credentials (draft-uberti-behave-turn-rest, as coturn implements it).

The username is ``EXPIRY:USER`` (EXPIRY a Unix timestamp, USER any string, possibly empty) and
the password is ``base64(HMAC(secret, username))``, HMAC-SHA1 by default or HMAC-SHA256. Several
secrets may be active at once so they can be rotated: the newest signs, all verify.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

ALGORITHMS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256}


def rest_password(secret: str, username: str, algorithm: str = "sha1") -> str:
    """The password the REST scheme assigns to ``username``."""
    digest = hmac.new(secret.encode(), username.encode(), ALGORITHMS[algorithm]).digest()
    return base64.b64encode(digest).decode()


def rest_username(user: str, expiry: int) -> str:
    """``EXPIRY:USER``."""
    return f"{expiry}:{user}"


def rest_expiry(username: str) -> int | None:
    """The expiry timestamp of a REST username, or None if it is not one."""
    head, sep, _ = username.partition(":")
    if not sep or not (head.isascii() and head.isdigit()) or len(head) > 12:
        return None
    return int(head)


@dataclass(frozen=True, slots=True)
class RestSecrets:
    """The active shared secrets and the HMAC algorithm."""

    secrets: tuple[str, ...]
    algorithm: str = "sha1"

    def passwords(self, username: str) -> list[str]:
        """Every password that is valid for ``username`` under one of the secrets."""
        return [rest_password(s, username, self.algorithm) for s in self.secrets]
